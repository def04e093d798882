"""Reduced-precision twins of the exported fp32 graph for CPU inference, made with ONNX Runtime's own
quantisation tools (``onnxruntime.quantization``; no hand-written quantiser).

int8 (``model.int8.onnx``) is made in two steps:

1. **Products with a constant weight: dynamic quantisation** (``quantize_dynamic``): weights int8 per output
   channel, stored; activations quantised per call from their own range, so no calibration is needed. ORT fuses
   each into ``DynamicQuantizeMatMul`` (MLAS int8 GEMM: VNNI / AMX where the CPU has them; ``momkd.runtime.cpu``).
   Chosen: the products whose constant weight has at least ``MIN_WEIGHT_FRACTION`` of the largest weight's
   elements (paper preset: the encoder and second GATv2 projections, 1179648 and 131072 elements, not the memory
   head's 32768 or the classifier). A product whose output is only split into parts (each GATv2 layer's one
   product for ``lin_l``, ``lin_r`` and the residual) becomes one product per part (:func:`split_products`),
   sharing one quantisation of the input: no copy of the product's output.
2. **The per-edge GATv2 attention: static QDQ quantisation** (``quantize_static``, uint8 activations, one
   MinMax range per tensor calibrated on the run's own training slides): the gathered neighbour rows
   ``x_l[j]``, ``x_l[j] + x_r[i]`` and its relu, the score product and the aggregation. These are the graph's
   only tensors with a row per neighbour slot (N x (W+1) x H*C); in fp32 they are memory-bound passes (about a
   third of the fp32 call at N = 20000), in uint8 they move a quarter of the bytes. ORT fuses the QDQ pairs into
   ``Gather`` on uint8, ``QLinearAdd`` and ``QLinearMatMul``. They are found by running the graph on two probes
   whose neighbour widths differ (:func:`per_edge_nodes`), not by node names.

Kept fp32 (by measurement, paper preset, D_in 1536, N = 20000, ORT CPU, 2 threads): the memory head and the
classifier (quantising them saved nothing measurable and cost 3x in |dp|), LayerNorm, ELU, the softmax over the
neighbour slots and the attention pooling. Step by step on one VNNI host (``benchmarks/RESULTS.md``, wall time
int8 / fp32 in one run, calls alternating):

=====================================================  ==========  ============
quantised (cumulative)                                  time/fp32   max |dp|
=====================================================  ==========  ============
encoder and second GATv2 projections, dynamic int8      0.59        2.4e-04
+ per-edge attention, static uint8 (calibrated)         0.48        3.1e-04
+ split products as one product per part                0.48        2.9e-04
=====================================================  ==========  ============

A model whose int8 graph with the per-edge step fails its accuracy gates gets the one without it
(:func:`add_reduced_graphs`); the gates decide per model.

The exporter writes the linear layers as ``Gemm`` (transB=1); ORT's dynamic quantiser only handles ``MatMul``, so
each chosen ``Gemm`` is first rewritten as ``MatMul`` + ``Add`` (the same product; exact in fp32).

bf16: not written as a graph. ONNX Runtime's CPU execution provider has no bf16 MatMul/Gemm kernel (a bf16
MatMul graph fails to load: NOT_IMPLEMENTED); bf16 on CPU is oneDNN through PyTorch, which the lean runtime does
not have (``momkd bench --backends torch --precision bf16`` measures it where torch is installed).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from momkd.errors import MomkdError, SlideError

INT8_NAME = "model.int8.onnx"
REDUCED_NAMES = {"int8": INT8_NAME}
EXPORT_PRECISIONS = ("fp32", "int8")
MIN_WEIGHT_FRACTION = 1 / 16   # of the largest constant weight: the encoder and second GATv2 projections
PROBES = ((997, 12), (997, 16))   # (rows, neighbour width W): only per-edge dimensions scale with W
EDGE_OPS = ("Gather", "Add", "Relu", "MatMul", "Reshape")   # the per-edge ops that QDQ keeps in uint8
MIN_EDGE_CHANNELS = 16         # per-edge tensors narrower than this (the (.., H) scores) stay fp32
MAX_CALIBRATION_SLIDES = 16


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


def split_products(model: Any, names: set[str]) -> dict[str, list[str]]:
    """Rewrite (in place) each plain ``Gemm`` named in ``names`` whose only consumer is a ``Split`` of its output
    along the last axis with constant sizes (the GATv2 layers' one product for ``lin_l``, ``lin_r`` and the
    residual) as one ``Gemm`` per part, writing the Split's outputs directly; returns {original name: names of the
    parts}. The same products: each output column is computed from the same row and weight column. For int8 this
    removes the Split's copy of the product (~10% of the int8 call at N = 20000); the parts share one dynamic
    quantisation of their input."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in graph.output}
    nodes, parts_of, replaced = [], {}, set()
    for node in graph.node:
        if node.name in replaced:
            continue
        users = consumers.get(node.output[0], []) if node.output else []
        split = users[0] if len(users) == 1 else None
        attrs = _attributes(node)
        if (node.name not in names or node.op_type != "Gemm" or split is None or split.op_type != "Split"
                or node.output[0] in graph_outputs or attrs.get("transB", 0) != 1 or len(split.input) < 2
                or split.input[1] not in inits or _attributes(split).get("axis", 0) not in (1, -1)):
            nodes.append(node)
            continue
        sizes = [int(v) for v in numpy_helper.to_array(inits[split.input[1]])]
        weight = numpy_helper.to_array(inits[node.input[1]])
        bias = numpy_helper.to_array(inits[node.input[2]]) if len(node.input) > 2 and node.input[2] else None
        starts = np.cumsum([0, *sizes])
        parts = []
        for i, output in enumerate(split.output):
            inputs = [node.input[0], f"{node.input[1]}__part{i}"]
            graph.initializer.append(numpy_helper.from_array(
                np.ascontiguousarray(weight[starts[i]:starts[i + 1]]), inputs[1]))
            if bias is not None:
                inputs.append(f"{node.input[2]}__part{i}")
                graph.initializer.append(numpy_helper.from_array(
                    np.ascontiguousarray(bias[starts[i]:starts[i + 1]]), inputs[2]))
            parts.append(helper.make_node("Gemm", inputs, [output], name=f"{node.name}__part{i}", transB=1))
        nodes.extend(parts)
        parts_of[node.name] = [part.name for part in parts]
        replaced.add(split.name)
    del graph.node[:]
    graph.node.extend(nodes)
    return parts_of


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


