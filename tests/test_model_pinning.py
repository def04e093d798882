"""Trusting a model folder (issue 12 §4): a pinned manifest hash checked before anything loads, backends that
load the very bytes they verified, ONNX external data refused, and ``auto`` never running TorchScript."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from momkd.cli.main import app
from momkd.errors import ModelFolderError, MomkdError
from momkd.manifest import MANIFEST_NAME, PIN_NAME, load_manifest, resolve_pin
from momkd.runtime import backends
from momkd.runtime.backends import OnnxRuntimeBackend, TensorRTBackend, onnx_external_data, select_backend
from momkd.testing.toy import build_toy_model_dir, write_slide_folder

DIM = 8
runner = CliRunner()


@pytest.fixture()
def model_dir(toy_model_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the session's toy model folder (tests edit it)."""
    return Path(shutil.copytree(toy_model_dir, tmp_path / "model"))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    return lines[0]


# ----------------------------------------------------------------------------- the pin file and load_manifest
def test_write_manifest_writes_a_sha256sum_pin_of_the_manifest(model_dir: Path) -> None:
    pin = (model_dir / PIN_NAME).read_text()
    assert pin == f"{_sha(model_dir / MANIFEST_NAME)}  {MANIFEST_NAME}\n"
    assert load_manifest(model_dir).sha256 == _sha(model_dir / MANIFEST_NAME)
    if shutil.which("sha256sum"):
        subprocess.run(["sha256sum", "--check", "--quiet", PIN_NAME], cwd=model_dir, check=True)


def test_pinned_load_accepts_the_approved_manifest_only(model_dir: Path) -> None:
    approved = _sha(model_dir / MANIFEST_NAME)
    assert load_manifest(model_dir, pinned_sha256=approved.upper()).sha256 == approved
    raw = json.loads((model_dir / MANIFEST_NAME).read_text())
    raw["model"]["threshold"] = 0.1                 # an edit the artifact checksums cannot see
    (model_dir / MANIFEST_NAME).write_text(json.dumps(raw))
    load_manifest(model_dir)                         # unpinned: still loads, every prediction changes
    with pytest.raises(ModelFolderError) as ei:
        load_manifest(model_dir, pinned_sha256=approved)
    message = str(ei.value)
    assert approved in message and _sha(model_dir / MANIFEST_NAME) in message and "\n" not in message
    assert message.startswith(str(model_dir / MANIFEST_NAME))


def test_pin_is_checked_before_the_manifest_is_parsed(model_dir: Path) -> None:
    (model_dir / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ModelFolderError, match="differs from the pinned"):
        load_manifest(model_dir, pinned_sha256="0" * 64)
    with pytest.raises(MomkdError, match="not a sha256"):
        load_manifest(model_dir, pinned_sha256="abc")


def test_resolve_pin_accepts_hex_at_file_and_sha256_files(model_dir: Path, tmp_path: Path) -> None:
    digest = _sha(model_dir / MANIFEST_NAME)
    kept = tmp_path / "approved.sha256"
    shutil.copy(model_dir / PIN_NAME, kept)
    assert resolve_pin(f"  {digest.upper()} ") == digest
    assert resolve_pin(str(kept)) == digest == resolve_pin(f"@{kept}")
    with pytest.raises(MomkdError, match="not a sha256"):
        resolve_pin("deadbeef")
    with pytest.raises(MomkdError, match="cannot be read"):
        resolve_pin(f"@{tmp_path / 'absent.sha256'}")
    (tmp_path / "junk.sha256").write_text("hello world\n")
    with pytest.raises(MomkdError, match="does not start with a sha256"):
        resolve_pin(str(tmp_path / "junk.sha256"))


def test_infer_refuses_an_unpinned_manifest_in_one_line(model_dir: Path, tmp_path: Path) -> None:
    write_slide_folder(tmp_path / "in", [5, 9], DIM)
    approved = _sha(model_dir / MANIFEST_NAME)
    raw = json.loads((model_dir / MANIFEST_NAME).read_text())
    raw["model"]["k"] = 3
    (model_dir / MANIFEST_NAME).write_text(json.dumps(raw))
    result = runner.invoke(app, ["infer", str(model_dir), str(tmp_path / "in"), "--out", str(tmp_path / "out"),
                                 "--model-sha256", approved])
    line = _one_line_error(result)
    assert approved in line and _sha(model_dir / MANIFEST_NAME) in line
    assert not (tmp_path / "out").exists()          # nothing was loaded or written
    result = runner.invoke(app, ["infer", str(model_dir), str(tmp_path / "in"), "--out", str(tmp_path / "out")],
                           env={"MOMKD_MODEL_SHA256": approved})
    assert "differs from the pinned" in _one_line_error(result)
    result = runner.invoke(app, ["infer", str(model_dir), str(tmp_path / "in"), "--out", str(tmp_path / "out"),
                                 "--model-sha256", "not-a-hash"])
    assert "not a sha256" in _one_line_error(result)


