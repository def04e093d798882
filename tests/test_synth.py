"""make_synthetic_cohort: real formats, determinism, a learnable but not trivial label; the ``study`` kind (its
signal fraction and regions, label noise, omics following the molecular state); `momkd synth`; and the data tier
importing with PyTorch blocked."""

from __future__ import annotations

import csv
import shlex
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from scipy import ndimage
from typer.testing import CliRunner

from momkd.cli.main import app
from momkd.data.omics import load_omics
from momkd.data.slide import read_slide
from momkd.synth import (DIFFICULTIES, LABEL_COL, NEGATIVE, POSITIVE, SyntheticCohort, _Histology,
                         _StudyHistology, make_synthetic_cohort)

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
                path = synth_cohort.features_dir / f"{r['slide_id'].removesuffix('.svs')}.h5"
                proj = read_slide(path).features @ signal
                per_slide.append(np.sort(proj)[-10:].mean())
        score.append(np.mean(per_slide))
    assert 0.75 < auc(y, np.array(score)) < 0.99


STUDY = dict(cases=80, feature_dim=16, genes=40, patches=(40, 120), slides_per_case=(1, 2), kind="study")


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> SyntheticCohort:
    return make_synthetic_cohort(tmp_path_factory.mktemp("study"), seed=3, **STUDY)


def truth_rows(cohort: SyntheticCohort) -> list[dict[str, str]]:
    assert cohort.truth_csv is not None
    return read_rows(cohort.truth_csv)


