"""Hostile or inconsistent cohort data (issue 12 §6): slide ids that are paths, omics that validate passed but
train refused (one check for both now), and genes constant across the cases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from momkd.cli.main import app
from momkd.data.cohort import load_cohort, slide_id_problem
from momkd.data.omics import OmicsTable, OmicsTransform
from momkd.data.validate import validate_cohort
from momkd.errors import CohortError, OmicsError
from momkd.synth import SyntheticCohort, make_synthetic_cohort
from test_validate import rows as _rows, write_rows as _write_rows   # one CSV-row helper for the tests

DIM = 8
runner = CliRunner()
HOSTILE = ("../outside", "sub/slide", "/etc/passwd", "a\\b", "nul\x00byte", "..")


@pytest.fixture()
def small(tmp_path: Path) -> SyntheticCohort:
    """20 cases (8 positive), D = 8, 20 genes, 20-40 patches per slide, features in ``tmp_path/cohort``."""
    return make_synthetic_cohort(tmp_path / "cohort", cases=20, feature_dim=DIM, genes=20, patches=(20, 40), seed=1)


def _with_hostile_slides(s: SyntheticCohort) -> list[int]:
    """Point the first rows' slide ids outside the features folder, with a valid slide file planted at
    ``features/../outside.h5``; returns the file line numbers of those rows."""
    rows = _rows(s.cohort_csv)
    first = s.features_dir / f"{rows[1][1].removesuffix('.svs')}.h5"
    (s.features_dir.parent / "outside.h5").write_bytes(first.read_bytes())
    for i, slide in enumerate(HOSTILE, start=1):
        rows[i][1] = slide
    _write_rows(s.cohort_csv, rows)
    return list(range(2, 2 + len(HOSTILE)))


def test_slide_id_problem_names_what_is_wrong() -> None:
    for ok in ("TCGA-A1-0001-01Z-00-DX1", "slide.v2", "a b", "..x"):
        assert slide_id_problem(ok) is None
    for path in ("../x", "a/b", "/abs", "a\\b", ".", ".."):
        assert "is a path, not a file name" in (slide_id_problem(path) or "")
    assert "control character" in (slide_id_problem("a\x00b") or "")


def test_load_cohort_refuses_path_slide_ids_with_row_numbers(small: SyntheticCohort) -> None:
    lines = _with_hostile_slides(small)
    problems: list = []
    cohort = load_cohort(small.cohort_csv, small.label_col, small.positive, problems)
    assert [p.where for p in problems] == [f"{small.cohort_csv} line {n}" for n in lines]
    assert all("\n" not in str(p) for p in problems)
    assert not any(s in cohort.slide_ids for s in HOSTILE)
    with pytest.raises(CohortError, match=f"{len(HOSTILE)} problem\\(s\\) in the cohort table"):
        load_cohort(small.cohort_csv, small.label_col, small.positive)


def test_validate_never_reads_outside_the_features_folder(small: SyntheticCohort) -> None:
    _with_hostile_slides(small)
    report = validate_cohort(small.cohort_csv, small.features_dir, small.omics_path, small.label_col, small.positive)
    assert not report.ok
    assert not any(path.name == "outside.h5" for path in report.slide_paths.values())
    assert sum("is a path, not a file name" in p.message for p in report.problems) == len(HOSTILE) - 1
    assert sum("control character" in p.message for p in report.problems) == 1


def test_validate_cli_lists_every_hostile_row(small: SyntheticCohort) -> None:
    lines = _with_hostile_slides(small)
    result = runner.invoke(app, ["validate", "--cohort", str(small.cohort_csv), "--features", str(small.features_dir),
                                 "--omics", str(small.omics_path), "--label-col", small.label_col, "--positive",
                                 small.positive])
    assert result.exit_code == 2 and "Traceback" not in result.output
    for n in lines:
        assert f"line {n}: slide_id" in result.output


def test_train_refuses_to_start_and_lists_all_problems(small: SyntheticCohort, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    lines = _with_hostile_slides(small)
    result = runner.invoke(app, ["train", "--cohort", str(small.cohort_csv), "--features", str(small.features_dir),
                                 "--omics", str(small.omics_path), "--label-col", small.label_col, "--positive",
                                 small.positive, "--out", str(tmp_path / "run"), "--epochs", "1"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert all(f"line {n}: slide_id" in result.output for n in lines)
    assert "nothing was run" in result.output and not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- omics: one check for validate and fit
def _table(values, genes=None) -> OmicsTable:
    values = np.asarray(values, dtype=np.float32)
    return OmicsTable([f"c{i}" for i in range(len(values))], genes or [f"G{j}" for j in range(values.shape[1])],
                      values, "omics.csv")


def test_fit_refuses_exactly_what_check_reports() -> None:
    t = _table([[1.0, -0.5, 3.0], [2.0, 3.0, -1.0], [4.0, 1.0, 2.0]])
    checked = OmicsTransform().check(t, t.case_ids)
    assert checked.problems == ["omics.csv: negative value -0.5 (case c0, gene G1) cannot be log2(x+1)-transformed "
                                "(2 negative value(s) in all); use --no-log2 if the values are already log-scaled"]
    with pytest.raises(OmicsError) as ei:
        OmicsTransform().fit(t, t.case_ids)
    assert str(ei.value) == checked.problems[0]
    assert OmicsTransform(log2=False).check(t, t.case_ids).problems == []
    unknown = OmicsTransform(genes=["G0", "ERBB2"]).check(t, t.case_ids)
    assert unknown.problems == ["omics.csv: 1 gene(s) of the gene list not in the omics table: ERBB2"]


def test_validate_applies_the_training_transform_check(small: SyntheticCohort, tmp_path: Path) -> None:
    rows = _rows(small.omics_path)
    rows[3][2] = "-2.5"                             # one negative expression value
    _write_rows(small.omics_path, rows)
    args = (small.cohort_csv, small.features_dir, small.omics_path, small.label_col, small.positive)
    refused = validate_cohort(*args, omics_transform=OmicsTransform())          # train's default: log2
    assert [p.where for p in refused.problems] == ["omics"]
    assert f"negative value -2.5 (case {rows[3][0]}, gene {rows[0][2]})" in refused.problems[0].message
    assert validate_cohort(*args, omics_transform=OmicsTransform(log2=False)).ok   # --no-log2
    assert validate_cohort(*args).ok               # settings unknown: only what every setting shares


def test_constant_genes_warn_and_all_constant_refuses(small: SyntheticCohort) -> None:
    rows = _rows(small.omics_path)
    genes = rows[0][1:]
    for row in rows[1:]:
        row[1], row[2], row[5] = "7", "0", "3.25"   # three genes the same for every case
    _write_rows(small.omics_path, rows)
    args = (small.cohort_csv, small.features_dir, small.omics_path, small.label_col, small.positive)
    report = validate_cohort(*args)
    assert report.ok and len(report.warnings) == 1
    warning = str(report.warnings[0])
    assert f"3 of {len(genes)} gene(s) are constant across the 20 cases" in warning
    assert warning.endswith(f"{genes[0]}, {genes[1]}, {genes[4]}")
    fitted = OmicsTransform(n_genes=len(genes)).fit(report.omics, report.cohort.cases)
    assert fitted.warnings == [report.warnings[0].message]           # training reports the same genes
    for row in rows[1:]:
        row[1:] = ["1"] * len(genes)
    _write_rows(small.omics_path, rows)
    refused = validate_cohort(*args)
    assert [p.message for p in refused.problems] == [
        f"{small.omics_path}: {len(genes)} of {len(genes)} gene(s) (all) are constant across the 20 cases: the "
        "omics carry no signal"]
    with pytest.raises(OmicsError, match="\\(all\\) are constant"):
        OmicsTransform().fit(refused.omics, refused.cohort.cases)


def test_validate_and_train_clis_agree_on_negative_omics(small: SyntheticCohort, tmp_path: Path) -> None:
    """``momkd validate`` refuses what ``momkd train`` would refuse, with the same flags (one check for both)."""
    pytest.importorskip("torch")
    rows = _rows(small.omics_path)
    rows[3][2] = "-2.5"
    _write_rows(small.omics_path, rows)
    data = ["--cohort", str(small.cohort_csv), "--features", str(small.features_dir), "--omics", str(small.omics_path),
            "--label-col", small.label_col, "--positive", small.positive]
    validated = runner.invoke(app, ["validate", *data])
    trained = runner.invoke(app, ["train", *data, "--out", str(tmp_path / "run"), "--epochs", "1"])
    for result in (validated, trained):
        assert result.exit_code == 2 and "Traceback" not in result.output
        assert "negative value -2.5" in result.output
    assert not (tmp_path / "run").exists()                           # refused before training started
    assert runner.invoke(app, ["validate", *data, "--no-log2"]).exit_code == 0
