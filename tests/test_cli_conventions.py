"""The conventions every ``momkd`` command keeps (momkd/cli/main.py): flags show no type in ``--help``, ``-o`` and
``-q`` everywhere they apply, help and messages unwrapped outside a terminal, a progress line per step; and the
outputs people read: the loss plot's labels and validation curves, the heatmap title's threshold."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
from rich.table import Table
from typer.testing import CliRunner

from momkd.cli import main
from momkd.cli.console import LOG_WIDTH, CliConsole
from momkd.cli.main import app

runner = CliRunner()
COMMANDS = tuple(command.name for command in app.registered_commands)
WRITES_A_FOLDER = ("train", "evaluate", "demo", "infer", "export", "report")   # --out
PROGRESS_LINES = ("train", "evaluate", "demo", "infer", "export", "report", "bench")   # --quiet
FLAGS = {"train": "--no-recon", "infer": "--resume", "export": "--fp16", "report": "--html", "validate": "--no-omics"}


def command_help(command: str, monkeypatch: pytest.MonkeyPatch, terminal: bool) -> str:
    monkeypatch.setattr(main, "help_on_terminal", lambda: terminal)
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.parametrize("terminal", [True, False], ids=["rich", "plain"])
@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_no_type_for_flags(command: str, terminal: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    text = command_help(command, monkeypatch, terminal)
    assert "<bool>" not in text and "list[" not in text, text
    if command in FLAGS:
        assert re.search(rf"{FLAGS[command]}\s+[A-Z]", text), text   # the flag, then its help: no value shown


@pytest.mark.parametrize("command", COMMANDS)
def test_out_and_quiet_have_the_same_short_names(command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    text = command_help(command, monkeypatch, terminal=False)
    assert ("-o, --out <path>" in text) == ("--out" in text) == (command in WRITES_A_FOLDER), text
    assert ("-q, --quiet" in text) == ("--quiet" in text), text
    if command in PROGRESS_LINES:
        assert "-q, --quiet" in text, text


def test_repeatable_option_shows_its_element(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "--compare <path>" in command_help("report", monkeypatch, terminal=False)


def test_help_into_a_pipe_is_not_wrapped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(main, "help_on_terminal", lambda: False)
    result = runner.invoke(app, ["infer", "--help"], env={"COLUMNS": "80"})
    line = next(ln for ln in result.stdout.splitlines() if "Reader pool:" in ln)
    assert line.rstrip().endswith("(processes when the model runs on a GPU).  [default: auto]"), result.stdout
    assert len(line) > 80


def test_usage_error_into_a_pipe_is_one_plain_line(tmp_path: Path) -> None:
    missing = tmp_path / ("a-long-folder-name-" * 6) / "cohort.csv"
    result = runner.invoke(app, ["train", "--cohort", str(missing)])
    assert result.exit_code == 2
    assert f"Error: Invalid value for '--cohort': file '{missing}' does not exist." in result.stderr.splitlines()
    assert "╭" not in result.stderr


def test_console_does_not_wrap_outside_a_terminal() -> None:
    long_line = "slide_id,case_id," + ",".join(f"/data/cohort/slides/slide_{i:04d}.h5" for i in range(8))
    piped = CliConsole(file=io.StringIO())
    piped.print(long_line)
    assert piped.file.getvalue() == long_line + "\n"
    table = Table("model", *(f"a long column name {i}" for i in range(6)))
    table.add_row("momkd", *(f"0.{i}00 ± 0.0{i}0" for i in range(6)))
    piped.print(table)
    assert piped.width >= LOG_WIDTH
    assert "momkd" in piped.file.getvalue().splitlines()[-2] and len(piped.file.getvalue().splitlines()) == 6
    terminal = CliConsole(file=io.StringIO(), force_terminal=True, width=80)
    terminal.print(long_line)
    assert len(terminal.file.getvalue().splitlines()) > 1   # on a terminal rich wraps, as it always did


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A 2-fold, 1-epoch MoMKD run on a tiny cohort, and the data options of that cohort."""
    pytest.importorskip("torch")
    pytest.importorskip("torch_geometric")
    from momkd.synth import make_synthetic_cohort

    root = tmp_path_factory.mktemp("conventions")
    synth = make_synthetic_cohort(root / "data", cases=12, feature_dim=8, genes=16, patches=(10, 20),
                                  slides_per_case=(1, 1))
    data = ["--cohort", str(synth.cohort_csv), "--features", str(synth.features_dir), "--label-col",
            synth.label_col, "--positive", synth.positive]
    result = runner.invoke(app, ["train", *data, "--omics", str(synth.omics_path), "-o", str(root / "run"),
                                 "--folds", "2", "--epochs", "1", "--memory-size", "2", "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    assert "epoch" not in result.stderr and "test per case" in result.stderr   # -q: the result line only
    return root / "run", data


def test_evaluate_prints_a_line_per_fold_model(tiny_run: tuple[Path, list[str]], tmp_path: Path) -> None:
    run, data = tiny_run
    result = runner.invoke(app, ["evaluate", str(run), *data, "-o", str(tmp_path / "ev"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert any(ln.startswith("evaluating 2 fold model(s) of ") for ln in lines), result.stderr
    assert [ln.split(":")[0] for ln in lines if re.match(r"fold \d model:", ln)] == ["fold 0 model", "fold 1 model"]
    quiet = runner.invoke(app, ["evaluate", str(run), *data, "-o", str(tmp_path / "q"), "--device", "cpu", "-q"])
    assert quiet.exit_code == 0, quiet.output
    assert "fold 0 model" not in quiet.stderr and "mean of 2 fold models" in quiet.stderr


@pytest.mark.slow
def test_export_prints_a_line_before_each_long_step(tiny_run: tuple[Path, list[str]], tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    run, _ = tiny_run
    result = runner.invoke(app, ["export", str(run), "-o", str(tmp_path / "model")])
    assert result.exit_code == 0, result.output
    steps = [ln.split(" ")[0] for ln in result.stderr.splitlines()]
    for step in ("loaded", "exporting", "exported", "tracing", "verifying", "verified", "wrote"):
        assert step in steps, result.stderr
    assert steps.index("exporting") < steps.index("exported") < steps.index("verifying") < steps.index("verified")


def history(epochs: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    columns = ("loss_total", "loss_ce", "loss_mse", "loss_align_wsi", "loss_align_omics", "loss_mem", "train_auc",
               "val_auc", "val_loss_ce")
    return {"epoch": np.arange(1, epochs + 1, dtype=np.float64), **{c: rng.random(epochs) for c in columns}}


def test_loss_plot_has_labels_and_the_validation_curves() -> None:
    pytest.importorskip("matplotlib")
    from momkd.report.figures import LOSS_TITLES, loss_curves

    auc_title = "AUC (training slides, validation cases)"
    from momkd.train.runfolder import FoldRecord, RunRecord

    run = RunRecord(path=Path("runs/momkd"), summary={}, config={},
                    folds=[FoldRecord(k, Path(f"fold_{k}"), history(4, k), None) for k in range(2)])
    fig = loss_curves(run)
    assert fig is not None
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    assert set(panels) == {*LOSS_TITLES.values(), auc_title}
    for title, ax in panels.items():
        assert ax.get_xlabel() == "epoch" and ax.get_ylabel() == ("AUC" if title.startswith("AUC") else "loss")
    for title in (LOSS_TITLES["ce"], auc_title):
        labels = [line.get_label() for line in panels[title].get_lines()]
        assert labels == ["fold 0 training", "fold 0 validation", "fold 1 training", "fold 1 validation"]
        validation = panels[title].get_lines()[1]
        assert validation.get_linestyle() == "--"
    ce_validation = panels[LOSS_TITLES["ce"]].get_lines()[1].get_ydata()
    np.testing.assert_allclose(ce_validation, run.folds[0].history["val_loss_ce"])


def test_heatmap_title_shows_the_threshold(toy_model_dir: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    from momkd.manifest import load_manifest
    from momkd.runtime import heatmap
    from momkd.testing.toy import write_slide_folder

    titles: list[str] = []
    real = heatmap.render_heatmap

    def spy(path: Path, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        titles.append(kwargs["title"])
        return real(path, *args, **kwargs)

    monkeypatch.setattr(heatmap, "render_heatmap", spy)
    write_slide_folder(tmp_path / "in", [12], load_manifest(toy_model_dir).model.feature_dim)
    result = runner.invoke(app, ["infer", str(toy_model_dir), str(tmp_path / "in"), "-o", str(tmp_path / "out"),
                                 "--heatmaps", "-q"])
    assert result.exit_code == 0, (tmp_path / "out" / "predictions.csv").read_text()
    threshold = load_manifest(toy_model_dir).model.threshold
    assert len(titles) == 1 and f"threshold {threshold:.3f}" in titles[0], titles
