"""`momkd infer`: exit codes (0 all ok, 1 some slides failed, 2 usage/model error), one-line errors and no
traceback, the summary line, and the whole command in a subprocess with PyTorch blocked."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
from typer.testing import CliRunner

from momkd.cli.main import app
from momkd.testing.toy import write_slide_folder

DIM = 8
runner = CliRunner()


@pytest.fixture()
def mixed(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    write_slide_folder(folder, [6, 11, 3], DIM)
    (folder / "broken.h5").write_bytes(b"\x89HDF\r\n\x1a\n truncated")
    write_slide_folder(folder, [4], DIM + 1, prefix="wide")
    with h5py.File(folder / "empty.h5", "w") as f:
        f.create_dataset("features", shape=(0, DIM), dtype="float32")
        f.create_dataset("coords", shape=(0, 2), dtype="int64")
    return folder


def read_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "predictions.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_mixed_folder_exit_1_one_row_per_file(toy_model_dir: Path, mixed: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = runner.invoke(app, ["infer", str(toy_model_dir), str(mixed), "--out", str(out), "--batch-patches", "10"])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert "3 ok, 3 failed" in result.stdout and "slides/s (onnxruntime, cpu)" in result.stdout
    got = {r["file"]: r for r in read_rows(out)}
    assert sorted(got) == ["broken.h5", "empty.h5", "slide_000.h5", "slide_001.h5", "slide_002.h5", "wide_000.h5"]
    assert got["broken.h5"]["error"].startswith("unreadable:")
    assert got["empty.h5"]["error"].startswith("empty:")
    assert got["wide_000.h5"]["error"].startswith("feature_dim:")
    assert {got[f"slide_00{i}.h5"]["prediction"] for i in range(3)} <= {"low", "high"}
    assert "broken.h5" in result.stderr        # each failure is also reported as it happens


def test_all_ok_exit_0_and_resume(toy_model_dir: Path, tmp_path: Path) -> None:
    write_slide_folder(tmp_path / "in", [5, 7], DIM)
    args = ["infer", str(toy_model_dir), str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--quiet"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert first.stdout.startswith("2 ok, 0 failed")
    again = runner.invoke(app, args + ["--resume"])
    assert again.exit_code == 0 and "2 kept from an earlier run" in again.stdout
    assert len(read_rows(tmp_path / "out")) == 2


@pytest.mark.parametrize("case", ["missing_model", "tampered", "out_inside_input", "missing_folder", "bad_backend",
                                  "tensorrt_here", "bad_device"])
def test_usage_and_model_errors_exit_2_without_traceback(toy_model_dir: Path, tmp_path: Path, case: str) -> None:
    import shutil

    folder = tmp_path / "in"
    write_slide_folder(folder, [5], DIM)
    model, out, extra = toy_model_dir, tmp_path / "out", []
    if case == "missing_model":
        model = tmp_path / "nope"
    elif case == "tampered":
        model = tmp_path / "model"
        shutil.copytree(toy_model_dir, model)
        (model / "model.onnx").write_bytes(b"x" + (model / "model.onnx").read_bytes())
    elif case == "out_inside_input":
        out = folder / "out"
    elif case == "missing_folder":
        folder = tmp_path / "nowhere"
    elif case == "bad_backend":
        extra = ["--backend", "tflite"]
    elif case == "tensorrt_here":
        extra = ["--backend", "tensorrt"]
    elif case == "bad_device":
        extra = ["--device", "tpu"]
    result = runner.invoke(app, ["infer", str(model), str(folder), "--out", str(out), *extra])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    if case != "bad_backend":                   # (typer's own usage message is a box)
        errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1, result.stderr
    assert not (folder / "out").exists()


def test_help_lists_the_options() -> None:
    result = runner.invoke(app, ["infer", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for opt in ("--out", "--backend", "--device", "--recursive", "--batch-patches", "--workers", "--resume",
                "--save-attention", "--quiet"):
        assert opt in result.stdout


def test_subprocess_with_torch_blocked(toy_model_dir: Path, mixed: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = ("import sys; sys.modules['torch'] = None; sys.modules['tensorrt'] = None; "
            "from momkd.cli.main import app; app()")
    result = subprocess.run([sys.executable, "-c", code, "infer", str(toy_model_dir), str(mixed), "--out", str(out),
                             "--save-attention", "--workers", "2"],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "MOMKD_DEBUG": ""})
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    assert result.stdout.startswith("3 ok, 3 failed")
    rows = read_rows(out)
    assert len(rows) == 6 and sum(r["status"] == "ok" for r in rows) == 3
    assert sorted(p.name for p in (out / "attention").iterdir()) == ["slide_000.h5", "slide_001.h5", "slide_002.h5"]
    assert sorted(p.name for p in mixed.iterdir()) == ["broken.h5", "empty.h5", "slide_000.h5", "slide_001.h5",
                                                      "slide_002.h5", "wide_000.h5"]   # input untouched
