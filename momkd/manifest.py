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
      "reduced_precision": null | {"int8": {"file": "model.int8.onnx" | null, "passed": true, "forced": false,
                                            "requires_isa": ["amx_int8", "avx512_vnni", "avx_vnni"],
                                            "method": {...}, "gates": {...},
                                            "attempts": [...]}},   # optional (momkd.export.gates)
      "verification": {...},
      "artifacts": {"model.onnx": "<sha256 hex>", ...}
    }

Every file named by ``onnx.file``, ``tensorrt.file`` and ``torch.file`` must be listed in ``artifacts``;
``load_manifest`` checks that every listed artifact exists and matches its sha256, and the backends load the
very bytes they checked (``read_artifact``).

The checksums catch accidents, not an edit of ``manifest.json`` itself (a changed threshold changes every
prediction). A site pins the model it approved by the sha256 of ``manifest.json`` (``Manifest.sha256``; export
writes it to ``manifest.json.sha256`` in ``sha256sum`` format and prints it): ``load_manifest(...,
pinned_sha256=HEX)`` refuses a manifest whose bytes hash differently before anything else is read. A pin kept
inside the model folder protects nothing: the site keeps its own copy.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from momkd.atomic import write_text
from momkd.errors import ModelFolderError, MomkdError
from momkd.graph import DIRECTIONS as GRAPH_DIRECTIONS

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
PIN_NAME = MANIFEST_NAME + ".sha256"   # "HEX  manifest.json\n": `sha256sum -c manifest.json.sha256` in the folder
_HEX = frozenset("0123456789abcdef")


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            h.update(block)
    return h.hexdigest()


def _sha256_hex(value: str) -> str | None:
    """``value`` as 64 lowercase hex digits, or None when it is not a sha256 hex digest."""
    digest = value.strip().lower()
    return digest if len(digest) == 64 and set(digest) <= _HEX else None


def resolve_pin(value: str) -> str:
    """A pinned manifest sha256 as a user gives it -> 64 lowercase hex digits.

    ``value`` is the hex digest itself, or ``@FILE`` / the path of a file whose first line starts with it (the
    ``manifest.json.sha256`` that ``momkd export`` writes, or any ``sha256sum`` output). Raises ``MomkdError``
    (one line) when it is neither.
    """
    digest = _sha256_hex(value)
    if digest is not None:
        return digest
    text = value.strip()
    path = Path(text[1:] if text.startswith("@") else text)
    if not text.startswith("@") and not path.is_file():
        raise MomkdError(f"model pin {text!r} is not a sha256 (64 hex digits), @FILE or a .sha256 file")
    try:
        first = path.read_text(encoding="utf-8").strip().split(maxsplit=1)
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise MomkdError(f"{path}: model pin file cannot be read ({reason or e})") from None
    digest = _sha256_hex(first[0].removeprefix("\\")) if first else None
    if digest is None:
        raise MomkdError(f"{path}: model pin file does not start with a sha256 (64 hex digits)")
    return digest


def _check_digest(path: Path, actual: str, expected: str) -> None:
    if actual != expected.lower():
        raise ModelFolderError(f"{path}: checksum mismatch (sha256 {actual[:12]}…, manifest says {expected[:12]}…); "
                               "the file was changed or corrupted after export")


