"""Triton model repositories: the ``config.pbtxt`` text of the served model and the folder ``momkd serve`` loads.

A repository is ``REPO/{model_name}/config.pbtxt`` plus a version folder ``REPO/{model_name}/1/``; for the
Python backend the version folder holds ``model.py``, here an import of the installed package's model class
(:func:`model_py`).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import momkd

from momkd.manifest import Manifest
from momkd.runtime.pipeline import DEFAULT_BATCH_PATCHES
from momkd.runtime.remote import (ATTENTION, COORDS, DEFAULT_MODEL_NAME, FEATURES, FEATURES_FP16,
                                  PARAM_MANIFEST_SHA256, PATCH_SCORE, PREDICTION, PROBABILITY)

CONFIG_NAME = "config.pbtxt"
VERSION = "1"
SERVED_MODEL_CLASS = "momkd.serve.triton_model:TritonPythonModel"


def import_paths() -> list[str]:
    """This interpreter's import path, the folder holding the ``momkd`` package first (what a Python-backend stub
    of this machine needs to import the installed momkd and its dependencies)."""
    package_root = str(Path(momkd.__file__).resolve().parent.parent)
    return list(dict.fromkeys([package_root] + [p for p in sys.path if p]))


def model_py(model_class: str, paths: Sequence[str] = ()) -> str:
    """A Python-backend ``model.py`` exposing ``model_class`` ("module:Class") as ``TritonPythonModel``.

    ``paths`` go first on the stub's ``sys.path`` (through ``site.addsitedir``, so ``.pth`` files and editable
    installs in them work): the Python-backend stub ignores ``PYTHONPATH`` and starts with the base interpreter's
    path only, which has neither a virtual environment's packages nor an editable checkout."""
    module, name = model_class.split(":")
    lines = []
    if paths:
        lines += ["import site", "import sys", "", "_base = list(sys.path)", f"for _path in {list(paths)!r}:",
                  "    site.addsitedir(_path)", "sys.path[:] = [p for p in sys.path if p not in _base] + _base", ""]
    lines.append(f"from {module} import {name} as TritonPythonModel  # noqa: E402,F401 - the Python-backend entry")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a Triton model config: ``dims`` without a batch dimension (-1 = any size)."""

    name: str
    data_type: str                  # TYPE_FP32, TYPE_INT64, ...
    dims: tuple[int, ...]
    optional: bool = False
    allow_ragged_batch: bool = False

    def pbtxt(self) -> str:
        extra = (" optional: true" if self.optional else "") + (
            " allow_ragged_batch: true" if self.allow_ragged_batch else "")
        return (f'  {{ name: "{self.name}" data_type: {self.data_type} dims: [ {", ".join(map(str, self.dims))} ]'
                f'{extra} }}')


def pbtxt_string(value: str) -> str:
    """A protobuf text-format string literal."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def model_config_text(name: str, *, backend: str | None = None, platform: str | None = None,
                      max_batch_size: int = 0, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                      parameters: Mapping[str, str] | None = None, body: str = "") -> str:
    """A ``config.pbtxt``: name, backend or platform, max_batch_size, inputs, outputs, then ``body`` (more fields:
    dynamic_batching, instance_group, ensemble_scheduling, ...) and string ``parameters``."""
    lines = [f"name: {pbtxt_string(name)}"]
    if backend is not None:
        lines.append(f"backend: {pbtxt_string(backend)}")
    if platform is not None:
        lines.append(f"platform: {pbtxt_string(platform)}")
    lines.append(f"max_batch_size: {max_batch_size}")
    lines += ["input [", ",\n".join(t.pbtxt() for t in inputs), "]"]
    lines += ["output [", ",\n".join(t.pbtxt() for t in outputs), "]"]
    if body:
        lines.append(body.strip("\n"))
    for key, value in (parameters or {}).items():
        lines.append(f"parameters {{ key: {pbtxt_string(key)} value: {{ string_value: {pbtxt_string(value)} }} }}")
    return "\n".join(lines) + "\n"


def request_inputs(feature_dim: int) -> list[TensorSpec]:
    """One slide per request (batch dimension 1): features (1, N, D) FP32 or features_fp16 (1, N, D) FP16 (one
    of them), coords (1, N, 2); ragged, so requests of any N batch together."""
    return [TensorSpec(FEATURES, "TYPE_FP32", (-1, feature_dim), optional=True, allow_ragged_batch=True),
            TensorSpec(FEATURES_FP16, "TYPE_FP16", (-1, feature_dim), optional=True, allow_ragged_batch=True),
            TensorSpec(COORDS, "TYPE_INT64", (-1, 2), allow_ragged_batch=True)]


def request_outputs() -> list[TensorSpec]:
    """probability (1, 1), prediction (1, 1), attention (1, N), patch_score (1, N)."""
    return [TensorSpec(PROBABILITY, "TYPE_FP32", (1,)), TensorSpec(PREDICTION, "TYPE_INT32", (1,)),
            TensorSpec(ATTENTION, "TYPE_FP32", (-1,)), TensorSpec(PATCH_SCORE, "TYPE_FP32", (-1,))]


@dataclass(frozen=True)
class ServedModel:
    """How ``momkd serve`` runs one model folder (see ``momkd serve --help``)."""

    name: str = DEFAULT_MODEL_NAME
    max_rows: int = DEFAULT_BATCH_PATCHES     # row budget of one pack
    max_slides: int = 64                      # most requests (slides) the dynamic batcher hands over at once
    instances: int = 1                        # model instances (each its own stub process and backend)
    max_queue_delay_us: int = 2000            # how long the dynamic batcher waits to fill a pack
    backend: str = "auto"                     # the runtime backend inside the model (as `momkd infer --backend`)
    device: str | None = None
    threads: int | None = None


def serving_config(manifest: Manifest, served: ServedModel) -> str:
    """The Python-backend model's config: dynamic (ragged) batching of one-slide requests, up to
    ``served.max_slides`` at once; the model folder and its manifest sha256 as parameters (the model refuses any
    other manifest; clients check the sha256)."""
    params = {"model_dir": str(manifest.root.resolve()), PARAM_MANIFEST_SHA256: manifest.sha256,
              "max_rows": str(served.max_rows), "backend": served.backend, "device": served.device or "",
              "threads": str(served.threads or ""), "class_names": ",".join(manifest.model.class_names),
              "threshold": repr(manifest.model.threshold)}
    body = (f"dynamic_batching {{ max_queue_delay_microseconds: {served.max_queue_delay_us} }}\n"
            f"instance_group [ {{ kind: KIND_CPU count: {served.instances} }} ]")
    return model_config_text(served.name, backend="python", max_batch_size=served.max_slides,
                             inputs=request_inputs(manifest.model.feature_dim), outputs=request_outputs(),
                             parameters=params, body=body)


def write_serving_repository(repo: str | Path, manifest: Manifest, served: ServedModel) -> Path:
    """``repo/{name}/config.pbtxt`` and ``repo/{name}/1/model.py`` for ``momkd serve`` on this machine (its
    import path written into ``model.py``); returns ``repo``."""
    root = Path(repo)
    version = root / served.name / VERSION
    version.mkdir(parents=True, exist_ok=True)
    (root / served.name / CONFIG_NAME).write_text(serving_config(manifest, served), encoding="utf-8")
    (version / "model.py").write_text(model_py(SERVED_MODEL_CLASS, import_paths()), encoding="utf-8")
    return root
