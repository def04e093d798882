"""make_synthetic_cohort: real formats, determinism, a learnable but not trivial label; `momkd synth`; and the
data tier importing with PyTorch blocked."""

from __future__ import annotations

import csv
import shlex
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
from typer.testing import CliRunner

from momkd.cli.main import app
from momkd.data.omics import load_omics
from momkd.data.slide import read_slide
from momkd.synth import LABEL_COL, NEGATIVE, POSITIVE, SyntheticCohort, _Histology, make_synthetic_cohort

runner = CliRunner()


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def auc(y: np.ndarray, score: np.ndarray) -> float:
    pos, neg = score[y == 1], score[y == 0]
    return float(((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg)))


def test_format(synth_cohort: SyntheticCohort) -> None:
    s = synth_cohort
    assert (s.label_col, s.positive) == (LABEL_COL, POSITIVE) == ("her2_status", "Positive")
    table = read_rows(s.cohort_csv)
    assert list(table[0]) == ["case_id", "slide_id", "her2_status"]
    assert {r["her2_status"] for r in table} == {POSITIVE, NEGATIVE}
    labels = {r["case_id"]: r["her2_status"] for r in table}
    assert len(labels) == 60 and sum(v == POSITIVE for v in labels.values()) == 24
    with_ext = [r["slide_id"] for r in table if r["slide_id"].endswith(".svs")]
    assert 0 < len(with_ext) < len(table)
    per_case = {c: sum(r["case_id"] == c for r in table) for c in labels}
    assert set(per_case.values()) == {1, 2}
    files = sorted(s.features_dir.glob("*.h5"))
    assert [f.stem for f in files] == sorted(r["slide_id"].removesuffix(".svs") for r in table)
    with h5py.File(files[0]) as h5:
        f, c = h5["features"], h5["coords"]
        assert f.dtype == np.float32 and f.chunks == (1, 64) and c.dtype == np.int64 and c.shape[1] == 2
        assert c.attrs["patch_size_level0"] == 256 and f.attrs["encoder"] == "synthetic"
        coords = c[()]
        assert 150 <= len(coords) <= 600 and (coords % 256 == 0).all()
        assert len(np.unique(coords, axis=0)) == len(coords)
    omics = load_omics(s.omics_path)
    assert omics.values.shape == (60, 200) and set(omics.case_ids) == set(labels)
    assert (omics.values >= 0).all() and (omics.values == np.round(omics.values)).all()


def test_deterministic(tmp_path: Path) -> None:
    kwargs = dict(cases=12, feature_dim=8, genes=16, patches=(10, 30))
    a = make_synthetic_cohort(tmp_path / "a", seed=5, **kwargs)
    b = make_synthetic_cohort(tmp_path / "b", seed=5, **kwargs)
    c = make_synthetic_cohort(tmp_path / "c", seed=6, **kwargs)
    assert a.cohort_csv.read_bytes() == b.cohort_csv.read_bytes()
    assert a.omics_path.read_bytes() == b.omics_path.read_bytes() != c.omics_path.read_bytes()
    for path in a.features_dir.glob("*.h5"):
        x, y = read_slide(path), read_slide(b.features_dir / path.name)
        np.testing.assert_array_equal(x.features, y.features)
        np.testing.assert_array_equal(x.coords, y.coords)


def test_default_is_fast(tmp_path: Path) -> None:
    t = time.perf_counter()
    make_synthetic_cohort(tmp_path / "s")
    assert time.perf_counter() - t < 2.0


def test_label_learnable_from_both_modalities_but_histology_not_trivially(synth_cohort: SyntheticCohort) -> None:
    table = read_rows(synth_cohort.cohort_csv)
    cases = list(dict.fromkeys(r["case_id"] for r in table))
    y = np.array([next(r["her2_status"] == POSITIVE for r in table if r["case_id"] == c) for c in cases], dtype=int)

    omics = load_omics(synth_cohort.omics_path)
    logged = np.log2(omics.rows(cases).astype(np.float64) + 1)
    gene_auc = np.array([auc(y, logged[:, j]) for j in range(logged.shape[1])])
    assert (gene_auc > 0.9).sum() >= 3                       # a few strongly shifted genes

    signal = _Histology(64).directions[0]                    # an oracle that knows the signal direction
    score = []
    for case in cases:
        per_slide = []
        for r in table:
            if r["case_id"] == case:
                proj = read_slide(synth_cohort.features_dir / f"{r['slide_id'].removesuffix('.svs')}.h5").features @ signal
                per_slide.append(np.sort(proj)[-10:].mean())
        score.append(np.mean(per_slide))
    assert 0.75 < auc(y, np.array(score)) < 0.99


def test_cli_synth_prints_next_commands_that_work(tmp_path: Path) -> None:
    out = tmp_path / "my cohort"
    result = runner.invoke(app, ["synth", str(out), "--cases", "20", "--feature-dim", "8", "--genes", "12", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert str(out / "cohort.csv") in result.output and str(out / "features") in result.output
    lines = [line.strip() for line in result.output.splitlines()]
    validate = next(line for line in lines if line.startswith("momkd validate "))
    train = next(line for line in lines if line.startswith("momkd train "))
    assert train.endswith(f"--out {shlex.quote(str(out / 'run'))}")
    check = runner.invoke(app, shlex.split(validate)[1:])
    assert check.exit_code == 0, check.output


def test_data_tier_imports_without_torch() -> None:
    code = ("import sys; sys.modules['torch'] = None\n"
            "import momkd.data.slide, momkd.data.omics, momkd.data.cohort, momkd.data.validate, momkd.synth\n"
            "import momkd.cli.cmd_data\n"
            "print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
