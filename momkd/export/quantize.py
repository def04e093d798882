"""Reduced-precision twins of the exported fp32 graph for CPU inference, made with ONNX Runtime's own
quantisation tools (``onnxruntime.quantization``; no hand-written quantiser).

int8 (``model.int8.onnx``): dynamic quantisation (``quantize_dynamic``): weights int8 per output channel, stored;
activations quantised per call from their own range (``DynamicQuantizeLinear``), so no calibration data is
needed. ORT fuses each quantised product into ``DynamicQuantizeMatMul`` (MLAS int8 GEMM: VNNI / AMX where the CPU
has them; see ``momkd.runtime.cpu``). Which products are quantised was decided by measurement (paper preset,
D_in 1536, N = 20000, ORT CPU, 2 threads, one run; fp32 1354 ms on a loaded host):

=====================================================  ==========  ============
quantised products (per-channel int8 weights)           time/fp32   max |dp|
=====================================================  ==========  ============
encoder projection (N x 1536) @ (1536 x 768)            0.68        4.9e-05
+ second GATv2 projection (N x 256) @ (256 x 512)       0.61        2.3e-04
+ memory-head projection and classifier (every Gemm)    0.64        6.5e-04
=====================================================  ==========  ============

so the default quantises the products whose constant weight has at least ``MIN_WEIGHT_FRACTION`` of the largest
weight's elements (paper preset: the two projections, 1179648 and 131072 elements, not the head's 32768) and
keeps the memory head, the classifier and every per-edge GATv2 product (attention scores and aggregation on the
gathered neighbours: activation x activation, no constant weight) in fp32. The per-edge work is about a third of
the fp32 call (``benchmarks/RESULTS.md``), which bounds what int8 products can save.

The exporter writes the linear layers as ``Gemm`` (transB=1); ORT's dynamic quantiser only handles ``MatMul``, so
each chosen ``Gemm`` is first rewritten as ``MatMul`` + ``Add`` (the same product; exact in fp32).

bf16: not written as a graph. ONNX Runtime's CPU execution provider has no bf16 MatMul/Gemm kernel (a bf16
MatMul graph fails to load: NOT_IMPLEMENTED); bf16 on CPU is oneDNN through PyTorch, which the lean runtime does
not have (``momkd bench --backends torch --precision bf16`` measures it where torch is installed).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from momkd.errors import MomkdError

INT8_NAME = "model.int8.onnx"
REDUCED_NAMES = {"int8": INT8_NAME}
EXPORT_PRECISIONS = ("fp32", "int8")
MIN_WEIGHT_FRACTION = 1 / 16   # of the largest constant weight: the encoder and second GATv2 projections


class QuantizationError(MomkdError):
    """ONNX Runtime's quantiser could not make the reduced-precision graph."""


def _attributes(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def large_products(model: Any, min_weight_fraction: float = MIN_WEIGHT_FRACTION) -> list[str]:
    """Names of the ``Gemm``/``MatMul`` nodes whose second operand is a constant weight of at least
    ``min_weight_fraction`` of the largest such weight's elements (plain ``Gemm`` only: alpha = beta = 1,
    transA = 0), in graph order."""
    sizes = {i.name: int(np.prod(i.dims)) for i in model.graph.initializer}
    candidates = []
    for node in model.graph.node:
        if node.op_type not in ("Gemm", "MatMul") or len(node.input) < 2 or node.input[1] not in sizes:
            continue
        if node.op_type == "Gemm":
            a = _attributes(node)
            if a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0 or a.get("transA", 0):
                continue
        candidates.append((node.name, sizes[node.input[1]]))
    largest = max((size for _, size in candidates), default=0)
    return [name for name, size in candidates if size >= min_weight_fraction * largest]


def gemms_as_matmuls(model: Any, names: set[str]) -> dict[str, str]:
    """Rewrite each ``Gemm`` named in ``names`` (in place) as ``MatMul`` (weight transposed when transB) + ``Add``
    (its bias, if any); returns {original node name: name of the MatMul now doing its product} for every name
    (a ``MatMul`` maps to itself)."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    nodes, matmul_of = [], {}
    for node in graph.node:
        if node.name not in names:
            nodes.append(node)
            continue
        if node.op_type == "MatMul":
            nodes.append(node)
            matmul_of[node.name] = node.name
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        if _attributes(node).get("transB", 0):
            weight = weight.T
        weight_name = f"{node.input[1]}__kn"
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight), weight_name))
        has_bias = len(node.input) > 2 and node.input[2] != ""
        product = f"{node.output[0]}__product" if has_bias else node.output[0]
        matmul = helper.make_node("MatMul", [node.input[0], weight_name], [product], name=f"{node.name}__matmul")
        nodes.append(matmul)
        if has_bias:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}__bias"))
        matmul_of[node.name] = matmul.name
    del graph.node[:]
    graph.node.extend(nodes)
    return matmul_of


def quantize_int8(fp32_path: str | Path, out_path: str | Path, nodes: list[str] | None = None,
                  per_channel: bool = True) -> dict[str, Any]:
    """Write the dynamically quantised int8 twin of ``fp32_path`` to ``out_path``; ``nodes``: the products to
    quantise (default ``large_products``). Returns the manifest's description of the method."""
    import onnx
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(fp32_path))
    for i, node in enumerate(model.graph.node):   # the quantiser selects nodes by name
        node.name = node.name or f"{node.op_type}_{i}"
    chosen = large_products(model) if nodes is None else list(nodes)
    if not chosen:
        raise QuantizationError(f"{fp32_path}: no matrix product with a constant weight to quantise")
    matmuls = gemms_as_matmuls(model, set(chosen))
    missing = sorted(set(chosen) - set(matmuls))
    if missing:
        raise QuantizationError(f"{fp32_path}: no such product node(s) {missing}")
    with tempfile.TemporaryDirectory(prefix="momkd-int8-") as tmp:
        rewritten = Path(tmp) / "matmuls.onnx"
        onnx.save(model, str(rewritten))
        try:
            quantize_dynamic(rewritten, Path(out_path), nodes_to_quantize=list(matmuls.values()),
                             weight_type=QuantType.QInt8, per_channel=per_channel)
        except Exception as e:  # noqa: BLE001 - the quantiser raises assorted types
            raise QuantizationError(f"{fp32_path}: onnxruntime {onnxruntime.__version__} cannot quantise the graph "
                                    f"({' '.join(str(e).split())[:240]})") from None
    return {"method": "dynamic (onnxruntime.quantization.quantize_dynamic)", "weights": "int8, "
            + ("per output channel" if per_channel else "per tensor"), "activations": "uint8, range per call",
            "quantized_nodes": chosen, "kept_fp32": "memory head, classifier, per-edge GATv2 products, LayerNorm, "
            "softmax, pooling", "calibration": None, "onnxruntime": onnxruntime.__version__}


