"""Freeze a trained momkd run into a deployable model folder (ONNX, TorchScript twin, TensorRT).

Public API (imported lazily: ``import momkd.export`` does not import torch)::

    export_run(run_dir, out_dir, fmt="onnx" | "trt", fold="all" | K, fp16=False, opset=18) -> manifest dict
    FrozenEnsemble(models)          the inference module: mean over fold models of their forward_wsi outputs
    load_run(run_dir, fold)         a finished run's fold models + config/summary (LoadedRun)
    export_onnx / check_graph       single-file ONNX export with dynamic N, W, B; TensorRT op allow-list check
    verify_export                   ONNX Runtime / TorchScript vs PyTorch on held-out slides
    build_engine / Profile          TensorRT 10 engine from the ONNX graph (needs tensorrt + CUDA)

Modules: ``frozen`` (FrozenEnsemble, fp16 variant, run loading), ``onnx`` (export + graph checks + TorchScript
trace), ``verify`` (held-out slides, comparisons), ``tensorrt`` (engine build), ``folder`` (orchestration).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {
    "export_run": "momkd.export.folder",
    "FrozenEnsemble": "momkd.export.frozen",
    "load_run": "momkd.export.frozen",
    "mixed_fp16": "momkd.export.frozen",
    "export_onnx": "momkd.export.onnx",
    "check_graph": "momkd.export.onnx",
    "ExportError": "momkd.export.onnx",
    "verify_export": "momkd.export.verify",
    "ExportVerificationError": "momkd.export.verify",
    "build_engine": "momkd.export.tensorrt",
    "Profile": "momkd.export.tensorrt",
    "TensorRTUnavailableError": "momkd.export.tensorrt",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'momkd.export' has no attribute {name!r}")
