"""The run folder as one contract: a fresh run claims an empty --out, the run's folds are exactly those of
summary.json (what export and evaluate use), every file is written atomically, logs get one line per epoch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

pytest.importorskip("torch")

from momkd.cli.main import app  # noqa: E402
from momkd.errors import RunFolderError  # noqa: E402
from momkd.train.runfolder import SUMMARY, fold_dirs, run_folds, write_json  # noqa: E402

runner = CliRunner()


def text(result) -> str:  # noqa: ANN001
    """The command's output with line wrapping undone."""
    return " ".join(result.output.split())


def abmil_args(synth, out: Path) -> list[str]:
    return ["train", "--cohort", str(synth.cohort_csv), "--features", str(synth.features_dir),
            "--label-col", synth.label_col, "--positive", synth.positive, "--out", str(out), "--device", "cpu",
            "--model", "abmil", "--folds", "2", "--epochs", "2"]


@pytest.fixture(scope="module")
def abmil_run(synth_cohort, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("runfolder") / "abmil"
    result = runner.invoke(app, abmil_args(synth_cohort, out))
    assert result.exit_code == 0, result.output
    return out, text(result)


def test_logs_get_one_plain_line_per_epoch(abmil_run) -> None:
    _, output = abmil_run
    for fold in (0, 1):
        for epoch in (1, 2):
            assert f"fold {fold} epoch {epoch}/2: train loss" in output


def test_a_fresh_run_refuses_a_used_out(synth_cohort, abmil_run, tmp_path: Path) -> None:
    out, _ = abmil_run
    again = runner.invoke(app, abmil_args(synth_cohort, out))
    assert again.exit_code == 2 and "already holds a finished run" in text(again)
    killed = tmp_path / "killed"
    shutil.copytree(out, killed)
    (killed / SUMMARY).unlink()                        # what a killed run leaves: folds without a summary
    again = runner.invoke(app, abmil_args(synth_cohort, killed))
    assert again.exit_code == 2 and "unfinished or other run" in text(again) and "--overwrite" in text(again)
    again = runner.invoke(app, [*abmil_args(synth_cohort, killed), "--overwrite"])
    assert again.exit_code == 0, again.output
    assert run_folds(killed) == [0, 1]


def test_overwrite_empties_only_a_run_folder(synth_cohort, tmp_path: Path) -> None:
    from momkd.train.run import _claim_out

    run = tmp_path / "run"
    (run / "fold_3").mkdir(parents=True)
    write_json(run / "config.json", {})
    _claim_out(run, overwrite=True)
    assert not run.exists()
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(RunFolderError, match="not a momkd run folder"):
        _claim_out(other, overwrite=True)
    assert (other / "holiday.jpg").exists()


def test_the_run_folds_are_those_of_the_summary(abmil_run, tmp_path: Path) -> None:
    out, _ = abmil_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    shutil.copytree(run / "fold_0", run / "fold_7")    # a stray fold folder (another, killed run)
    assert run_folds(run) == [0, 1]
    assert [d.name for d in fold_dirs(run)] == ["fold_0", "fold_1"]
    with pytest.raises(RunFolderError, match="no trained fold 7"):
        fold_dirs(run, 7)
    (run / SUMMARY).unlink()
    with pytest.raises(RunFolderError, match="unfinished run"):
        fold_dirs(run)


def test_export_and_evaluate_refuse_an_unfinished_run(synth_cohort, abmil_run, tmp_path: Path) -> None:
    out, _ = abmil_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    (run / SUMMARY).unlink()
    result = runner.invoke(app, ["evaluate", str(run), "--cohort", str(synth_cohort.cohort_csv), "--features",
                                 str(synth_cohort.features_dir), "--label-col", synth_cohort.label_col,
                                 "--positive", synth_cohort.positive, "--out", str(tmp_path / "eval"),
                                 "--device", "cpu"])
    assert result.exit_code == 2 and "unfinished run" in text(result)
    result = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "model")])
    assert result.exit_code == 2 and "unfinished run" in text(result)


def test_run_files_are_written_atomically_with_umask_permissions(tmp_path: Path) -> None:
    import os

    from momkd.atomic import atomic_path, current_umask

    target = tmp_path / "summary.json"
    write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    assert (os.stat(target).st_mode & 0o777) == 0o666 & ~current_umask()
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"a": 1}       # the old file stays whole
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]   # no temporary left behind