def _probe_shapes(model: Any, rows: int, width: int) -> dict[str, tuple[tuple[int, ...], bool]]:
    """{tensor name: (shape, is float)} of every node output when ``model`` runs on ``rows`` random rows with a
    ``width``-wide random neighbour table (one slide)."""
    import onnx
    import onnxruntime
    from onnx import helper

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    for node in probe.graph.node:
        for name in node.output:
            if name and name not in have:
                probe.graph.output.append(helper.make_empty_tensor_value_info(name))
                have.add(name)
    so = onnxruntime.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL   # every tensor as written
    session = onnxruntime.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    dim = int(model.graph.input[0].type.tensor_type.shape.dim[1].dim_value)
    rng = np.random.default_rng(0)
    feeds = {"features": rng.standard_normal((rows, dim)).astype(np.float32),
             "neighbors": rng.integers(0, rows, (rows, width)).astype(np.int64),
             "slide_offsets": np.array([0, rows], np.int64)}
    values = session.run(None, feeds)
    return {o.name: (tuple(np.shape(v)), np.asarray(v).dtype.kind == "f")
            for o, v in zip(session.get_outputs(), values)}


def per_edge_nodes(model: Any) -> list[str]:
    """Names of the ``EDGE_OPS`` nodes that read or write a per-edge tensor: a float tensor with a row per
    neighbour slot (a leading dimension that is W x m or (W + 1) x m, self included, for the same m in two probes
    of different W) and a last (channel) dimension that does not change with W, of at
    least ``MIN_EDGE_CHANNELS`` channels. In the GATv2 attention: the gathered ``x_l[j]``, ``x_l[j] + x_r[i]``,
    its relu, the score product and the aggregation. Empty for a graph without neighbour attention."""
    (rows_a, width_a), (rows_b, width_b) = PROBES
    first, second = _probe_shapes(model, rows_a, width_a), _probe_shapes(model, rows_b, width_b)

    def per_edge(name: str) -> bool:
        if name not in first or name not in second:
            return False
        (shape_a, is_float), (shape_b, _) = first[name], second[name]
        if (not is_float or len(shape_a) < 2 or len(shape_a) != len(shape_b) or shape_a[-1] != shape_b[-1]
                or shape_a[-1] < MIN_EDGE_CHANNELS):   # channels last, the same whatever W
            return False
        return any(a % (width_a + c) == 0 and b % (width_b + c) == 0 and a // (width_a + c) == b // (width_b + c)
                   for a, b in zip(shape_a[:-1], shape_b[:-1]) for c in (0, 1))   # W slots, or W + self

    return [node.name for node in model.graph.node
            if node.op_type in EDGE_OPS and any(per_edge(t) for t in [*node.input, *node.output])]


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """The quantiser logs advice on the root logger ("consider pre-processing") and computes a range for every
    tensor of the calibrated op types, the additive -inf padding masks included (numpy warns; those ranges are
    never used: the masks are not quantised). Keep the export's output to its own lines."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            yield
    finally:
        root.setLevel(level)


class _Calibration:
    """Calibration data over slides, one slide per ``get_next`` call (``None`` at the end): all that
    ``quantize_static`` calls, and what makes an ``onnxruntime.quantization.CalibrationDataReader`` (its
    ``__subclasshook__``)."""

    def __init__(self, slides: Sequence[Any]) -> None:
        self._slides = iter(slides)

    def get_next(self) -> dict[str, np.ndarray] | None:
        slide = next(self._slides, None)
        if slide is None:
            return None
        return {"features": slide.features, "neighbors": slide.neighbors,
                "slide_offsets": np.array([0, slide.n], np.int64)}


def quantize_int8(fp32_path: str | Path, out_path: str | Path, nodes: list[str] | None = None,
                  per_channel: bool = True, calibration: Sequence[Any] = (), calibration_source: str | None = None
                  ) -> dict[str, Any]:
    """Write the int8 twin of ``fp32_path`` to ``out_path``: the products ``nodes`` (default ``large_products``)
    quantised dynamically, then, with ``calibration`` slides (``GraphSlide``-like: features (N, D), neighbors
    (N, W), n), the per-edge attention (:func:`per_edge_nodes`) quantised statically with ranges from those
    slides. Returns the manifest's description of the method."""
    import onnx
    import onnxruntime
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    model = onnx.load(str(fp32_path))
    for i, node in enumerate(model.graph.node):   # the quantiser selects nodes by name
        node.name = node.name or f"{node.op_type}_{i}"
    chosen = large_products(model) if nodes is None else list(nodes)
    if not chosen:
        raise QuantizationError(f"{fp32_path}: no matrix product with a constant weight to quantise")
    edge_nodes = per_edge_nodes(model) if calibration else []
    parts_of = split_products(model, set(chosen))
    products = [part for name in chosen for part in parts_of.get(name, [name])]
    matmuls = gemms_as_matmuls(model, set(products))
    missing = sorted(set(products) - set(matmuls))
    if missing:
        raise QuantizationError(f"{fp32_path}: no such product node(s) {missing}")
    with tempfile.TemporaryDirectory(prefix="momkd-int8-") as tmp, _quiet_quantizer():
        rewritten, dynamic = Path(tmp) / "matmuls.onnx", Path(tmp) / "dynamic.onnx"
        onnx.save(model, str(rewritten))
        try:
            quantize_dynamic(rewritten, dynamic if edge_nodes else Path(out_path),
                             nodes_to_quantize=list(matmuls.values()), weight_type=QuantType.QInt8,
                             per_channel=per_channel)
            if edge_nodes:
                quantize_static(dynamic, Path(out_path), _Calibration(calibration), quant_format=QuantFormat.QDQ,
                                op_types_to_quantize=list(EDGE_OPS), nodes_to_quantize=edge_nodes,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=False,
                                calibrate_method=CalibrationMethod.MinMax,
                                extra_options={"DedicatedQDQPair": True, "ForceQuantizeNoInputCheck": True})
        except Exception as e:  # noqa: BLE001 - the quantiser raises assorted types
            raise QuantizationError(f"{fp32_path}: onnxruntime {onnxruntime.__version__} cannot quantise the graph "
                                    f"({' '.join(str(e).split())[:240]})") from None
    static = None
    if edge_nodes:
        edge_set = set(edge_nodes)
        ops = sorted({n.op_type for n in model.graph.node if n.name in edge_set})
        static = {"nodes": len(edge_nodes), "ops": ops,
                  "activations": "uint8, one MinMax range per tensor", "calibration_slides": len(calibration),
                  "calibration_source": calibration_source}
    return {"method": "dynamic (onnxruntime.quantization.quantize_dynamic)"
            + (" + static QDQ on the per-edge attention (quantize_static)" if static else ""),
            "weights": "int8, " + ("per output channel" if per_channel else "per tensor"),
            "activations": "uint8, range per call", "quantized_nodes": chosen,
            "split_products": {name: len(parts) for name, parts in parts_of.items()}, "per_edge_static": static,
            "kept_fp32": "memory head, classifier, LayerNorm, ELU, neighbour softmax, pooling"
            + ("" if static else ", per-edge GATv2 products"),
            "calibration": None if static is None else calibration_source, "onnxruntime": onnxruntime.__version__}