def test_infer_with_the_right_pin_runs_and_records_the_manifest_hash(model_dir: Path, tmp_path: Path) -> None:
    write_slide_folder(tmp_path / "in", [5, 9], DIM)
    kept = tmp_path / "approved.sha256"
    shutil.copy(model_dir / PIN_NAME, kept)
    result = runner.invoke(app, ["infer", str(model_dir), str(tmp_path / "in"), "--out", str(tmp_path / "out"),
                                 "--model-sha256", f"@{kept}", "--quiet"])
    assert result.exit_code == 0, result.output
    run_info = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run_info["model_manifest_sha256"] == _sha(model_dir / MANIFEST_NAME)


# ----------------------------------------------------------------------------- verified bytes, external data
def test_backends_check_the_bytes_they_load(model_dir: Path) -> None:
    manifest = load_manifest(model_dir)               # verified here ...
    with (model_dir / "model.onnx").open("r+b") as f:  # ... and changed before the backend starts
        f.seek(40)
        byte = f.read(1)
        f.seek(40)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(ModelFolderError, match="checksum mismatch"):
        select_backend("onnxruntime", "cpu", manifest)
    with pytest.raises(ModelFolderError, match="checksum mismatch"):
        select_backend("auto", "cpu", manifest)
    with pytest.raises(ModelFolderError, match="checksum mismatch"):
        OnnxRuntimeBackend(model_dir / "model.onnx", "cpu", sha256="0" * 64)


def test_tensorrt_backend_checks_the_plan_bytes(tmp_path: Path, monkeypatch) -> None:
    class Logger:
        WARNING = 2

        def __init__(self, level: int) -> None:
            self.level = level

    def runtime(logger: Logger) -> object:
        return types.SimpleNamespace(deserialize_cuda_engine=lambda plan: pytest.fail("unverified plan loaded"))

    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(Logger=Logger, Runtime=runtime))
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"engine bytes")
    with pytest.raises(ModelFolderError, match="model.plan: checksum mismatch"):
        TensorRTBackend(plan, "cuda", device_api=object(), sha256=hashlib.sha256(b"other bytes").hexdigest())


