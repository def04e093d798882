"""``momkd export --format triton``: a model folder as a standard Triton model repository for the stock NGC
``tritonserver`` container (onnxruntime and Python backends), three models wired as an ensemble::

    REPO/momkd/config.pbtxt           ensemble: features (1, N, D) FP32 + coords (1, N, 2) INT64
                                                -> probability (1, 1) FP32, prediction (1, 1) INT32
    REPO/momkd_graph/config.pbtxt     Python backend (momkd.serve.graph_step): checks the slide, builds its
    REPO/momkd_graph/1/model.py       neighbour table (momkd.graph, as `momkd infer`), padded to neighbor_width
    REPO/momkd_model/config.pbtxt     onnxruntime backend, dynamic + ragged batching: the requests waiting are
    REPO/momkd_model/1/model.onnx     concatenated row-wise into one packed batch (no padding)

``momkd_model/1/model.onnx`` is the model folder's graph behind a small prologue that turns Triton's ragged
batch (the onnxruntime backend concatenates ragged inputs into 1-D tensors) into the graph's packed contract:
``features`` reshaped to (sum N, D); ``slide_offsets`` from the
``BATCH_ACCUMULATED_ELEMENT_COUNT_WITH_ZERO`` batch input of ``features`` (element counts / D); each row's local
neighbour indices shifted by its slide's first row. Per-row outputs (attention, patch score) cannot be scattered
back per request by Triton's ragged batching, so the repository answers probability and prediction; ``momkd
serve`` answers all four. The graph step imports ``momkd`` (install it in the container: ``pip install momkd``).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from momkd.errors import MomkdError
from momkd.manifest import MANIFEST_NAME, Manifest, load_manifest
from momkd.runtime.remote import COORDS, DEFAULT_MODEL_NAME, FEATURES, PREDICTION, PROBABILITY
from momkd.serve.graph_step import NEIGHBORS_LOCAL
from momkd.serve.repository import CONFIG_NAME, VERSION, TensorSpec, model_config_text, model_py

GRAPH_STEP_CLASS = "momkd.serve.graph_step:GraphStepModel"
FEATURE_OFFSETS = "feature_offsets"
SLIDE_PROBABILITY = "slide_probability"
SLIDE_PREDICTION = "slide_prediction"
DEFAULT_MAX_SLIDES = 64
OFFICIAL_WIDTH_FACTOR = 4     # an "official" (reverse k-NN) table is as wide as the largest in-degree


class TritonRepositoryError(MomkdError):
    """The repository cannot be written (existing folder, unsupported graph)."""


def neighbor_width(manifest: Manifest) -> int:
    """The fixed neighbour-table width of the repository: k for "paper" graphs, a bound on the in-degree for
    "official" graphs (a slide whose table is wider is refused by the graph step, naming the limit)."""
    k = manifest.model.k
    return k if manifest.model.graph_direction == "paper" else OFFICIAL_WIDTH_FACTOR * k


def ragged_model(model: Any, feature_dim: int, width: int, threshold: float) -> Any:
    """The exported graph (an ``onnx.ModelProto`` with inputs features, neighbors, slide_offsets) behind the
    ragged-batch prologue of the module docstring; outputs ``slide_probability (B, 1)`` and ``slide_prediction
    (B, 1)`` INT32 (probability >= ``threshold``)."""
    import onnx
    from onnx import TensorProto, helper

    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < 13:
        raise TritonRepositoryError(f"the model's ONNX opset is {opset}; the Triton repository needs 13 or newer")
    g = model.graph
    names = {i.name for i in g.input}
    if not {"features", "neighbors", "slide_offsets"} <= names:
        raise TritonRepositoryError(f"the model's inputs are {sorted(names)}, not features/neighbors/slide_offsets")

    def const(name: str, values: list[int] | list[float], dtype: int = TensorProto.INT64) -> Any:
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, dtype, [len(values)], values))

    prologue = [
        const("_shape_x", [-1, feature_dim]), const("_shape_nb", [-1, width]), const("_dim", [feature_dim]),
        const("_zero", [0]), const("_one", [1]), const("_minus1", [-1]), const("_big", [2 ** 62]),
        const("_axis1", [1]), const("_threshold", [threshold], TensorProto.FLOAT),
        helper.make_node("Reshape", [FEATURES + "_ragged", "_shape_x"], ["features"]),
        helper.make_node("Reshape", [NEIGHBORS_LOCAL, "_shape_nb"], ["_nb_local"]),
        helper.make_node("Cast", [FEATURE_OFFSETS], ["_elem_offsets"], to=TensorProto.INT64),
        helper.make_node("Div", ["_elem_offsets", "_dim"], ["slide_offsets"]),
        helper.make_node("Shape", ["features"], ["_shape"]),
        helper.make_node("Gather", ["_shape", "_zero"], ["_n"], axis=0),
        helper.make_node("Squeeze", ["_n", "_zero"], ["_n_scalar"]),
        helper.make_node("Constant", [], ["_zero_scalar"], value=helper.make_tensor("_zs", TensorProto.INT64, [], [0])),
        helper.make_node("Constant", [], ["_one_scalar"], value=helper.make_tensor("_os", TensorProto.INT64, [], [1])),
        helper.make_node("Range", ["_zero_scalar", "_n_scalar", "_one_scalar"], ["_rows"]),
        helper.make_node("Unsqueeze", ["_rows", "_axis1"], ["_rows_col"]),                     # (N, 1)
        helper.make_node("Slice", ["slide_offsets", "_one", "_big"], ["_ends"]),                # (B,)
        helper.make_node("Slice", ["slide_offsets", "_zero", "_minus1"], ["_starts"]),          # (B,)
        helper.make_node("Unsqueeze", ["_ends", "_zero"], ["_ends_row"]),                       # (1, B)
        helper.make_node("GreaterOrEqual", ["_rows_col", "_ends_row"], ["_past"]),             # (N, B)
        helper.make_node("Cast", ["_past"], ["_past_i"], to=TensorProto.INT64),
        helper.make_node("ReduceSum", ["_past_i", "_axis1"], ["_slide_of_row"], keepdims=0),   # (N,)
        helper.make_node("Gather", ["_starts", "_slide_of_row"], ["_row_start"], axis=0),      # (N,)
        helper.make_node("Unsqueeze", ["_row_start", "_axis1"], ["_row_start_col"]),            # (N, 1)
        helper.make_node("Add", ["_nb_local", "_row_start_col"], ["_nb_global"]),
        helper.make_node("GreaterOrEqual", ["_nb_local", "_zero"], ["_is_edge"]),
        helper.make_node("Where", ["_is_edge", "_nb_global", "_nb_local"], ["neighbors"]),
    ]
    epilogue = [
        helper.make_node("Unsqueeze", ["probability", "_axis1"], [SLIDE_PROBABILITY]),
        helper.make_node("GreaterOrEqual", ["probability", "_threshold"], ["_positive"]),
        helper.make_node("Cast", ["_positive"], ["_positive_i"], to=TensorProto.INT32),
        helper.make_node("Unsqueeze", ["_positive_i", "_axis1"], [SLIDE_PREDICTION]),
    ]
    graph = helper.make_graph(
        prologue + list(g.node) + epilogue, "momkd_ragged",
        inputs=[helper.make_tensor_value_info(FEATURES + "_ragged", TensorProto.FLOAT, ["rows*D"]),    # 1-D: how
                helper.make_tensor_value_info(NEIGHBORS_LOCAL, TensorProto.INT64, ["rows*W"]),       # backends pass
                                                                                                     # ragged inputs
                helper.make_tensor_value_info(FEATURE_OFFSETS, TensorProto.FLOAT, ["B+1"])],
        outputs=[helper.make_tensor_value_info(SLIDE_PROBABILITY, TensorProto.FLOAT, ["B", 1]),
                 helper.make_tensor_value_info(SLIDE_PREDICTION, TensorProto.INT32, ["B", 1])],
        initializer=list(g.initializer), value_info=list(g.value_info))
    wrapped = helper.make_model(graph, opset_imports=list(model.opset_import), producer_name="momkd",
                                ir_version=model.ir_version)
    wrapped.functions.extend(model.functions)
    onnx.checker.check_model(wrapped)
    return wrapped


def graph_config(manifest: Manifest, name: str, max_slides: int, width: int) -> str:
    m = manifest.model
    return model_config_text(
        name, backend="python", max_batch_size=max_slides,
        inputs=[TensorSpec(FEATURES, "TYPE_FP32", (-1, m.feature_dim), allow_ragged_batch=True),
                TensorSpec(COORDS, "TYPE_INT64", (-1, 2), allow_ragged_batch=True)],
        outputs=[TensorSpec(NEIGHBORS_LOCAL, "TYPE_INT64", (-1, width))],
        body="dynamic_batching { max_queue_delay_microseconds: 500 }\ninstance_group [ { kind: KIND_CPU count: 1 } ]",
        parameters={"feature_dim": str(m.feature_dim), "k": str(m.k), "direction": m.graph_direction,
                    "neighbor_width": str(width)})


def model_step_config(manifest: Manifest, name: str, max_slides: int, width: int, max_queue_delay_us: int) -> str:
    body = "\n".join([
        "batch_input [ { kind: BATCH_ACCUMULATED_ELEMENT_COUNT_WITH_ZERO "
        f'target_name: "{FEATURE_OFFSETS}" data_type: TYPE_FP32 source_input: "{FEATURES}_ragged" }} ]',
        f"dynamic_batching {{ max_queue_delay_microseconds: {max_queue_delay_us} }}",
        "instance_group [ { kind: KIND_AUTO count: 1 } ]",
    ])
    return model_config_text(
        name, backend="onnxruntime", max_batch_size=max_slides,
        inputs=[TensorSpec(FEATURES + "_ragged", "TYPE_FP32", (-1, manifest.model.feature_dim),
                           allow_ragged_batch=True),
                TensorSpec(NEIGHBORS_LOCAL, "TYPE_INT64", (-1, width), allow_ragged_batch=True)],
        outputs=[TensorSpec(SLIDE_PROBABILITY, "TYPE_FP32", (1,)), TensorSpec(SLIDE_PREDICTION, "TYPE_INT32", (1,))],
        body=body, parameters={"manifest_sha256": manifest.sha256})


def ensemble_config(manifest: Manifest, name: str, graph: str, model: str, max_slides: int) -> str:
    m = manifest.model
    body = f"""ensemble_scheduling {{
  step [
    {{
      model_name: "{graph}"
      model_version: -1
      input_map {{ key: "{FEATURES}" value: "{FEATURES}" }}
      input_map {{ key: "{COORDS}" value: "{COORDS}" }}
      output_map {{ key: "{NEIGHBORS_LOCAL}" value: "{NEIGHBORS_LOCAL}" }}
    }},
    {{
      model_name: "{model}"
      model_version: -1
      input_map {{ key: "{FEATURES}_ragged" value: "{FEATURES}" }}
      input_map {{ key: "{NEIGHBORS_LOCAL}" value: "{NEIGHBORS_LOCAL}" }}
      output_map {{ key: "{SLIDE_PROBABILITY}" value: "{PROBABILITY}" }}
      output_map {{ key: "{SLIDE_PREDICTION}" value: "{PREDICTION}" }}
    }}
  ]
}}"""
    return model_config_text(
        name, platform="ensemble", max_batch_size=max_slides,
        inputs=[TensorSpec(FEATURES, "TYPE_FP32", (-1, m.feature_dim)), TensorSpec(COORDS, "TYPE_INT64", (-1, 2))],
        outputs=[TensorSpec(PROBABILITY, "TYPE_FP32", (1,)), TensorSpec(PREDICTION, "TYPE_INT32", (1,))],
        body=body, parameters={"manifest_sha256": manifest.sha256, "class_names": ",".join(m.class_names),
                               "threshold": repr(m.threshold)})


def write_triton_repository(model_dir: str | Path, repo: str | Path, *, name: str = DEFAULT_MODEL_NAME,
                            max_slides: int = DEFAULT_MAX_SLIDES, max_queue_delay_us: int = 2000,
                            overwrite: bool = False, pinned_sha256: str | None = None) -> list[Path]:
    """Write the repository of the module docstring for the model folder ``model_dir`` (manifest and checksums
    verified first); returns the ``config.pbtxt`` files written (ensemble, graph step, model step)."""
    import onnx

    manifest = load_manifest(model_dir, verify_checksums=True, pinned_sha256=pinned_sha256)
    root = Path(repo)
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise TritonRepositoryError(f"{root}: exists and is not empty (use --overwrite to replace it)")
        shutil.rmtree(root)
    width = neighbor_width(manifest)
    graph, model = f"{name}_graph", f"{name}_model"
    wrapped = ragged_model(onnx.load(str(manifest.onnx_path)), manifest.model.feature_dim, width,
                           manifest.model.threshold)
    configs = {name: ensemble_config(manifest, name, graph, model, max_slides),
               graph: graph_config(manifest, graph, max_slides, width),
               model: model_step_config(manifest, model, max_slides, width, max_queue_delay_us)}
    written = []
    for model_name, text in configs.items():
        (root / model_name / VERSION).mkdir(parents=True, exist_ok=True)
        path = root / model_name / CONFIG_NAME
        path.write_text(text, encoding="utf-8")
        written.append(path)
    (root / graph / VERSION / "model.py").write_text(model_py(GRAPH_STEP_CLASS), encoding="utf-8")  # installed momkd
    onnx.save(wrapped, str(root / model / VERSION / "model.onnx"))
    return written


def export_triton(source: str | Path, repo: str | Path, *, overwrite: bool = False,
                  log: Callable[[str], None] | None = None, **export_options: Any) -> list[Path]:
    """``momkd export SOURCE --format triton --out REPO``: ``source`` is a model folder (``manifest.json``), or a
    training run first exported (``export_run(..., fmt="onnx", **export_options)``) to a temporary model folder.
    Returns the ``config.pbtxt`` files written."""
    from momkd.export.folder import export_run

    say = log or (lambda _m: None)
    source = Path(source)
    if (source / MANIFEST_NAME).is_file():
        written = write_triton_repository(source, repo, overwrite=overwrite)
    else:
        with tempfile.TemporaryDirectory(prefix="momkd-triton-export-") as tmp:
            export_run(source, Path(tmp) / "model", fmt="onnx", log=say, **export_options)
            written = write_triton_repository(Path(tmp) / "model", repo, overwrite=overwrite)
    say(f"wrote the Triton model repository {repo}: " + ", ".join(p.parent.name for p in written))
    return written