def check_precisions(precisions: Sequence[str]) -> list[str]:
    """The reduced precisions asked for (``"fp32"`` left out, duplicates dropped); a QuantizationError for a
    precision export cannot make."""
    wanted = [p for p in dict.fromkeys(precisions) if p != "fp32"]
    unknown = [p for p in wanted if p not in REDUCED_NAMES]
    if unknown:
        raise QuantizationError(f"--precision {unknown[0]!r}: export makes {', '.join(EXPORT_PRECISIONS)} (bf16 on "
                                "CPU needs PyTorch/oneDNN, which the lean runtime does not have)")
    return wanted


def calibration_slides(run_dir: Path, run: Any, gate_ids: set[str], verification_slides: Sequence[Any]
                       ) -> tuple[list[Any], str]:
    """Up to ``MAX_CALIBRATION_SLIDES`` of the exported folds' training slides (those that are no fold's gate
    slide first), read and graphed; the export's verification slides where the cohort data is gone. Returns
    (slides, where they came from)."""
    from momkd.data.batch import load_graph_slide
    from momkd.export.gates import fold_slides

    items, _ = fold_slides(run_dir, run.config, run.folds, splits=("train",))
    if not items:
        return list(verification_slides)[:MAX_CALIBRATION_SLIDES], \
            "the export's verification slides (cohort data not found)"
    unseen = [i for i in items if i.slide_id not in gate_ids]
    chosen = (unseen or items)[:: max(1, len(unseen or items) // MAX_CALIBRATION_SLIDES)][:MAX_CALIBRATION_SLIDES]
    slides = []
    for item in chosen:
        if item.path is None:
            continue
        try:
            slides.append(load_graph_slide(item.path, run.k, run.graph_direction, slide_id=item.slide_id,
                                           expected_dim=run.feature_dim, keep_coords=False))
        except SlideError:
            continue
    source = "training slides of the exported folds" + ("" if unseen else
                                                       " (each is another fold's validation or test slide)")
    if not slides:
        return list(verification_slides)[:MAX_CALIBRATION_SLIDES], \
            "the export's verification slides (no training slide could be read)"
    return slides, source


def add_reduced_graphs(work: Path, onnx_name: str, run: Any, run_dir: Path, manifest: dict[str, Any],
                       precisions: Sequence[str], limits: Any, force: bool, verification_slides: Sequence[Any],
                       say: Callable[[str], None]) -> list[str]:
    """Make every reduced precision of ``precisions`` (``"fp32"`` is the folder's own graph) from
    ``work/onnx_name``, calibrated on the run's training slides (:func:`calibration_slides`), gate it on the run's
    fold validation and test slides (``momkd.export.gates``) and record it in ``manifest["reduced_precision"]``.
    int8 is made with the per-edge attention quantised and with it kept in fp32; both run on every gate slide in one
    pass (each slide read and run through fp32 once) and the first that passes is written (the attempts up to it
    recorded under ``attempts``). A graph that fails its gates is deleted unless ``force`` (then the last candidate
    is kept and marked forced). Returns one line per precision that failed its gates."""
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
    calibration, calibration_source = calibration_slides(run_dir, run, {i.slide_id for i in items},
                                                         verification_slides)
    section: dict[str, Any] = {}
    failures: list[str] = []
    for precision in wanted:
        path = work / REDUCED_NAMES[precision]
        # candidates, fastest first: the per-edge attention in uint8 too, then kept in fp32; each gate slide is read
        # and run through fp32 once, through every candidate alongside, and the first that passes is written
        tries: list[Sequence[Any]] = [calibration, ()] if calibration else [()]
        graphs = [path.with_name(f".{path.stem}.candidate{i}{path.suffix}") for i in range(len(tries))]
        methods = []
        for graph, calibrated in zip(graphs, tries):
            t0 = time.perf_counter()
            method = quantize_int8(work / onnx_name, graph, calibration=calibrated,
                                   calibration_source=f"{len(calibrated)} {calibration_source}")
            static = method["per_edge_static"]
            say(f"{precision}: quantised {len(method['quantized_nodes'])} product(s)"
                + (f" and {static['nodes']} per-edge node(s), calibrated on {method['calibration']}" if static
                   else "") + f" ({time.perf_counter() - t0:.1f} s)")
            methods.append(method)
        say(f"{precision}: gates on {len(items)} slide(s), {source}")
        backends = [OnnxRuntimeBackend(g, "cpu", feature_dim=run.feature_dim) for g in [work / onnx_name, *graphs]]
        try:
            ran, probs, skipped = slide_probabilities(items, [b.run for b in backends], run.k, run.graph_direction,
                                                      run.feature_dim, say)
        finally:
            for backend in backends:
                backend.close()
        attempts = []
        for i, method in enumerate(methods):
            report = gate_report(ran, probs[:, 0], probs[:, i + 1], run.threshold, limits)
            report.update({"source": source, "notes": notes + skipped})
            dauc = report["max_abs_dauc"]
            say(f"{precision} gates {'passed' if report['passed'] else 'FAILED'}: max |dp| "
                f"{report['max_abs_dp']:.2e}, {report['decision_flips']} flip(s), max |dAUC| "
                f"{'n/a' if dauc is None else f'{dauc:.2e}'}"
                + ("" if report["passed"] else f" ({'; '.join(report['failed'])})"))
            attempts.append({"per_edge_static": method["per_edge_static"] is not None,
                             **{k: report[k] for k in ("passed", "max_abs_dp", "decision_flips", "max_abs_dauc")},
                             **({"failed": report["failed"]} if not report["passed"] else {})})
            if report["passed"] or i == len(methods) - 1:
                break
            say(f"{precision}: trying again with the per-edge attention kept in fp32")
        graphs[i].replace(path)
        for graph in graphs:
            graph.unlink(missing_ok=True)
        passed = bool(report["passed"])
        if not passed and not force:
            path.unlink(missing_ok=True)
        if not passed:
            failures.append(f"{precision}: {'; '.join(report['failed'])}")
            if force:
                say(f"{precision}: written anyway (--force-precision)")
        section[precision] = {"file": path.name if passed or force else None, "passed": passed,
                              "forced": bool(force and not passed), "requires_isa": list(INT8_FLAGS),
                              "backend": "onnxruntime", "device": "cpu", "method": method, "gates": report,
                              "attempts": attempts}
    manifest["reduced_precision"] = section
    return [] if force else failures