def check_precisions(precisions: Sequence[str]) -> list[str]:
    """The reduced precisions asked for (``"fp32"`` left out, duplicates dropped); a QuantizationError for a
    precision export cannot make."""
    wanted = [p for p in dict.fromkeys(precisions) if p != "fp32"]
    unknown = [p for p in wanted if p not in REDUCED_NAMES]
    if unknown:
        raise QuantizationError(f"--precision {unknown[0]!r}: export makes {', '.join(EXPORT_PRECISIONS)} (bf16 on "
                                "CPU needs PyTorch/oneDNN, which the lean runtime does not have)")
    return wanted


def add_reduced_graphs(work: Path, onnx_name: str, run: Any, run_dir: Path, manifest: dict[str, Any],
                       precisions: Sequence[str], limits: Any, force: bool, verification_slides: Sequence[Any],
                       say: Callable[[str], None]) -> list[str]:
    """Make every reduced precision of ``precisions`` (``"fp32"`` is the folder's own graph) from
    ``work/onnx_name``, gate it on the run's fold validation and test slides (``momkd.export.gates``) and record
    it in ``manifest["reduced_precision"]``. A graph that fails its gates is deleted unless ``force`` (then it is
    kept and marked forced). Returns one line per precision that failed its gates."""
    from momkd.export.gates import GateLimits, fold_slides, gate_report, slide_probabilities, stand_in_slides
    from momkd.runtime.backends import OnnxRuntimeBackend
    from momkd.runtime.cpu import INT8_FLAGS

    wanted = check_precisions(precisions)
    if not wanted:
        return []
    limits = limits or GateLimits()
    items, notes = fold_slides(run_dir, run.config, run.folds)
    source = "validation and test slides of the exported folds"
    if not items:
        items = stand_in_slides(verification_slides)
        source = "the export's verification slides (cohort data not found: no AUC)"
    fp32 = OnnxRuntimeBackend(work / onnx_name, "cpu", feature_dim=run.feature_dim)
    section: dict[str, Any] = {}
    failures: list[str] = []
    try:
        for precision in wanted:
            path = work / REDUCED_NAMES[precision]
            t0 = time.perf_counter()
            method = quantize_int8(work / onnx_name, path)
            reduced = OnnxRuntimeBackend(path, "cpu", feature_dim=run.feature_dim)
            say(f"{precision}: quantised {len(method['quantized_nodes'])} product(s) "
                f"({time.perf_counter() - t0:.1f} s); gates on {len(items)} slide(s), {source}")
            try:
                ran, probs, skipped = slide_probabilities(items, [fp32.run, reduced.run], run.k, run.graph_direction,
                                                          run.feature_dim, say)
            finally:
                reduced.close()
            report = gate_report(ran, probs[:, 0], probs[:, 1], run.threshold, limits)
            report.update({"source": source, "notes": notes + skipped})
            passed = bool(report["passed"])
            if not passed and not force:
                path.unlink(missing_ok=True)
            dauc = report["max_abs_dauc"]
            say(f"{precision} gates {'passed' if passed else 'FAILED'}: max |dp| {report['max_abs_dp']:.2e}, "
                f"{report['decision_flips']} flip(s), max |dAUC| {'n/a' if dauc is None else f'{dauc:.2e}'}"
                + ("" if passed else f" ({'; '.join(report['failed'])})")
                + (" -- written anyway (--force-precision)" if not passed and force else ""))
            if not passed:
                failures.append(f"{precision}: {'; '.join(report['failed'])}")
            section[precision] = {"file": path.name if passed or force else None, "passed": passed,
                                  "forced": bool(force and not passed), "requires_isa": list(INT8_FLAGS),
                                  "backend": "onnxruntime", "device": "cpu", "method": method, "gates": report}
    finally:
        fp32.close()
    manifest["reduced_precision"] = section
    return [] if force else failures
