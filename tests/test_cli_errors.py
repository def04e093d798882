"""One error policy for every command (momkd.cli.errors) and CLI choices made from the library's tuples.

Each command's first library call is replaced by one that raises; the command must then end as the policy says:
a MomkdError is one ``error:`` line and exit 2, Ctrl-C one ``interrupted:`` line and exit 130, anything else
one ``internal error`` line and exit 1 (the traceback only with MOMKD_DEBUG set).
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from momkd.cli.errors import DEBUG_ENV, INTERNAL_ERROR, INTERRUPTED, USAGE_ERROR
from momkd.cli.main import app
from momkd.config import GAT_IMPLS, MEMORY_UPDATES, MODELS, PRESETS
from momkd.errors import MomkdError
from momkd.export.folder import FORMATS
from momkd.runtime.backends import BACKENDS
from momkd.runtime.heatmap_writer import VALUES as HEATMAP_VALUES
from momkd.runtime.reader import POOLS

runner = CliRunner()

COHORT = ["--cohort", "{tmp}/cohort.csv", "--features", "{tmp}/features", "--label-col", "y", "--positive", "1"]
# command -> (the library function its body calls first, as "module:name"; its arguments, {tmp} = tmp_path)
COMMANDS: dict[str, tuple[str, list[str]]] = {
    "validate": ("momkd.data.validate:validate_cohort", COHORT),
    "synth": ("momkd.synth:make_synthetic_cohort", ["{tmp}/synth"]),
    "train": ("momkd.train.setup:build_configs", [*COHORT, "--out", "{tmp}/run"]),
    "evaluate": ("momkd.train.setup:load_training_data", ["{tmp}/features", *COHORT, "--out", "{tmp}/eval"]),
    "demo": ("momkd.synth:make_synthetic_cohort", ["--out", "{tmp}/demo"]),
    "infer": ("momkd.runtime.pipeline:run_inference", ["{tmp}/model", "{tmp}/features", "--out", "{tmp}/infer"]),
    "export": ("momkd.cli.cmd_export:export_run", ["{tmp}/run", "--out", "{tmp}/model"]),
    "report": ("momkd.report.build:build_report", ["{tmp}/run", "--out", "{tmp}/report"]),
    "bench": ("momkd.runtime.bench:run_bench", ["{tmp}/model", "-q"]),
    "serve": ("momkd.manifest:load_manifest", ["{tmp}/model"]),
}


def invoke_raising(command: str, error: BaseException, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                   env: dict[str, str] | None = None) -> Any:
    """Run ``momkd COMMAND`` with its first library call raising ``error``."""
    target, args = COMMANDS[command]
    module, name = target.split(":")

    def raising(*args: Any, **kwargs: Any) -> None:
        raise error

    monkeypatch.setattr(importlib.import_module(module), name, raising)
    (tmp_path / "cohort.csv").write_text("case_id,slide_id,y\n")
    (tmp_path / "features").mkdir(exist_ok=True)
    return runner.invoke(app, [command, *(a.format(tmp=tmp_path) for a in args)],
                         env={DEBUG_ENV: "", **(env or {})})


def ending(result: Any) -> list[str]:
    """The lines the error policy printed on stderr (``demo`` prints its step headers before)."""
    return [line for line in result.stderr.splitlines() if line.startswith(("error", "interrupted", "internal error"))]


def test_the_table_covers_every_command() -> None:
    assert sorted(info.name for info in app.registered_commands) == sorted(COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_momkd_error_is_one_line_and_exit_2(command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = invoke_raising(command, MomkdError("no such [plot] thing <here>"), tmp_path, monkeypatch)
    assert result.exit_code == USAGE_ERROR == 2, result.output
    assert ending(result) == ["error: no such [plot] thing <here>"], result.stderr  # markup off: [plot] stays
    assert result.stderr.rstrip().endswith(ending(result)[0])
    assert "Traceback" not in result.output


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_ctrl_c_is_one_line_and_exit_130(command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = invoke_raising(command, KeyboardInterrupt(), tmp_path, monkeypatch)
    assert result.exit_code == INTERRUPTED == 130, result.output
    lines = ending(result)
    assert len(lines) == 1 and re.fullmatch(r"interrupted: .*rerun .+", lines[0]), result.stderr
    assert result.stderr.rstrip().endswith(lines[0])
    if command == "infer":
        assert lines == [f"interrupted: finished rows are in {tmp_path}/infer/predictions.csv; "
                         "rerun with --resume to finish"]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_unexpected_error_is_one_line_and_exit_1(command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = invoke_raising(command, RuntimeError("kaput\n  on two lines"), tmp_path, monkeypatch)
    assert result.exit_code == INTERNAL_ERROR == 1, result.output
    assert ending(result) == [f"internal error: RuntimeError: kaput on two lines "
                                    f"(set {DEBUG_ENV}=1 for a traceback)"], result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_debug_switch_lets_the_exception_through(command: str, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    error = RuntimeError("kaput")
    result = invoke_raising(command, error, tmp_path, monkeypatch, env={DEBUG_ENV: "1"})
    assert result.exit_code == 1 and result.exception is error
    assert "internal error" not in result.output


@pytest.mark.parametrize("command,hint", [
    ("export", "momkd export needs the training and export extras (pip install 'momkd[train,export]')"),
    ("report", "momkd report needs matplotlib (pip install 'momkd[plot]')"),
    ("serve", "momkd serve needs the Triton server and client (pip install 'momkd[serve]')"),
])
def test_missing_extra_is_a_usage_error_with_the_install_hint(command: str, hint: str, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    result = invoke_raising(command, ModuleNotFoundError("No module named 'x'"), tmp_path, monkeypatch)
    assert result.exit_code == 2, result.output
    assert ending(result) == [f"error: {hint}: No module named 'x'"], result.stderr


def test_import_error_without_a_hint_is_internal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = invoke_raising("infer", ImportError("cannot import name 'y'"), tmp_path, monkeypatch)
    assert result.exit_code == 1 and ending(result)[0].startswith("internal error: ImportError:")


@pytest.mark.parametrize("debug", ["", "1"])
def test_traceback_is_printed_only_with_the_debug_switch(debug: str, tmp_path: Path) -> None:
    code = ("import momkd.synth\n"
            "def broken(*args, **kwargs): raise RuntimeError('kaput')\n"
            "momkd.synth.make_synthetic_cohort = broken\n"
            "from momkd.cli.main import app\n"
            "app(prog_name='momkd')\n")
    result = subprocess.run([sys.executable, "-c", code, "synth", str(tmp_path / "s")], capture_output=True,
                            text=True, timeout=120, env={**os.environ, DEBUG_ENV: debug})
    assert result.returncode == 1, result.stderr
    if debug:
        assert "Traceback" in result.stderr and "RuntimeError: kaput" in result.stderr
    else:
        assert result.stderr.strip() == f"internal error: RuntimeError: kaput (set {DEBUG_ENV}=1 for a traceback)"


@pytest.mark.parametrize("command,option,choices", [
    ("train", "--preset", PRESETS),
    ("train", "--model", MODELS),
    ("train", "--memory-update", MEMORY_UPDATES),
    ("train", "--gat-impl", GAT_IMPLS),
    ("export", "--format", FORMATS),
    ("infer", "--backend", BACKENDS),
    ("infer", "--reader", POOLS),
    ("infer", "--heatmap-value", tuple(HEATMAP_VALUES)),
])
def test_help_lists_the_library_choices(command: str, option: str, choices: tuple[str, ...]) -> None:
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    listed = re.search(rf"{option}\s+<([^>]+)>", result.stdout)
    assert listed is not None and tuple(listed.group(1).split("|")) == choices, result.stdout
