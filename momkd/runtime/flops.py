"""Matrix-product FLOPs of one call of an exported model, counted from the graph ONNX Runtime actually runs.

The count follows the convention of ``torch.utils.flop_counter.FlopCounterMode``: ``2 * M * N * K`` for every
matrix product (MatMul, Gemm and ONNX Runtime's fused forms of them), nothing for element-wise work, softmax,
normalisation or gathers. It is read from ONNX Runtime's node profile of one run on the given inputs, which lists
each node's operand and output shapes, so it needs neither torch nor onnx and always describes the model folder's
own graph (every fold of an ensemble, the GATv2 attention products, the per-slide pooling products).

Operands that ONNX Runtime pre-packed (constant weights) are missing from the profile; the contraction length K
is then read off the operand that is listed (see :func:`product_flops`). ``tests/test_bench.py`` checks the count
against ``FlopCounterMode`` on the PyTorch model, plus the one product the graph has and the eager model does not:
the exported attention permutes its slot scores with a 0/1 product (2 N ((k+1) H)^2 per GATv2 layer, 0.05% of
the paper model's FLOPs).
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from momkd.errors import MomkdError

PRODUCT_OPS = frozenset({"MatMul", "Gemm", "FusedMatMul", "FusedGemm"})


class FlopCountError(MomkdError):
    """The profile could not be turned into a FLOP count (unexpected operator shapes)."""


def _shapes(entries: list[dict[str, list[int]]]) -> list[tuple[int, ...]]:
    """ORT profile shape entries ``[{"float": [20000, 1536]}, ...]`` -> ``[(20000, 1536), ...]``."""
    return [tuple(int(d) for d in next(iter(entry.values()))) for entry in entries]


def product_flops(op: str, inputs: list[tuple[int, ...]], output: tuple[int, ...]) -> int:
    """``2 * numel(output) * K`` for one matrix-product node, K found from its listed operands.

    Args:
        op: the node's operator type (one of ``PRODUCT_OPS``).
        inputs: shapes of the operands the profile lists, in order (a pre-packed constant operand is absent,
            which ONNX Runtime does to B, never to A; Gemm's bias may be listed).
        output: the output shape.
    """
    k = None
    if op in ("Gemm", "FusedGemm"):
        a = inputs[0] if inputs else ()
        if len(a) == 2 and output and output[0] in a:
            k = a[0] * a[1] // output[0]  # A is (M, K), or (K, M) with transA
    elif len(inputs) >= 2:  # both operands listed: the first is A
        a = inputs[0]
        if op == "MatMul" or len(a) == 1 or len(output) < 2:
            k = a[-1]  # MatMul's A is (..., M, K) or (K,)
        else:
            k = math.prod(a[-2:]) // output[-2]  # FusedMatMul's A is (..., M, K) or, transposed, (..., K, M)
    elif inputs:  # B was pre-packed
        x = inputs[0]
        if len(x) >= 2 and x[:-1] == output[:-1]:
            k = x[-1]  # x is A (..., M, K)
        else:
            k = x[-2] if len(x) >= 2 else x[0]  # x is B (..., K, N) or (K,)
    if not k:
        raise FlopCountError(f"cannot count FLOPs of {op} with operands {inputs} -> {output}")
    return 2 * math.prod(output) * k


def node_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-node kernel events of a profile (``name`` is ``<node>_kernel_time``, ``dur`` in microseconds)."""
    return [e for e in events if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time")]


def profile_products(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The matrix-product nodes of one profiled run: ``[{"node", "op", "inputs", "output", "flops"}]``."""
    out = []
    for event in node_events(events):
        args = event.get("args") or {}
        op = args.get("op_name")
        if op not in PRODUCT_OPS:
            continue
        inputs = _shapes(args.get("input_type_shape", []))
        output = _shapes(args.get("output_type_shape", []))[0]
        out.append({"node": event["name"][: -len("_kernel_time")], "op": op, "inputs": inputs, "output": output,
                    "flops": product_flops(op, inputs, output)})
    return out


def profile_events(onnx_path: str | Path, features: np.ndarray, neighbors: np.ndarray, slide_offsets: np.ndarray,
                   threads: int | None = None, runs: int = 1) -> list[dict[str, Any]]:
    """The ONNX Runtime CPU profile (chrome-trace events) of the last of ``runs`` calls of the model on these inputs
    (``runs > 1``: the earlier calls warm the session up, for node timings that mean something).

    Args:
        onnx_path: the model folder's ``model.onnx``.
        features: (N, D) float32; neighbors: (N, W) int64; slide_offsets: (B+1,) int64.
        threads: ONNX Runtime intra-op threads (default: its own choice).
        runs: calls to make; only the last one's events are returned.
    """
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="momkd-profile-") as tmp:
        so = ort.SessionOptions()
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "profile")
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        session = ort.InferenceSession(str(onnx_path), sess_options=so, providers=["CPUExecutionProvider"])
        types = {i.name: i.type for i in session.get_inputs()}
        feeds = {"features": features.astype(np.float16 if types.get("features") == "tensor(float16)" else np.float32,
                                             copy=False),
                 "neighbors": neighbors.astype(np.int64, copy=False),
                 "slide_offsets": slide_offsets.astype(np.int64, copy=False)}
        for _ in range(max(1, runs)):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    last = max((e["ts"] for e in events if e.get("name") == "model_run"), default=0)
    return [e for e in events if e.get("ts", 0) >= last]


def count_matmul_flops(onnx_path: str | Path, features: np.ndarray, neighbors: np.ndarray,
                       slide_offsets: np.ndarray, threads: int | None = None) -> int:
    """Matrix-product FLOPs of one call of the ONNX model on these inputs (one profiled ONNX Runtime CPU run;
    arguments as :func:`profile_events`)."""
    products = profile_products(profile_events(onnx_path, features, neighbors, slide_offsets, threads))
    if not products:
        raise FlopCountError(f"{onnx_path}: the ONNX Runtime profile lists no matrix products")
    return sum(p["flops"] for p in products)
