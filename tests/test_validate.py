"""validate_cohort and `momkd validate`: every planted problem is its own line naming the file or case, all
problems come out of one run, a clean cohort passes, and the validated data is reusable."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import h5py
import pytest
from typer.testing import CliRunner

from momkd.cli.main import app
from momkd.data.validate import validate_cohort
from momkd.synth import SyntheticCohort, make_synthetic_cohort

from conftest import BAD_SLIDE_KINDS, plant_bad_slide_files

DIM = 8
runner = CliRunner()


@pytest.fixture()
def small(tmp_path: Path) -> SyntheticCohort:
    """20 cases (8 positive), D = 8, 20 genes, 20-40 patches per slide."""
    return make_synthetic_cohort(tmp_path / "cohort", cases=20, feature_dim=DIM, genes=20, patches=(20, 40), seed=1)


def validate(s: SyntheticCohort, **kwargs):
    return validate_cohort(s.cohort_csv, s.features_dir, kwargs.pop("omics", s.omics_path), s.label_col, s.positive,
                           **kwargs)


def rows(path: Path) -> list[list[str]]:
    with path.open(newline="") as f:
        return list(csv.reader(f))


def write_rows(path: Path, data: list[list[str]]) -> None:
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(data)


def first_slide(s: SyntheticCohort) -> tuple[str, str, Path]:
    """(case, slide id, its .h5 path) of the cohort's first row."""
    case, slide = rows(s.cohort_csv)[1][:2]
    slide = slide.removesuffix(".svs")
    return case, slide, s.features_dir / f"{slide}.h5"


def test_clean_cohort_and_reusable_result(small: SyntheticCohort) -> None:
    seen = []
    report = validate(small, progress=lambda done, total: seen.append((done, total)))
    assert report.ok and report.problems == []
    s = report.summary
    n_slides = len(rows(small.cohort_csv)) - 1
    assert (s["cases"], s["slides"], s["feature_dim"], s["encoder"], s["genes"]) == (20, n_slides, DIM, "synthetic", 20)
    assert s["classes"] == {"Negative": 12, "Positive": 8} and s["omics_cases"] == 20 and s["unlisted_files"] == 0
    assert 20 <= s["patches"]["min"] <= s["patches"]["median"] <= s["patches"]["max"] <= 40
    assert seen[-1] == (n_slides, n_slides) and len(seen) == n_slides
    assert set(report.slide_paths) == set(report.cohort.slide_ids) and len(report.slide_paths) == n_slides
    assert all(p.is_file() for p in report.slide_paths.values())
    assert report.omics is not None and set(report.cohort.cases) <= set(report.omics.case_ids)


@pytest.mark.parametrize("kind", BAD_SLIDE_KINDS)
def test_each_bad_slide_file_is_one_line(small: SyntheticCohort, tmp_path: Path, kind: str) -> None:
    case, slide, path = first_slide(small)
    bad = plant_bad_slide_files(tmp_path / "bad", DIM)[kind]
    shutil.copyfile(bad, path)
    report = validate(small)
    assert [p.where for p in report.problems] == [f"{path} (case {case})"]
    message = report.problems[0].message
    if kind == "feature_dim":   # no expected dim: the odd slide out is reported against the others
        assert message.startswith(f"feature dim {DIM + 1} differs from the other slides' {DIM}")
    assert slide not in report.slide_paths and "\n" not in str(report.problems[0])


def test_missing_feature_file(small: SyntheticCohort) -> None:
    case, slide, path = first_slide(small)
    path.unlink()
    report = validate(small)
    assert [str(p) for p in report.problems] == [f"{path} (case {case}): no feature file for slide {slide}"]


def test_expected_dim_checks_every_slide(small: SyntheticCohort) -> None:
    report = validate(small, expected_dim=DIM + 1)
    assert len(report.problems) == report.summary["slides"]
    assert all(f"feature dim {DIM} does not match the expected {DIM + 1}" in p.message for p in report.problems)


def test_mixed_encoders(small: SyntheticCohort) -> None:
    case, _, path = first_slide(small)
    with h5py.File(path, "r+") as h5:
        h5["features"].attrs["encoder"] = "resnet50_trunc"
    report = validate(small)
    assert [p.where for p in report.problems] == [f"{path} (case {case})"]
    assert report.problems[0].message.startswith("encoder resnet50_trunc differs from the other slides' synthetic")


def test_case_without_omics_and_require_omics(small: SyntheticCohort) -> None:
    data = rows(small.omics_path)
    dropped = data[3][0]
    write_rows(small.omics_path, data[:3] + data[4:])
    report = validate(small)
    assert [str(p) for p in report.problems] == [f"case {dropped}: no omics in {small.omics_path}"]
    assert validate(small, require_omics=False).ok
    assert validate(small, omics=None).ok


