"""ONNX export of the frozen module, and the checks every exported graph must pass.

Exporter: ``torch.onnx.export(..., dynamo=True)`` (the torch.export-based exporter, the default since
PyTorch 2.9) with ``dynamic_shapes``. On this model it gives the cleaner graph: no ``Constant`` nodes (constants
become initializers), advanced indexing lowers to ``GatherND``, it keeps the relation between dimensions symbolic
(``slide_offsets`` is ``B+1`` and every per-slide output is ``B``; every per-row output shares ``N`` with
``features``), and its optimiser folds the shape arithmetic. The TorchScript exporter (``dynamo=False``) also
works but is deprecated, emits ~2x the nodes (56 ``Constant`` nodes on a toy model) and loses the ``B = B+1 - 1``
relation. torch.export refuses to trace data-dependent Python control flow instead of silently baking it in,
which is what we want for a graph that must serve every N, W and B.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from momkd.errors import MomkdError

from momkd.data.batch import INPUT_NAMES, INPUT_SHAPES, OUTPUT_NAMES, OUTPUT_SHAPES

DEFAULT_OPSET = 18
MIN_OPSET = 18  # the dynamo exporter emits opset 18 natively; lower opsets need a lossy version conversion

# Operators the TensorRT 10 ONNX parser supports (onnx-tensorrt docs/operators.md), minus those we refuse in
# the inference graph: scatter ops (slow/unsupported paths in TensorRT), NonZero (data-dependent shapes) and
# control flow (If/Loop/Scan).
TRT_ALLOWED_OPS = frozenset({
    "Abs", "Acos", "Acosh", "Add", "And", "ArgMax", "ArgMin", "Asin", "Asinh", "Atan", "Atanh", "AveragePool",
    "BatchNormalization", "Cast", "CastLike", "Ceil", "Celu", "Clip", "Concat", "Constant", "ConstantOfShape",
    "Cos", "Cosh", "CumSum", "Div", "Einsum", "Elu", "Equal", "Erf", "Exp", "Expand", "Flatten", "Floor", "Gather",
    "GatherElements", "GatherND", "Gelu", "Gemm", "GlobalAveragePool", "GlobalMaxPool", "Greater",
    "GreaterOrEqual", "GroupNormalization", "HardSigmoid", "HardSwish", "Identity", "InstanceNormalization",
    "IsInf", "IsNaN", "LayerNormalization", "LeakyRelu", "Less", "LessOrEqual", "Log", "LogSoftmax",
    "LpNormalization", "MatMul", "Max", "MaxPool", "Mean", "Min", "Mish", "Mod", "Mul", "Neg", "Not", "OneHot",
    "Or", "Pad", "Pow", "PRelu", "Range", "Reciprocal", "ReduceL1", "ReduceL2", "ReduceLogSum",
    "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare",
    "Relu", "Reshape", "Round", "Selu", "Shape", "Shrink", "Sigmoid", "Sign", "Sin", "Sinh", "Size", "Slice",
    "Softmax", "Softplus", "Softsign", "Split", "Sqrt", "Squeeze", "Sub", "Sum", "Tan", "Tanh", "ThresholdedRelu",
    "Tile", "TopK", "Transpose", "Trilu", "Unsqueeze", "Where", "Xor",
})
FORBIDDEN_OPS = frozenset({"ScatterElements", "ScatterND", "Scatter", "NonZero", "If", "Loop", "Scan",
                           "SequenceConstruct", "SequenceAt", "SplitToSequence", "ConcatFromSequence"})



class ExportError(MomkdError):
    """The model could not be exported, or the exported graph breaks the model folder's contract."""


def check_opset(opset: int) -> None:
    """``ExportError`` unless the exporter and the installed onnx can write ``opset``."""
    import onnx

    if opset < MIN_OPSET or opset > onnx.defs.onnx_opset_version():
        raise ExportError(f"--opset {opset} is not supported (use {MIN_OPSET}..{onnx.defs.onnx_opset_version()})")


