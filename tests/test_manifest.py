"""Model-folder manifest: schema round trip, checksums, and every ModelFolderError (one line, naming the file)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from momkd.errors import ModelFolderError
from momkd.manifest import FORMAT_VERSION, MANIFEST_NAME, load_manifest, sha256_file, write_manifest


def _manifest(**over) -> dict:
    m = {
        "model": {"feature_dim": 32, "encoder": "uni_v2", "k": 8, "graph_direction": "paper",
                  "class_names": ["HER2-", "HER2+"], "threshold": 0.42, "preset": "paper", "folds": [0, 1, 2],
                  "cv_metrics": {"auc": 0.8}},
        "onnx": {"file": "model.onnx", "opset": 17, "precision": "fp32", "inputs": {}, "outputs": {}},
        "tensorrt": None,
        "torch": {"file": "model.pt"},
        "verification": {"max_abs_diff": 1e-6},
    }
    m.update(over)
    return m


@pytest.fixture()
def model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "model.onnx").write_bytes(b"onnx bytes")
    (d / "model.pt").write_bytes(b"torchscript bytes")
    write_manifest(d, _manifest())
    return d


def _raw(d: Path) -> dict:
    return json.loads((d / MANIFEST_NAME).read_text())


def _rewrite(d: Path, raw: dict) -> None:
    (d / MANIFEST_NAME).write_text(json.dumps(raw))


def _error(d: Path) -> str:
    with pytest.raises(ModelFolderError) as ei:
        load_manifest(d)
    msg = str(ei.value)
    assert "\n" not in msg
    return msg


def test_round_trip(model_dir: Path) -> None:
    m = load_manifest(model_dir)
    raw = _raw(model_dir)
    assert m.format_version == raw["format_version"] == FORMAT_VERSION
    assert m.model.feature_dim == 32 and m.model.k == 8 and m.model.graph_direction == "paper"
    assert m.model.class_names == ("HER2-", "HER2+") and m.model.threshold == pytest.approx(0.42)
    assert m.model.folds == (0, 1, 2) and m.model.cv_metrics == {"auc": 0.8} and m.model.encoder == "uni_v2"
    assert m.onnx.file == "model.onnx" and m.onnx.opset == 17 and m.onnx_path == model_dir.resolve() / "model.onnx"
    assert m.tensorrt is None and m.torch is not None and m.torch_path.name == "model.pt"
    assert m.artifacts == {"model.onnx": sha256_file(model_dir / "model.onnx"),
                           "model.pt": sha256_file(model_dir / "model.pt")}
    assert raw["momkd_version"] and raw["created"] and len(m.sha256) == 64


def test_sha256_file(tmp_path: Path) -> None:
    p = tmp_path / "x"
    p.write_bytes(b"abc")
    assert sha256_file(p) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_tampered_artifact_is_named(model_dir: Path) -> None:
    (model_dir / "model.onnx").write_bytes(b"onnx bytes, changed")
    msg = _error(model_dir)
    assert "model.onnx" in msg and "checksum mismatch" in msg
    load_manifest(model_dir, verify_checksums=False)   # explicitly unverified load still parses


def test_missing_artifact(model_dir: Path) -> None:
    (model_dir / "model.pt").unlink()
    msg = _error(model_dir)
    assert "model.pt" in msg and "missing" in msg


def test_missing_folder_and_manifest(tmp_path: Path) -> None:
    assert "does not exist" in _error(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    assert "not a directory" in _error(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    assert MANIFEST_NAME in _error(tmp_path / "empty")


def test_unparsable_json(model_dir: Path) -> None:
    (model_dir / MANIFEST_NAME).write_text('{"format_version": 1,')
    assert "not valid JSON" in _error(model_dir)
    (model_dir / MANIFEST_NAME).write_bytes(b"\xff\xfe")
    assert "not valid JSON" in _error(model_dir)
    (model_dir / MANIFEST_NAME).write_text("[1, 2]")
    assert "not a JSON object" in _error(model_dir)


def test_unsupported_format_version(model_dir: Path) -> None:
    raw = _raw(model_dir)
    raw["format_version"] = 99
    _rewrite(model_dir, raw)
    assert "unsupported format_version 99" in _error(model_dir)


@pytest.mark.parametrize("mutate, expected", [
    (lambda r: r["model"].pop("feature_dim"), "model.feature_dim"),
    (lambda r: r["model"].update(feature_dim="32"), "model.feature_dim"),
    (lambda r: r["model"].update(class_names=["only-one"]), "class_names"),
    (lambda r: r["model"].update(graph_direction="sideways"), "graph_direction"),
    (lambda r: r["model"].update(threshold=1.5), "threshold"),
    (lambda r: r.pop("onnx"), "onnx"),
    (lambda r: r["onnx"].update(file="../elsewhere.onnx"), "relative"),
    (lambda r: r["artifacts"].pop("model.onnx"), "not listed in artifacts"),
    (lambda r: r["artifacts"].update({"model.onnx": "abc"}), "sha256"),
])
def test_schema_errors(model_dir: Path, mutate, expected: str) -> None:
    raw = _raw(model_dir)
    mutate(raw)
    _rewrite(model_dir, raw)
    assert expected in _error(model_dir)


def test_write_manifest_refuses_what_load_refuses(tmp_path: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    with pytest.raises(ModelFolderError, match="does not exist"):
        write_manifest(d, _manifest())                                  # artifacts not written yet
    (d / "model.onnx").write_bytes(b"x")
    (d / "model.pt").write_bytes(b"y")
    with pytest.raises(ModelFolderError, match="graph_direction"):
        write_manifest(d, _manifest(model={**_manifest()["model"], "graph_direction": "up"}))
    assert not (d / MANIFEST_NAME).exists()
    write_manifest(d, _manifest(artifacts=["model.pt"], torch=None))     # extra artifacts listed by name
    assert set(load_manifest(d).artifacts) == {"model.onnx", "model.pt"}
    assert not list(d.glob(".manifest.*"))                              # no temp file left behind


def test_manifest_is_torch_free() -> None:
    code = "import sys; sys.modules['torch'] = None; import momkd.manifest"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