def test_unloadable_omics(small: SyntheticCohort) -> None:
    data = rows(small.omics_path)
    data[2][5] = "n/a"
    write_rows(small.omics_path, data)
    report = validate(small)
    assert len(report.problems) == 1 and report.omics is None
    assert str(report.problems[0]) == f"omics: {small.omics_path}: line 3, column {data[0][5]}: non-numeric value 'n/a'"


def test_too_few_cases_for_the_folds(small: SyntheticCohort) -> None:
    report = validate(small, folds=10)
    assert [str(p) for p in report.problems] == [
        f"{small.cohort_csv}: class 'Positive' has 8 case(s); 10-fold splits need at least 10 per class"]
    assert validate(small, folds=1).ok   # evaluation: no splits


def test_table_problems_and_missing_folder(small: SyntheticCohort, tmp_path: Path) -> None:
    data = rows(small.cohort_csv)
    write_rows(small.cohort_csv, data + [[data[1][0], data[1][1], "Negative"], ["X-1", "x1", "unknown"]])
    report = validate_cohort(small.cohort_csv, tmp_path / "nope", None, small.label_col, small.positive)
    text = [str(p) for p in report.problems]
    assert any(f"case {data[1][0]} has conflicting labels" in t for t in text)
    assert any("duplicate row" in t for t in text)
    assert any("unknown label value(s)" in t for t in text)
    assert f"{tmp_path / 'nope'}: features folder not found" in text
    report = validate_cohort(small.cohort_csv, small.features_dir, None, "HER2", small.positive)
    assert any("missing column(s) HER2" in str(p) for p in report.problems)


def test_unlisted_files_are_counted_not_problems(small: SyntheticCohort) -> None:
    _, _, path = first_slide(small)
    shutil.copyfile(path, small.features_dir / "extra.h5")
    report = validate(small)
    assert report.ok and report.summary["unlisted_files"] == 1


def cli_args(s: SyntheticCohort, *extra: str) -> list[str]:
    return ["validate", "--cohort", str(s.cohort_csv), "--features", str(s.features_dir), "--omics", str(s.omics_path),
            "--label-col", s.label_col, "--positive", s.positive, *extra]


def test_cli_reports_every_problem_in_one_run(small: SyntheticCohort, tmp_path: Path) -> None:
    data = rows(small.cohort_csv)
    by_case: dict[str, list[str]] = {}
    for case, slide, _ in data[1:]:
        by_case.setdefault(case, []).append(slide.removesuffix(".svs"))
    cases = list(by_case)
    missing_slide = by_case[cases[0]][0]                                   # a missing file
    (small.features_dir / f"{missing_slide}.h5").unlink()
    nan_slide = by_case[cases[1]][0]                                       # a NaN slide
    shutil.copyfile(plant_bad_slide_files(tmp_path / "bad", DIM)["non_finite"], small.features_dir / f"{nan_slide}.h5")
    for slide in by_case[cases[2]]:                                        # a case without features
        (small.features_dir / f"{slide}.h5").unlink()
    omics = rows(small.omics_path)                                         # a case without omics
    write_rows(small.omics_path, [r for r in omics if r[0] != cases[3]])
    write_rows(small.cohort_csv, data + [data[-1]])                        # a duplicate row

    result = runner.invoke(app, cli_args(small))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.output.splitlines()
    for needle in (f"(case {cases[0]}): no feature file for slide {missing_slide}",
                   f"{nan_slide}.h5 (case {cases[1]}): features contain NaN",
                   *(f"(case {cases[2]}): no feature file for slide {s}" for s in by_case[cases[2]]),
                   f"case {cases[3]}: no omics", "duplicate row for case"):
        assert sum(needle in line for line in lines) == 1, (needle, result.output)
    assert "problem(s)" in lines[-1]


def test_cli_clean_cohort(synth_cohort: SyntheticCohort) -> None:
    result = runner.invoke(app, cli_args(synth_cohort))
    assert result.exit_code == 0, result.output
    assert (": ok" in result.output and "Negative: 36, Positive: 24" in result.output
            and "64 (synthetic)" in result.output)


def test_cli_no_omics_skips_omics(small: SyntheticCohort) -> None:
    small.omics_path.write_text("garbage")
    assert runner.invoke(app, cli_args(small)).exit_code == 2
    result = runner.invoke(app, cli_args(small, "--no-omics"))
    assert result.exit_code == 0, result.output
    assert "not checked" in result.output
