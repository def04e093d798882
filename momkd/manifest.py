"""The model folder's ``manifest.json``: schema, sha256 of every artifact, atomic write, load + verify.

Shared by ``momkd.export`` (writes it) and ``momkd.runtime`` (checks it before anything runs). Torch-free.

Schema (``format_version`` 1)::

    {
      "format_version": 1,
      "momkd_version": "0.1.0",
      "created": "2025-01-01T00:00:00+00:00",
      "model": {"feature_dim": 1536, "encoder": "uni_v2" | null, "k": 8, "graph_direction": "paper" | "official",
                "graph_library": null | {"scikit-learn": "1.9.1"},   # what built the official graph's k-NN
                "class_names": ["negative", "positive"], "threshold": 0.5, "preset": "paper",
                "folds": [0, 1, 2, 3, 4], "cv_metrics": {...}},
      "onnx": {"file": "model.onnx", "opset": 17, "precision": "fp32",
               "inputs": {...} | [...], "outputs": {...} | [...]},
      "tensorrt": null | {"file": "model.plan", "profiles": [...], "precision": "fp16",
                          "device": "NVIDIA H100", "tensorrt_version": "10.x"},
      "torch": null | {"file": "model.pt"},
      "verification": {...},
      "artifacts": {"model.onnx": "<sha256 hex>", ...}
    }

Every file named by ``onnx.file``, ``tensorrt.file`` and ``torch.file`` must be listed in ``artifacts``;
``load_manifest`` checks that every listed artifact exists and matches its sha256.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from momkd.atomic import write_text
from momkd.errors import ModelFolderError
from momkd.graph import DIRECTIONS as GRAPH_DIRECTIONS

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class ModelInfo:
    feature_dim: int
    encoder: str | None
    k: int
    graph_direction: str
    class_names: tuple[str, str]
    threshold: float
    preset: str
    folds: tuple[int, ...]
    cv_metrics: dict[str, Any] = field(default_factory=dict)
    graph_library: dict[str, str] = field(default_factory=dict)  # {"scikit-learn": version} for official graphs


@dataclass(frozen=True)
class OnnxInfo:
    file: str
    opset: int
    precision: str
    inputs: Any = None
    outputs: Any = None


@dataclass(frozen=True)
class TensorRTInfo:
    file: str
    profiles: Any
    precision: str
    device: str | None
    tensorrt_version: str | None


@dataclass(frozen=True)
class TorchInfo:
    file: str


@dataclass(frozen=True)
class Manifest:
    """A loaded (and, by default, verified) model folder."""

    root: Path
    format_version: int
    momkd_version: str
    created: str
    model: ModelInfo
    onnx: OnnxInfo
    tensorrt: TensorRTInfo | None
    torch: TorchInfo | None
    verification: dict[str, Any]
    artifacts: dict[str, str]
    raw: dict[str, Any]
    sha256: str  # of manifest.json itself: identifies the model a prediction came from

    def path(self, name: str) -> Path:
        """Absolute path of an artifact named relative to the model folder."""
        return self.root / name

    @property
    def onnx_path(self) -> Path:
        return self.path(self.onnx.file)

    @property
    def tensorrt_path(self) -> Path | None:
        return self.path(self.tensorrt.file) if self.tensorrt else None

    @property
    def torch_path(self) -> Path | None:
        return self.path(self.torch.file) if self.torch else None


def _fail(where: Path, message: str) -> ModelFolderError:
    return ModelFolderError(f"{where}: {message}")


def _check_name(where: Path, name: Any, what: str) -> str:
    if not isinstance(name, str) or not name:
        raise _fail(where, f"{what} must be a non-empty file name, got {name!r}")
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or "\\" in name:
        raise _fail(where, f"{what} {name!r} must be a file name relative to the model folder")
    return name


def _get(where: Path, d: dict, key: str, types: type | tuple, section: str, nullable: bool = False) -> Any:
    if key not in d:
        raise _fail(where, f"missing field {section}{key}")
    value = d[key]
    if value is None and nullable:
        return None
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise _fail(where, f"field {section}{key} has the wrong type (bool)")
    if not isinstance(value, types):
        names = "/".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise _fail(where, f"field {section}{key} must be {names}, got {type(value).__name__}")
    return value


def _parse(where: Path, root: Path, raw: Any, sha: str) -> Manifest:
    if not isinstance(raw, dict):
        raise _fail(where, "manifest is not a JSON object")
    version = _get(where, raw, "format_version", int, "")
    if version != FORMAT_VERSION:
        raise _fail(where, f"unsupported format_version {version} (this momkd reads version {FORMAT_VERSION}; "
                           "re-export the model or upgrade momkd)")
    m = _get(where, raw, "model", dict, "")
    class_names = _get(where, m, "class_names", list, "model.")
    if len(class_names) != 2 or not all(isinstance(c, str) and c for c in class_names):
        raise _fail(where, "model.class_names must be two names [negative, positive]")
    direction = _get(where, m, "graph_direction", str, "model.")
    if direction not in GRAPH_DIRECTIONS:
        raise _fail(where, f"model.graph_direction must be one of {GRAPH_DIRECTIONS}, got {direction!r}")
    feature_dim = _get(where, m, "feature_dim", int, "model.")
    k = _get(where, m, "k", int, "model.")
    if feature_dim < 1 or k < 1:
        raise _fail(where, "model.feature_dim and model.k must be positive")
    folds = _get(where, m, "folds", list, "model.")
    if not all(isinstance(f, int) and not isinstance(f, bool) for f in folds):
        raise _fail(where, "model.folds must be a list of integers")
    threshold = float(_get(where, m, "threshold", (int, float), "model."))
    library = _get(where, m, "graph_library", dict, "model.", nullable=True) if "graph_library" in m else None
    if not 0.0 <= threshold <= 1.0:
        raise _fail(where, f"model.threshold must be in [0, 1], got {threshold}")
    model = ModelInfo(
        feature_dim=feature_dim, encoder=_get(where, m, "encoder", str, "model.", nullable=True), k=k,
        graph_direction=direction, class_names=(class_names[0], class_names[1]), threshold=threshold,
        preset=_get(where, m, "preset", str, "model."), folds=tuple(folds),
        cv_metrics=dict(m.get("cv_metrics") or {}),
        graph_library={str(k): str(v) for k, v in (library or {}).items()})

    o = _get(where, raw, "onnx", dict, "")
    onnx = OnnxInfo(file=_check_name(where, _get(where, o, "file", str, "onnx."), "onnx.file"),
                    opset=_get(where, o, "opset", int, "onnx."), precision=_get(where, o, "precision", str, "onnx."),
                    inputs=o.get("inputs"), outputs=o.get("outputs"))
    t = _get(where, raw, "tensorrt", dict, "", nullable=True)
    trt = None
    if t is not None:
        trt = TensorRTInfo(file=_check_name(where, _get(where, t, "file", str, "tensorrt."), "tensorrt.file"),
                           profiles=t.get("profiles"), precision=str(t.get("precision", "fp32")),
                           device=t.get("device"), tensorrt_version=t.get("tensorrt_version"))
    pt = _get(where, raw, "torch", dict, "", nullable=True)
    torch = None if pt is None else TorchInfo(
        file=_check_name(where, _get(where, pt, "file", str, "torch."), "torch.file"))

    artifacts = _get(where, raw, "artifacts", dict, "")
    for name, digest in artifacts.items():
        _check_name(where, name, "artifact")
        if not isinstance(digest, str) or len(digest) != 64:
            raise _fail(where, f"artifacts[{name!r}] is not a sha256 hex digest")
    for section, info in (("onnx", onnx), ("tensorrt", trt), ("torch", torch)):
        if info is not None and info.file not in artifacts:
            raise _fail(where, f"{section}.file {info.file!r} is not listed in artifacts (no checksum)")
    return Manifest(root=root, format_version=version, momkd_version=str(raw.get("momkd_version", "")),
                    created=str(raw.get("created", "")), model=model, onnx=onnx, tensorrt=trt, torch=torch,
                    verification=dict(raw.get("verification") or {}), artifacts=dict(artifacts), raw=raw, sha256=sha)


def verify_artifacts(manifest: Manifest) -> None:
    """Every listed artifact exists and matches its sha256; raises ModelFolderError naming the file."""
    for name, digest in manifest.artifacts.items():
        path = manifest.path(name)
        if not path.is_file():
            raise ModelFolderError(f"{path}: artifact listed in {MANIFEST_NAME} is missing")
        try:
            actual = sha256_file(path)
        except OSError as e:
            raise ModelFolderError(f"{path}: artifact cannot be read ({e.strerror or e})") from None
        if actual != digest.lower():
            raise ModelFolderError(f"{path}: checksum mismatch (sha256 {actual[:12]}…, manifest says {digest[:12]}…); "
                                   "the file was changed or corrupted after export")


def load_manifest(model_dir: str | Path, verify_checksums: bool = True) -> Manifest:
    """Read and validate ``MODEL_DIR/manifest.json``; verify every artifact's sha256 unless told not to.

    Raises ``ModelFolderError`` (one line, naming the folder or file) for a missing folder or manifest,
    unparsable JSON, an unsupported format version, a missing field, a missing artifact or a checksum mismatch.
    """
    root = Path(model_dir)
    if not root.exists():
        raise ModelFolderError(f"{root}: model folder does not exist")
    if not root.is_dir():
        raise ModelFolderError(f"{root}: model folder is not a directory")
    where = root / MANIFEST_NAME
    if not where.is_file():
        raise ModelFolderError(f"{where}: missing (not a momkd model folder; create one with `momkd export`)")
    try:
        data = where.read_bytes()
    except OSError as e:
        raise ModelFolderError(f"{where}: cannot be read ({e.strerror or e})") from None
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        msg = f"line {e.lineno}: {e.msg}" if isinstance(e, json.JSONDecodeError) else "not UTF-8"
        raise ModelFolderError(f"{where}: not valid JSON ({msg})") from None
    manifest = _parse(where, root.resolve(), raw, hashlib.sha256(data).hexdigest())
    if verify_checksums:
        verify_artifacts(manifest)
    return manifest


def write_manifest(model_dir: str | Path, manifest: dict[str, Any]) -> Path:
    """Write ``MODEL_DIR/manifest.json`` atomically and return its path.

    ``artifacts`` is (re)computed: the sha256 of every file named by ``onnx.file``, ``tensorrt.file``,
    ``torch.file`` and of every name already in ``manifest["artifacts"]`` (a list of names or a dict).
    ``format_version``, ``momkd_version`` and ``created`` are filled in when absent. The result is validated
    with the same rules ``load_manifest`` applies, so export cannot write a folder the runtime refuses.
    """
    from momkd import __version__

    root = Path(model_dir)
    out = dict(manifest)
    out.setdefault("format_version", FORMAT_VERSION)
    out.setdefault("momkd_version", __version__)
    out.setdefault("created", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    out.setdefault("tensorrt", None)
    out.setdefault("torch", None)
    out.setdefault("verification", {})
    names: list[str] = list(out.get("artifacts") or [])
    for section in ("onnx", "tensorrt", "torch"):
        info = out.get(section)
        if isinstance(info, dict) and isinstance(info.get("file"), str) and info["file"] not in names:
            names.append(info["file"])
    artifacts = {}
    for name in names:
        _check_name(root / MANIFEST_NAME, name, "artifact")
        path = root / name
        if not path.is_file():
            raise ModelFolderError(f"{path}: artifact to list in {MANIFEST_NAME} does not exist")
        artifacts[name] = sha256_file(path)
    out["artifacts"] = artifacts
    text = json.dumps(out, indent=2, sort_keys=False) + "\n"
    _parse(root / MANIFEST_NAME, root.resolve(), json.loads(text), "")
    root.mkdir(parents=True, exist_ok=True)
    write_text(root / MANIFEST_NAME, text)
    return root / MANIFEST_NAME