def example_inputs(feature_dim: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A packed batch to trace with: 3 slides of 23, 1 and 13 rows (all sizes distinct from every static dim
    so that no symbolic dimension gets specialised by coincidence), a k-wide neighbour table with -1 pads."""
    g = torch.Generator().manual_seed(seed)
    sizes = [23, 1, 13]
    width = max(int(k), 2)
    features = torch.randn(sum(sizes), feature_dim, generator=g)
    rows = []
    start = 0
    for n in sizes:
        table = torch.full((n, width), -1, dtype=torch.int64)
        for i in range(n):
            others = [j for j in range(n) if j != i][:width]
            table[i, : len(others)] = torch.tensor(others, dtype=torch.int64) + start
        rows.append(table)
        start += n
    offsets = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=torch.int64)
    return features, torch.cat(rows), offsets


@contextlib.contextmanager
def _quiet():
    """The exporter prints progress lines and warns about optional torchvision ops; keep the CLI clean."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx",
                                               "torch._export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    out, err = io.StringIO(), io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            warnings.simplefilter("ignore")
            yield out, err
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def export_onnx(module: nn.Module, path: str | Path, feature_dim: int, k: int, opset: int = DEFAULT_OPSET
                ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Export ``module`` (forward(features, neighbors, slide_offsets) -> 4 tensors) to a single-file ONNX model.

    Dynamic: N (rows), W (neighbour-table width) and B (slides). Returns ``({"inputs": ..., "outputs": ...}`` as
    written into the manifest, ``check_graph``'s report of the file written``)``.
    """
    import onnx

    path = Path(path)
    check_opset(opset)
    args = example_inputs(feature_dim, k)
    n_dim = torch.export.Dim("N", min=1)
    w_dim = torch.export.Dim("W", min=1)
    b_dim = torch.export.Dim("B_plus_1", min=2)
    dynamic_shapes = {"features": {0: n_dim}, "neighbors": {0: n_dim, 1: w_dim}, "slide_offsets": {0: b_dim}}
    module = module.eval()
    try:
        with torch.no_grad(), _quiet():
            torch.onnx.export(
                module, args, str(path), dynamo=True, opset_version=opset, input_names=list(INPUT_NAMES),
                output_names=list(OUTPUT_NAMES), dynamic_shapes=dynamic_shapes, external_data=False,
                optimize=True, verify=False, report=False, verbose=False,
            )
    except MomkdError:
        raise
    except Exception as e:  # noqa: BLE001 - the exporter raises many types; one line for the user
        raise ExportError(f"ONNX export failed ({type(e).__name__}: {_one_line(e)})") from None
    model = onnx.load(str(path), load_external_data=False)
    model = _fold_weights(model)
    for node in model.graph.node:  # the exporter's per-node stack traces (local paths, ~half the file)
        del node.metadata_props[:]
    _name_dims(model, feature_dim)
    onnx.save_model(model, str(path), save_as_external_data=False)
    report = check_graph(path, feature_dim)
    return {"inputs": {**INPUT_SHAPES, "features": ["N", int(feature_dim)]}, "outputs": dict(OUTPUT_SHAPES)}, report


def _fold_weights(model: Any) -> Any:
    """Constant-fold without the exporter's size limit, so weight-only subgraphs (the GATv2 layer concatenates
    lin_l/lin_r/residual weights into one matmul; --fp16 casts them) are stored as the initializers they compute
    instead of being recomputed on every call."""
    try:
        import onnxscript.optimizer as optimizer

        return optimizer.optimize(model, input_size_limit=1 << 40, output_size_limit=1 << 40)
    except Exception:  # noqa: BLE001 - an optimisation only: the unfolded graph is equally valid
        return model


def _name_dims(model: Any, feature_dim: int) -> None:
    """Give the graph's I/O dimensions the names the manifest uses (the exporter writes ``B_plus_1 - 1``)."""
    wanted: dict[str, list[str | int]] = {**INPUT_SHAPES, "features": ["N", feature_dim], **OUTPUT_SHAPES}
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        for dim, want in zip(dims, wanted.get(value.name, [])):
            if isinstance(want, str) and not dim.HasField("dim_value"):
                dim.dim_param = want


def graph_ops(model_or_path: Any) -> Counter:
    """Operator types used in the graph (functions and subgraphs included)."""
    import onnx

    model = onnx.load(str(model_or_path), load_external_data=False) if isinstance(model_or_path, (str, Path)) \
        else model_or_path
    ops: Counter = Counter()

    def walk(graph: Any) -> None:
        for node in graph.node:
            ops[node.op_type] += 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                for g in attr.graphs:
                    walk(g)

    walk(model.graph)
    for fn in model.functions:
        for node in fn.node:
            ops[node.op_type] += 1
    return ops


def check_graph(path: str | Path, feature_dim: int | None = None) -> dict[str, Any]:
    """The exported file is a valid, single-file ONNX model with the momkd signature and only TensorRT-friendly
    operators. Raises ``ExportError``; returns a small report (op counts, opset, size)."""
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"{path}: exported graph does not pass the ONNX checker ({_one_line(e)})") from None
    external = [t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise ExportError(f"{path}: {len(external)} initializer(s) stored as external data; "
                          "model.onnx must be one file")
    ops = graph_ops(model)
    bad = sorted(set(ops) & FORBIDDEN_OPS)
    if bad:
        raise ExportError(f"{path}: graph uses {', '.join(bad)} (scatter/NonZero/control flow are not allowed in the "
                          "inference graph)")
    unknown = sorted(set(ops) - TRT_ALLOWED_OPS)
    if unknown:
        raise ExportError(f"{path}: graph uses operators outside the TensorRT allow-list: {', '.join(unknown)}")
    if model.functions:
        raise ExportError(f"{path}: graph has {len(model.functions)} local function(s); expected a flat graph")
    names_in = [i.name for i in model.graph.input]
    names_out = [o.name for o in model.graph.output]
    if names_in != list(INPUT_NAMES) or names_out != list(OUTPUT_NAMES):
        raise ExportError(f"{path}: graph signature is {names_in} -> {names_out}, expected "
                          f"{list(INPUT_NAMES)} -> {list(OUTPUT_NAMES)}")
    if feature_dim is not None:
        fdims = model.graph.input[0].type.tensor_type.shape.dim
        if len(fdims) != 2 or fdims[1].dim_value != feature_dim or fdims[0].dim_value:
            raise ExportError(f"{path}: features input is not (N, {feature_dim}) with dynamic N")
    for value in model.graph.input:
        for dim in value.type.tensor_type.shape.dim:
            if value.name != "features" and dim.HasField("dim_value"):
                raise ExportError(f"{path}: input {value.name} has a fixed dimension {dim.dim_value}; expected dynamic")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"ops": dict(sorted(ops.items())), "opset": opset, "bytes": os.path.getsize(path)}


def trace_torchscript(module: nn.Module, path: str | Path, feature_dim: int, k: int) -> None:
    """``torch.jit.trace`` of the same frozen module, saved for the runtime's torch backend (``torch.jit.load``).

    The trace records the ops for one example batch; shape arithmetic is traced symbolically (``aten::size``),
    so the module serves any N, W and B. Verification runs it at another size to prove that.
    """
    args = example_inputs(feature_dim, k)
    try:
        with torch.no_grad(), _quiet():
            traced = torch.jit.trace(module.eval(), args, check_trace=False, strict=False)
            device_agnostic(traced)
            torch.jit.save(traced, str(path))
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"TorchScript trace failed ({type(e).__name__}: {_one_line(e)})") from None


def device_agnostic(traced: Any) -> int:
    """Make a traced module run on the device of its inputs.

    ``torch.jit.trace`` records ``device=`` arguments (``torch.arange(n, device=x.device)`` in the GATv2 gather
    plan and the slide-membership mask) as constants of the tracing device, so a module traced on CPU would
    build those tensors on the CPU even when loaded with ``map_location="cuda"``. The forward graph is inlined
    and every Device constant is replaced by ``prim::device(features)``. Returns the number replaced.
    """
    graph = traced.graph
    torch._C._jit_pass_inline(graph)
    features = list(graph.inputs())[1]  # inputs: self, features, neighbors, slide_offsets
    replaced = 0
    for node in list(graph.nodes()):
        if node.kind() == "prim::Constant" and node.output().type().kind() == "DeviceObjType":
            device = graph.create("prim::device", [features])
            device.output().setType(torch._C.DeviceObjType.get())
            device.insertBefore(node)
            node.output().replaceAllUsesWith(device.output())
            node.destroy()
            replaced += 1
    torch._C._jit_pass_lint(graph)
    return replaced
