"""``momkd export --format triton``: every config.pbtxt parses as a Triton ModelConfig (tritonclient's protobuf),
the ragged ONNX step matches local inference on a batch laid out as Triton's ragged batching lays it out, and the
graph step (the part the bundled server can load: it has no onnxruntime backend) serves on 127.0.0.1."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from momkd.cli.main import app
from momkd.data.batch import graph_slide, pack_slides
from momkd.export.triton_repo import FEATURE_OFFSETS, GRAPH_STEP_CLASS
from momkd.graph import neighbor_table
from momkd.manifest import Manifest, load_manifest
from momkd.runtime.backends import select_backend
from momkd.serve.graph_step import NEIGHBORS_LOCAL, padded_neighbors
from momkd.serve.repository import import_paths, model_py
from momkd.serve.server import Ports, TritonServer
from momkd.testing.toy import build_toy_model_dir

D = 8


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    root = tmp_path_factory.mktemp("triton_repo") / "model"
    build_toy_model_dir(root, feature_dim=D, hidden=4, threshold=0.6)
    return load_manifest(root)


@pytest.fixture(scope="module")
def repo(model: Manifest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("triton_repo_out") / "repo"
    result = CliRunner().invoke(app, ["export", str(model.root), "--format", "triton", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def grid(n: int) -> np.ndarray:
    side = int(np.ceil(np.sqrt(n)))
    return np.stack([np.arange(n) % side, np.arange(n) // side], axis=1).astype(np.int64) * 256


def parse(path: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(encoding="utf-8"), model_config_pb2.ModelConfig())


def test_every_config_parses_and_wires_the_ensemble(repo: Path, model: Manifest) -> None:
    from tritonclient.grpc import model_config_pb2 as pb

    configs = {p.parent.name: parse(p) for p in sorted(repo.glob("*/config.pbtxt"))}
    assert set(configs) == {"momkd", "momkd_graph", "momkd_model"}
    for name in configs:
        assert (repo / name / "1").is_dir()
    ens, graph, step = configs["momkd"], configs["momkd_graph"], configs["momkd_model"]
    assert ens.platform == "ensemble" and [s.model_name for s in ens.ensemble_scheduling.step] == [
        "momkd_graph", "momkd_model"]
    assert ens.parameters["manifest_sha256"].string_value == model.sha256
    assert [(i.name, i.data_type, list(i.dims)) for i in ens.input] == [
        ("features", pb.TYPE_FP32, [-1, D]), ("coords", pb.TYPE_INT64, [-1, 2])]
    assert {o.name for o in ens.output} == {"probability", "prediction"}
    assert graph.backend == "python" and (repo / "momkd_graph" / "1" / "model.py").is_file()
    assert step.backend == "onnxruntime" and (repo / "momkd_model" / "1" / "model.onnx").is_file()
    assert all(i.allow_ragged_batch for i in step.input) and step.HasField("dynamic_batching")
    (batch_input,) = step.batch_input
    assert batch_input.kind == pb.BatchInput.BATCH_ACCUMULATED_ELEMENT_COUNT_WITH_ZERO
    assert list(batch_input.target_name) == [FEATURE_OFFSETS]
    # every tensor an ensemble step reads is an ensemble input or another step's output
    produced = {i.name for i in ens.input} | {v for s in ens.ensemble_scheduling.step for v in s.output_map.values()}
    for s in ens.ensemble_scheduling.step:
        assert set(s.input_map.values()) <= produced
        assert set(s.input_map) <= {i.name for i in configs[s.model_name].input}
        assert set(s.output_map) <= {o.name for o in configs[s.model_name].output}


def test_ragged_onnx_step_matches_local_inference(repo: Path, model: Manifest) -> None:
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    slides = [(rng.standard_normal((n, D)).astype(np.float32), grid(n)) for n in (30, 1, 57, 12)]
    width = model.model.k
    # Triton's ragged batch for the onnxruntime backend: inputs concatenated into 1-D tensors, the batch input
    # = accumulated element counts of features (FP32), starting at 0
    feed = {"features_ragged": np.concatenate([f.ravel() for f, _ in slides]),
            NEIGHBORS_LOCAL: np.concatenate([padded_neighbors(c, model.model.k, "paper", width).ravel()
                                            for _, c in slides]),
            FEATURE_OFFSETS: np.cumsum([0] + [f.size for f, _ in slides]).astype(np.float32)}
    session = ort.InferenceSession(str(repo / "momkd_model" / "1" / "model.onnx"))
    probability, prediction = session.run(["slide_probability", "slide_prediction"], feed)
    assert probability.shape == (4, 1) and prediction.dtype == np.int32
    be = select_backend("onnxruntime", "cpu", model)
    for b, (f, c) in enumerate(slides):
        pack = pack_slides([graph_slide("s", f, c, model.model.k, model.model.graph_direction)])
        ref = float(be.run(pack.features, pack.neighbors, pack.slide_offsets)["probability"][0])
        assert abs(float(probability[b, 0]) - ref) <= 1e-6
        assert int(prediction[b, 0]) == int(ref >= model.model.threshold)


def test_padded_neighbors_refuses_a_table_wider_than_the_repository() -> None:
    coords = grid(40)
    table = neighbor_table(coords, k=4)
    out = padded_neighbors(coords, 4, "paper", 6)
    assert isinstance(out, np.ndarray) and out.shape == (40, 6)
    assert np.array_equal(out[:, :4], table) and (out[:, 4:] == -1).all()
    problem = padded_neighbors(coords, 4, "paper", 3)
    assert isinstance(problem, str) and "neighbor_width 3" in problem


def test_export_refuses_a_non_empty_repository(repo: Path, model: Manifest) -> None:
    result = CliRunner().invoke(app, ["export", str(model.root), "--format", "triton", "--out", str(repo)])
    assert result.exit_code == 2 and "--overwrite" in result.output


@pytest.mark.server
@pytest.mark.slow   # starts its own server (~8 s)
def test_the_graph_step_serves_on_the_bundled_server(repo: Path, model: Manifest, tmp_path: Path) -> None:
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    only_graph = tmp_path / "repo"
    shutil.copytree(repo / "momkd_graph", only_graph / "momkd_graph")
    # the exported model.py imports the container's installed momkd; here the stub needs this checkout's path
    (only_graph / "momkd_graph" / "1" / "model.py").write_text(model_py(GRAPH_STEP_CLASS, import_paths()))
    ports = Ports.free()
    server = TritonServer(None, ports=ports, address="127.0.0.1", repository=only_graph)
    server.start()
    try:
        server.wait_ready(timeout_s=90)
        client = httpclient.InferenceServerClient(server.http_url.removeprefix("http://"))

        def infer(features: np.ndarray, coords: np.ndarray) -> np.ndarray:
            inputs = [httpclient.InferInput("features", [1, *features.shape], "FP32"),
                      httpclient.InferInput("coords", [1, *coords.shape], "INT64")]
            inputs[0].set_data_from_numpy(features[None])
            inputs[1].set_data_from_numpy(coords[None])
            return client.infer("momkd_graph", inputs).as_numpy(NEIGHBORS_LOCAL)

        coords = grid(50)
        features = np.random.default_rng(1).standard_normal((50, D)).astype(np.float32)
        got = infer(features, coords)
        assert np.array_equal(got[0], padded_neighbors(coords, model.model.k, "paper", model.model.k))
        features[7, 3] = np.inf
        with pytest.raises(InferenceServerException, match="NaN or Inf in 1 of 50 rows"):
            infer(features, coords)
        with pytest.raises(InferenceServerException, match="N must match"):
            infer(features[:49], coords)
        assert infer(features[:7], coords[:7]).shape == (1, 7, model.model.k)   # still serving
    finally:
        server.stop()