def test_torch_backend_checks_the_torchscript_bytes(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    build_toy_model_dir(tmp_path / "m", feature_dim=DIM, torchscript=True)
    manifest = load_manifest(tmp_path / "m")
    assert select_backend("torch", "cpu", manifest).name == "torch"   # loaded from the verified bytes
    (tmp_path / "m" / "model.pt").write_bytes((tmp_path / "m" / "model.pt").read_bytes() + b"\0")
    with pytest.raises(ModelFolderError, match="model.pt: checksum mismatch"):
        select_backend("torch", "cpu", manifest)


def _with_external_weights(model_dir: Path) -> Path:
    """Rewrite the folder's model.onnx to keep its initializers in ``weights.bin`` (re-listed in the manifest)."""
    onnx = pytest.importorskip("onnx")
    from momkd.manifest import write_manifest

    model = onnx.load(model_dir / "model.onnx")
    onnx.save_model(model, model_dir / "model.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    raw = json.loads((model_dir / MANIFEST_NAME).read_text())
    raw.pop("artifacts")
    write_manifest(model_dir, raw)
    return model_dir / "model.onnx"


def test_onnx_external_data_is_refused_even_where_onnxruntime_would_find_it(model_dir: Path, monkeypatch) -> None:
    assert onnx_external_data((model_dir / "model.onnx").read_bytes()) == []
    path = _with_external_weights(model_dir)
    assert onnx_external_data(path.read_bytes()) == ["weights.bin"]
    monkeypatch.chdir(model_dir)                      # from bytes, onnxruntime resolves external data here
    manifest = load_manifest(model_dir)               # weights.bin is not an artifact: no checksum covers it
    assert "weights.bin" not in manifest.artifacts
    with pytest.raises(ModelFolderError) as ei:
        select_backend("onnxruntime", "cpu", manifest)
    assert str(ei.value) == (f"{path}: references external data (weights.bin) not listed in manifest.json; momkd "
                             "loads single-file ONNX graphs only, re-export the model")


def test_infer_cli_refuses_external_data_in_one_line(model_dir: Path, tmp_path: Path) -> None:
    _with_external_weights(model_dir)
    write_slide_folder(tmp_path / "in", [5], DIM)
    result = runner.invoke(app, ["infer", str(model_dir), str(tmp_path / "in"), "--out", str(tmp_path / "out"),
                                 "--device", "cpu"])
    assert "references external data (weights.bin)" in _one_line_error(result)


def test_onnx_that_is_not_a_protobuf_is_refused(tmp_path: Path) -> None:
    (tmp_path / "junk.onnx").write_bytes(b"\xff\xff\xff")
    with pytest.raises(ModelFolderError, match="not an ONNX protobuf message"):
        OnnxRuntimeBackend(tmp_path / "junk.onnx")


# ----------------------------------------------------------------------------- auto never runs TorchScript
def test_auto_never_builds_the_torch_backend(tmp_path: Path, monkeypatch) -> None:
    build_toy_model_dir(tmp_path / "m", feature_dim=DIM, torchscript=backends.torch_importable())
    raw = json.loads((tmp_path / "m" / MANIFEST_NAME).read_text())
    if raw["torch"] is None:                          # without PyTorch: a listed stand-in file is enough here
        (tmp_path / "m" / "model.pt").write_bytes(b"torchscript archive")
        from momkd.manifest import write_manifest

        raw["torch"] = {"file": "model.pt"}
        raw.pop("artifacts")
        write_manifest(tmp_path / "m", raw)
    manifest = load_manifest(tmp_path / "m")
    # a CUDA box where torch is the only CUDA backend: auto used to pick it
    monkeypatch.setattr(backends, "_cuda_driver_present", lambda: True)
    monkeypatch.setattr(backends, "torch_importable", lambda: True)
    monkeypatch.setattr(backends, "importable", lambda module: module != "tensorrt")
    monkeypatch.setattr(backends, "TorchBackend", lambda *a, **k: pytest.fail("auto built the torch backend"))
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    notes: list[str] = []
    be = select_backend("auto", None, manifest, log=notes.append)
    assert (be.name, be.device) == ("onnxruntime", "cpu")
    assert notes and "torch" not in notes[0]
    with pytest.raises(backends.BackendError, match="no CUDA backend"):
        select_backend("auto", "cuda", manifest)


def test_torch_backend_is_opt_in_and_the_help_says_why() -> None:
    result = runner.invoke(app, ["infer", "--help"], env={"COLUMNS": "400", "TERM": "dumb"})
    assert result.exit_code == 0
    assert "TorchScript" in result.output and "which is code" in result.output


def test_verified_backend_runs(model_dir: Path) -> None:
    """The ONNX graph loaded from bytes still runs the momkd contract."""
    be = select_backend("onnxruntime", "cpu", load_manifest(model_dir))
    features = np.zeros((3, DIM), np.float32)
    neighbors = np.full((3, 2), -1, np.int64)
    out = be.run(features, neighbors, np.array([0, 3], np.int64))
    assert out["probability"].shape == (1,) and np.isfinite(out["probability"]).all()


@pytest.mark.slow   # a real export (about 20 s on 2 CPU cores)
def test_export_prints_and_writes_the_manifest_hash(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    from momkd.export.synthetic import random_run

    run = random_run(tmp_path / "run", "paper", in_dim=DIM, dims={"dim": 8})
    result = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "model")])
    assert result.exit_code == 0, result.output
    digest = _sha(tmp_path / "model" / MANIFEST_NAME)
    assert f"{digest}  {tmp_path / 'model' / MANIFEST_NAME}" in result.stdout.splitlines()
    assert (tmp_path / "model" / PIN_NAME).read_text() == f"{digest}  {MANIFEST_NAME}\n"
    assert resolve_pin(str(tmp_path / "model" / PIN_NAME)) == load_manifest(tmp_path / "model").sha256 == digest
