"""Every command without its optional extra (PyTorch, onnx, matplotlib) ends on one line that names the extra to
install, exactly as ``pip install`` takes it, and exit 2: no traceback. The CLI runs in a subprocess in which the
missing package cannot be imported (``sys.modules[name] = None``, as tests/test_lean_tier.py hides torch)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

RUN_CLI = "import sys; {block}\nfrom momkd.cli.main import app\napp(prog_name='momkd')\n"


def run_cli(blocked: tuple[str, ...], *args: str) -> subprocess.CompletedProcess:
    block = "; ".join(f"sys.modules[{name!r}] = None" for name in blocked)
    return subprocess.run([sys.executable, "-c", RUN_CLI.format(block=block), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture()
def cohort_files(tmp_path: Path) -> dict[str, Path]:
    """Paths that pass the options' existence checks (the command stops at its first heavy import)."""
    (tmp_path / "cohort.csv").write_text("case_id,slide_id,label\n")
    for folder in ("features", "run"):
        (tmp_path / folder).mkdir()
    return {"cohort": tmp_path / "cohort.csv", "features": tmp_path / "features", "run": tmp_path / "run",
            "out": tmp_path / "out"}


def data_args(files: dict[str, Path]) -> list[str]:
    return ["--cohort", str(files["cohort"]), "--features", str(files["features"]), "--label-col", "label",
            "--positive", "pos"]


COMMANDS = {  # command -> (packages hidden, arguments, the install line the message must hold)
    "train": (("torch",), lambda f: ["train", *data_args(f), "--out", f["out"]], "pip install 'momkd[train]'"),
    "evaluate": (("torch",), lambda f: ["evaluate", f["run"], *data_args(f), "--out", f["out"]],
                 "pip install 'momkd[train]'"),
    "demo": (("torch",), lambda f: ["demo", "--out", f["out"]], "pip install 'momkd[train,export]'"),
    "export": (("torch",), lambda f: ["export", f["run"], "--out", f["out"]], "pip install 'momkd[train,export]'"),
    "report": (("matplotlib",), lambda f: ["report", f["run"], "--out", f["out"]], "pip install 'momkd[plot]'"),
}


@pytest.mark.parametrize("case", list(COMMANDS))
def test_command_without_its_extra_names_the_install_line(case: str, cohort_files: dict[str, Path]) -> None:
    blocked, args, install = COMMANDS[case]
    result = run_cli(blocked, *args(cohort_files))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: momkd "), result.stderr
    assert install in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not cohort_files["out"].exists()


def test_infer_heatmaps_without_matplotlib_keeps_the_extra_name(tmp_path: Path) -> None:
    from momkd.testing.toy import build_toy_model_dir, write_slide_folder

    build_toy_model_dir(tmp_path / "model", feature_dim=8)
    write_slide_folder(tmp_path / "in", [9], 8)
    result = run_cli(("torch", "matplotlib"), "infer", tmp_path / "model", tmp_path / "in", "--out", tmp_path / "out",
                     "--heatmaps")
    assert result.returncode == 2, result.stderr
    assert "pip install momkd[plot]" in result.stderr or "pip install 'momkd[plot]'" in result.stderr, result.stderr


def test_help_keeps_the_extra_name() -> None:
    """`[plot]` is not read as markup in the help (rich help on a terminal, plain help in a pipe)."""
    code = ("import sys\nimport momkd.cli.main as m\nm.help_on_terminal = lambda: {tty}\n"
            "sys.argv = ['momkd', 'infer', '--help']\nm.app(prog_name='momkd')\n")
    for tty in (True, False):
        result = subprocess.run([sys.executable, "-c", code.format(tty=tty)], capture_output=True, text=True,
                                timeout=120, env={**os.environ, "COLUMNS": "250"})
        assert result.returncode == 0, result.stderr
        assert "momkd[plot]" in result.stdout, result.stdout