def test_study_deterministic(study: SyntheticCohort, tmp_path: Path) -> None:
    again = make_synthetic_cohort(tmp_path / "again", seed=3, **STUDY)
    other = make_synthetic_cohort(tmp_path / "other", seed=4, **STUDY)
    for name in ("cohort.csv", "omics.csv", "truth.csv"):
        assert (study.cohort_csv.parent / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
    assert study.omics_path.read_bytes() != other.omics_path.read_bytes()
    for mine, theirs in ((study.signal_masks, again.signal_masks), (study.patch_tissue, again.patch_tissue)):
        with np.load(mine) as a, np.load(theirs) as b:
            assert sorted(a.files) == sorted(b.files)
            for key in a.files:
                np.testing.assert_array_equal(a[key], b[key])
    for path in study.features_dir.glob("*.h5"):
        x, y = read_slide(path), read_slide(again.features_dir / path.name)
        np.testing.assert_array_equal(x.features, y.features)
        np.testing.assert_array_equal(x.coords, y.coords)


def test_study_signal_sits_in_one_or_two_regions_of_the_specified_fraction(study: SyntheticCohort) -> None:
    knobs = DIFFICULTIES["medium"]
    state = {r["case_id"]: int(r["state_label"]) for r in truth_rows(study)}
    u, v = _StudyHistology(16).directions
    shifts = {0: [], 1: []}
    with np.load(study.signal_masks) as masks, np.load(study.patch_tissue) as tissue:
        table = read_rows(study.cohort_csv)
        assert sorted(masks.files) == sorted(tissue.files) == sorted(r["slide_id"] for r in table)
        for row in table:
            slide = read_slide(study.features_dir / f"{row['slide_id']}.h5")
            mask, types = masks[row["slide_id"]], tissue[row["slide_id"]]
            assert mask.shape == types.shape == (len(slide.features),) and set(np.unique(types)) <= {0, 1, 2, 3}
            assert mask.sum() == round(knobs.fraction * len(mask))
            cells = slide.coords // 256
            grid = np.zeros(tuple(cells.max(0) + 1), dtype=bool)
            grid[tuple(cells[mask].T)] = True
            assert 1 <= ndimage.label(grid, structure=np.ones((3, 3)))[1] <= 2   # contiguous on the patch grid
            own, other = (u, v) if state[row["case_id"]] else (v, u)
            gap = lambda d: (slide.features[mask] @ d).mean() - (slide.features[~mask] @ d).mean()  # noqa: E731
            shifts[0].append(gap(other))
            shifts[1].append(gap(own))
    assert 0.8 * knobs.strength < np.mean(shifts[1]) < 1.2 * knobs.strength   # along the case's own direction
    assert abs(np.mean(shifts[0])) < 0.2 * knobs.strength                      # and not along the other one


def test_study_labels_follow_the_molecular_state_up_to_label_noise(study: SyntheticCohort) -> None:
    truth = truth_rows(study)
    state = np.array([float(r["molecular_state"]) for r in truth])
    state_label = np.array([int(r["state_label"]) for r in truth])
    flipped = np.array([int(r["label_flipped"]) for r in truth])
    assert state_label.sum() == round(0.4 * len(truth))
    assert state[state_label == 1].min() > state[state_label == 0].max()
    assert flipped.sum() == round(DIFFICULTIES["medium"].label_noise * len(truth))
    labels = {r["case_id"]: int(r[LABEL_COL] == POSITIVE) for r in read_rows(study.cohort_csv)}
    y = np.array([labels[r["case_id"]] for r in truth])
    np.testing.assert_array_equal(y, state_label ^ flipped)

    logged = np.log2(load_omics(study.omics_path).rows([r["case_id"] for r in truth]).astype(np.float64) + 1)
    corr = np.array([abs(np.corrcoef(state, logged[:, j])[0, 1]) for j in range(logged.shape[1])])
    signal = np.argsort(-corr)[:8]
    assert corr[signal].min() > 0.4 and np.median(corr) < 0.2     # 8 genes follow the state, the others do not
    best = max(max(auc(y, logged[:, j]), 1 - auc(y, logged[:, j])) for j in signal)
    best_state = max(max(auc(state_label, logged[:, j]), 1 - auc(state_label, logged[:, j])) for j in signal)
    assert 0.75 < best < best_state                                # label noise costs AUC


def test_study_rejects_unknown_kind_and_difficulty(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="kind"):
        make_synthetic_cohort(tmp_path, kind="hardest")
    with pytest.raises(ValueError, match="difficulty"):
        make_synthetic_cohort(tmp_path, kind="study", difficulty="extreme")
    with pytest.raises(ValueError, match="tissue_types"):
        make_synthetic_cohort(tmp_path, kind="study", tissue_types=0)


def test_study_tissue_types(tmp_path: Path) -> None:
    made = make_synthetic_cohort(tmp_path, cases=30, feature_dim=8, genes=20, patches=(20, 40), kind="study",
                                 tissue_types=8)
    with np.load(made.patch_tissue) as tissue:
        types = np.concatenate([tissue[key] for key in tissue.files])
    assert set(np.unique(types)) == set(range(8))


def test_cli_synth_study_writes_the_same_cohort_and_it_validates(study: SyntheticCohort, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    result = runner.invoke(app, ["synth", str(out), "--kind", "study", "--cases", "80", "--feature-dim", "16",
                                 "--genes", "40", "--patches", "40", "120", "--slides", "1", "2", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert "truth.csv" in result.output
    assert (out / "truth.csv").read_bytes() == study.truth_csv.read_bytes()
    validate = next(line.strip() for line in result.output.splitlines() if line.strip().startswith("momkd validate "))
    check = runner.invoke(app, shlex.split(validate)[1:])
    assert check.exit_code == 0, check.output
    bad = runner.invoke(app, ["synth", str(tmp_path / "bad"), "--patches", "60", "30"])
    assert bad.exit_code == 2 and "LO <= HI" in bad.output


def test_cli_synth_prints_next_commands_that_work(tmp_path: Path) -> None:
    out = tmp_path / "my cohort"
    result = runner.invoke(app, ["synth", str(out), "--cases", "20", "--feature-dim", "8", "--genes", "12",
                                 "--seed", "3"])
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