def read_artifact(path: str | Path, sha256: str | None) -> bytes:
    """The bytes of a model artifact, read once and, with ``sha256``, checked against it: a backend loads exactly
    the bytes that were verified (no window between the check and the load in which the file can change).
    Raises ``ModelFolderError`` naming the file when it cannot be read or its checksum differs."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ModelFolderError(f"{path}: cannot be read ({e.strerror or e})") from None
    if sha256 is not None:
        _check_digest(path, hashlib.sha256(data).hexdigest(), sha256)
    return data


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
class ReducedInfo:
    """A reduced-precision twin of ``onnx.file`` (``reduced_precision.<precision>``) and its accuracy gates."""

    precision: str                  # "int8"
    file: str | None                # None: gates failed and the graph was not written
    passed: bool                    # the accuracy gates at export passed
    forced: bool                    # written although the gates failed (--force-precision)
    requires_isa: tuple[str, ...]   # CPU flags any one of which makes it fast (momkd.runtime.cpu)


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
    reduced: dict[str, ReducedInfo] = field(default_factory=dict)  # reduced-precision graphs, by precision

    def path(self, name: str) -> Path:
        """Absolute path of an artifact named relative to the model folder."""
        return self.root / name

    def artifact_sha256(self, name: str) -> str:
        """The sha256 the manifest lists for artifact ``name`` (every file a section names is listed)."""
        return self.artifacts[name]

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

    reduced = _parse_reduced(where, raw)
    artifacts = _get(where, raw, "artifacts", dict, "")
    for name, digest in artifacts.items():
        _check_name(where, name, "artifact")
        if not isinstance(digest, str) or len(digest) != 64:
            raise _fail(where, f"artifacts[{name!r}] is not a sha256 hex digest")
    for section, info in (("onnx", onnx), ("tensorrt", trt), ("torch", torch)):
        if info is not None and info.file not in artifacts:
            raise _fail(where, f"{section}.file {info.file!r} is not listed in artifacts (no checksum)")
    for graph in reduced.values():
        if graph.file is not None and graph.file not in artifacts:
            raise _fail(where, f"reduced_precision.{graph.precision}.file {graph.file!r} is not listed in artifacts "
                               "(no checksum)")
    return Manifest(root=root, format_version=version, momkd_version=str(raw.get("momkd_version", "")),
                    created=str(raw.get("created", "")), model=model, onnx=onnx, tensorrt=trt, torch=torch,
                    verification=dict(raw.get("verification") or {}), artifacts=dict(artifacts), raw=raw, sha256=sha,
                    reduced=reduced)


def _parse_reduced(where: Path, raw: dict[str, Any]) -> dict[str, ReducedInfo]:
    """The optional ``reduced_precision`` section: ``{precision: {"file": name | null, "passed": bool,
    "forced": bool, "requires_isa": [flag, ...], "method": {...}, "gates": {...}}}``."""
    section = _get(where, raw, "reduced_precision", dict, "", nullable=True) if "reduced_precision" in raw else None
    out = {}
    for precision, entry in (section or {}).items():
        prefix = f"reduced_precision.{precision}."
        if not isinstance(entry, dict):
            raise _fail(where, f"field reduced_precision.{precision} must be dict, got {type(entry).__name__}")
        file = _get(where, entry, "file", str, prefix, nullable=True)
        isa = _get(where, entry, "requires_isa", list, prefix)
        out[precision] = ReducedInfo(
            precision=precision, file=None if file is None else _check_name(where, file, prefix + "file"),
            passed=_get(where, entry, "passed", bool, prefix), forced=_get(where, entry, "forced", bool, prefix),
            requires_isa=tuple(str(flag) for flag in isa))
    return out


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
        _check_digest(path, actual, digest)


def load_manifest(model_dir: str | Path, verify_checksums: bool = True, *,
                  pinned_sha256: str | None = None) -> Manifest:
    """Read and validate ``MODEL_DIR/manifest.json``; verify every artifact's sha256 unless told not to.

    ``pinned_sha256``: the sha256 (hex) of the manifest the site approved (see ``resolve_pin``); a manifest
    whose bytes hash differently is refused before it is parsed. The bytes hashed are the bytes parsed.

    Raises ``ModelFolderError`` (one line, naming the folder or file) for a missing folder or manifest,
    unparsable JSON, a manifest that differs from the pinned one, an unsupported format version, a missing
    field, a missing artifact or a checksum mismatch; ``MomkdError`` for a pin that is not a sha256.
    """
    pin = None
    if pinned_sha256 is not None:
        pin = _sha256_hex(pinned_sha256)
        if pin is None:
            raise MomkdError(f"model pin {pinned_sha256!r} is not a sha256 (64 hex digits)")
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
    sha = hashlib.sha256(data).hexdigest()
    if pin is not None and sha != pin:
        raise ModelFolderError(f"{where}: sha256 {sha} differs from the pinned {pin}; this is not the approved "
                               "model, nothing was loaded")
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        msg = f"line {e.lineno}: {e.msg}" if isinstance(e, json.JSONDecodeError) else "not UTF-8"
        raise ModelFolderError(f"{where}: not valid JSON ({msg})") from None
    manifest = _parse(where, root.resolve(), raw, sha)
    if verify_checksums:
        verify_artifacts(manifest)
    return manifest


def write_manifest(model_dir: str | Path, manifest: dict[str, Any]) -> Path:
    """Write ``MODEL_DIR/manifest.json`` atomically (and its sha256 to ``MODEL_DIR/manifest.json.sha256``,
    ``sha256sum`` format) and return its path.

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
    for info in (out.get("reduced_precision") or {}).values():
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
    write_text(root / PIN_NAME, f"{hashlib.sha256(text.encode('utf-8')).hexdigest()}  {MANIFEST_NAME}\n")
    return root / MANIFEST_NAME
