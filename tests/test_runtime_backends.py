"""Backends: ONNX Runtime options and I/O checks, auto selection on this machine, the torch backend (TorchScript),
the TensorRT backend's code path (against a host-memory stand-in of the TensorRT API here; against real
TensorRT in the tests marked ``tensorrt``), and CUDA parity (marked ``gpu``)."""

from __future__ import annotations

import ctypes
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from momkd.errors import ModelFolderError
from momkd.graph import neighbor_table
from momkd.manifest import load_manifest, write_manifest
from momkd.runtime.backends import (TENSORRT_MISSING, BackendError, OnnxRuntimeBackend, TensorRTBackend, cpu_count,
                                    importable, parse_device, select_backend, shared_cpu_arena)
from momkd.data.batch import GraphSlide, pack_slides
from momkd.runtime.pipeline import run_inference
from momkd.synth import grid_coords

from momkd.testing.toy import build_toy_model_dir, toy_reference, write_slide_folder

DIM = 12


def _has_cuda_ep() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def _torch_cuda() -> bool:
    if not importable("torch"):
        return False
    import torch

    return torch.cuda.is_available()


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> tuple[Path, dict]:
    d = tmp_path_factory.mktemp("toy") / "model"
    return d, build_toy_model_dir(d, feature_dim=DIM, hidden=8, seed=2)


def _batch(sizes=(9, 1, 30), seed=0):
    rng = np.random.default_rng(seed)
    slides, raw = [], []
    for i, n in enumerate(sizes):
        f = rng.standard_normal((n, DIM)).astype(np.float32)
        nb = neighbor_table(grid_coords(n, seed=i), k=8)
        raw.append((f, nb))
        slides.append(GraphSlide(f"s{i}", f.copy(), nb, n, index=i))
    return pack_slides(slides), raw


def _check(outputs: dict, pack, raw, params, atol=1e-5) -> None:
    assert outputs["probability"].shape == (len(raw),) and outputs["attention"].shape == (pack.rows,)
    for b, (f, nb) in enumerate(raw):
        ref = toy_reference(f, nb, params)
        r0, r1 = pack.slide_offsets[b], pack.slide_offsets[b + 1]
        assert outputs["probability"][b] == pytest.approx(float(ref["probability"]), abs=atol)
        np.testing.assert_allclose(outputs["attention"][r0:r1], ref["attention"], atol=atol)
        np.testing.assert_allclose(outputs["patch_score"][r0:r1], ref["patch_score"], atol=atol * 10)


def test_parse_device() -> None:
    assert parse_device(None) == (None, 0) and parse_device("auto") == (None, 0)
    assert parse_device("cpu") == ("cpu", 0) and parse_device("CUDA") == ("cuda", 0)
    assert parse_device("cuda:3") == ("cuda", 3)
    with pytest.raises(BackendError, match="unknown device"):
        parse_device("tpu")


def test_onnxruntime_cpu_session_options_and_outputs(toy) -> None:
    model_dir, params = toy
    be = OnnxRuntimeBackend(model_dir / "model.onnx", "cpu", feature_dim=DIM)
    opts = be.session.get_session_options()
    import onnxruntime as ort

    assert opts.intra_op_num_threads == cpu_count()
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # every pack has a new N: no memory patterns, and the process-wide exact-size arena instead of a session's own
    assert not opts.enable_mem_pattern and not opts.enable_mem_reuse and shared_cpu_arena()
    assert opts.get_session_config_entry("session.use_env_allocators") == "1"
    assert be.session.get_providers() == ["CPUExecutionProvider"] and be.detail == "CPUExecutionProvider"
    pack, raw = _batch()
    _check(be.run(pack.features, pack.neighbors, pack.slide_offsets), pack, raw, params)
    # a second session in the same process shares the arena (registered once) and gives the same outputs
    again = OnnxRuntimeBackend(model_dir / "model.onnx", "cpu", feature_dim=DIM)
    _check(again.run(pack.features, pack.neighbors, pack.slide_offsets), pack, raw, params)


def test_onnxruntime_refuses_a_model_with_the_wrong_signature(toy, tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, tmp_path / "wrong.onnx")
    with pytest.raises(ModelFolderError, match="momkd inference signature"):
        OnnxRuntimeBackend(tmp_path / "wrong.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelFolderError, match="onnxruntime cannot load"):
        OnnxRuntimeBackend(tmp_path / "junk.onnx")
    with pytest.raises(ModelFolderError, match="manifest says 99"):
        OnnxRuntimeBackend(toy[0] / "model.onnx", feature_dim=99)


@pytest.mark.skipif(_has_cuda_ep(), reason="this onnxruntime has CUDA")
def test_auto_on_this_machine_is_onnxruntime_cpu(toy) -> None:
    notes = []
    be = select_backend("auto", None, load_manifest(toy[0]), log=notes.append)
    assert (be.name, be.device) == ("onnxruntime", "cpu")
    assert notes and "onnxruntime on CPU" in notes[0]
    assert select_backend("auto", "cpu", load_manifest(toy[0])).name == "onnxruntime"
    with pytest.raises(BackendError, match="no CUDA backend"):
        select_backend("auto", "cuda", load_manifest(toy[0]))
    with pytest.raises(BackendError, match="onnxruntime-gpu"):
        select_backend("onnxruntime", "cuda", load_manifest(toy[0]))


@pytest.mark.skipif(importable("tensorrt"), reason="tensorrt is installed")
def test_tensorrt_is_gated_with_a_clear_message(toy, tmp_path: Path) -> None:
    with pytest.raises(BackendError) as ei:
        TensorRTBackend(tmp_path / "model.plan")
    assert str(ei.value) == TENSORRT_MISSING
    with pytest.raises(BackendError, match="no TensorRT engine"):
        select_backend("tensorrt", None, load_manifest(toy[0]))


def test_torch_backend_needs_torch_and_a_torchscript_file(toy, monkeypatch) -> None:
    with pytest.raises(BackendError, match="no TorchScript model"):
        select_backend("torch", "cpu", load_manifest(toy[0]))
    monkeypatch.setitem(sys.modules, "torch", None)
    from momkd.runtime.backends import TorchBackend

    with pytest.raises(BackendError, match="needs PyTorch"):
        TorchBackend(toy[0] / "model.pt", "cpu")


def test_torch_backend_cpu_matches_onnxruntime(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    model_dir = tmp_path / "m"
    params = build_toy_model_dir(model_dir, feature_dim=DIM, hidden=8, seed=2, torchscript=True)
    be = select_backend("torch", "cpu", load_manifest(model_dir))
    assert (be.name, be.device) == ("torch", "cpu")
    pack, raw = _batch()
    _check(be.run(pack.features, pack.neighbors, pack.slide_offsets), pack, raw, params)
    write_slide_folder(tmp_path / "in", [4, 20], DIM)
    summary = run_inference(model_dir, tmp_path / "in", tmp_path / "out", backend="torch", device="cpu")
    assert summary.exit_code == 0 and summary.backend == "torch"


# ----------------------------------------------------------------------------- TensorRT, host-memory stand-in
class _HostMemory:
    """Stands in for CUDA memory: 'device pointers' are host addresses, copies are memmove."""

    kind = "host"
    stream_handle = 0

    def malloc(self, n: int):
        buf = np.empty(n, np.uint8)
        return buf, buf.ctypes.data

    def free(self, buf) -> None:
        pass

    def htod(self, buf, arr: np.ndarray) -> None:
        ctypes.memmove(buf.ptr, arr.ctypes.data, arr.nbytes)

    def dtoh(self, arr: np.ndarray, buf) -> None:
        ctypes.memmove(arr.ctypes.data, buf.ptr, arr.nbytes)

    def synchronize(self) -> None:
        pass


def _fake_tensorrt(max_rows: int, max_slides: int, calls: list) -> types.ModuleType:
    """The slice of the TensorRT 10 API the backend uses; the 'engine' runs the ONNX bytes it was given."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.fake"
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level=2: None})
    trt.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    trt.nptype = lambda dt: dt
    dtypes = {"features": np.float32, "neighbors": np.int64, "slide_offsets": np.int64, "probability": np.float32,
              "logits": np.float32, "attention": np.float32, "patch_score": np.float32}
    names = list(dtypes)

    class Context:
        def __init__(self, session) -> None:
            self.session, self.shapes, self.addr = session, {}, {}

        def set_input_shape(self, name, shape) -> bool:
            self.shapes[name] = tuple(shape)
            return not (name == "features" and shape[0] > max_rows) and not (
                name == "slide_offsets" and shape[0] > max_slides + 1)

        def set_tensor_address(self, name, ptr) -> None:
            self.addr[name] = ptr

        def get_tensor_shape(self, name):
            n, b = self.shapes["features"][0], self.shapes["slide_offsets"][0] - 1
            return {"probability": (b,), "logits": (b, 2), "attention": (n,), "patch_score": (n,)}[name]

        def _view(self, name, shape):
            dt = np.dtype(dtypes[name])
            size = int(np.prod(shape)) * dt.itemsize
            return np.frombuffer((ctypes.c_char * size).from_address(self.addr[name]), dtype=dt).reshape(shape)

        def execute_async_v3(self, stream) -> bool:
            feeds = {n: self._view(n, self.shapes[n]).copy() for n in ("features", "neighbors", "slide_offsets")}
            calls.append((feeds["features"].shape[0], len(feeds["slide_offsets"]) - 1))
            outs = dict(zip(["probability", "logits", "attention", "patch_score"], self.session.run(None, feeds)))
            for name, arr in outs.items():
                self._view(name, self.get_tensor_shape(name))[...] = arr
            return True

    class Engine:
        num_io_tensors = len(names)

        def __init__(self, plan: bytes) -> None:
            import onnxruntime as ort

            self.session = ort.InferenceSession(plan, providers=["CPUExecutionProvider"])

        def get_tensor_name(self, i):
            return names[i]

        def get_tensor_mode(self, name):
            return "in" if name in ("features", "neighbors", "slide_offsets") else "out"

        def get_tensor_dtype(self, name):
            return dtypes[name]

        def get_tensor_profile_shape(self, name, profile):
            return {"features": ((1, DIM), (1000, DIM), (max_rows, DIM)),
                    "neighbors": ((1, 1), (1000, 8), (max_rows, 8)),
                    "slide_offsets": ((2,), (8,), (max_slides + 1,))}[name]

        def create_execution_context(self):
            return Context(self.session)

    class Runtime:
        def __init__(self, logger) -> None:
            pass

        def deserialize_cuda_engine(self, plan: bytes):
            return Engine(plan) if plan.startswith(b"\x08") else None   # an ONNX ModelProto, or garbage

    trt.Runtime = Runtime
    return trt


def test_tensorrt_backend_code_path_with_host_memory(toy, tmp_path: Path, monkeypatch) -> None:
    model_dir, params = toy
    calls: list = []
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt(max_rows=50, max_slides=3, calls=calls))
    plan = tmp_path / "model.plan"
    plan.write_bytes((model_dir / "model.onnx").read_bytes())
    be = TensorRTBackend(plan, "cuda", device_api=_HostMemory())
    assert (be.max_rows, be.max_width, be.max_slides, be.name) == (50, 8, 3, "tensorrt")
    pack, raw = _batch((9, 1, 30))
    _check(be.run(pack.features, pack.neighbors, pack.slide_offsets), pack, raw, params)
    pack2, raw2 = _batch((3, 2), seed=1)                   # smaller call reuses the grown buffers
    _check(be.run(pack2.features, pack2.neighbors, pack2.slide_offsets), pack2, raw2, params)
    (tmp_path / "bad.plan").write_bytes(b"garbage")
    with pytest.raises(BackendError, match="cannot load this engine"):
        TensorRTBackend(tmp_path / "bad.plan", "cuda", device_api=_HostMemory())
    with pytest.raises(BackendError, match="CUDA only"):
        TensorRTBackend(plan, "cpu", device_api=_HostMemory())

    # in the pipeline: packs stay inside the engine's profile, a slide over max_rows is reported, not run
    write_slide_folder(tmp_path / "in", [10, 10, 10, 10, 60, 45, 5], DIM)
    calls.clear()
    summary = run_inference(model_dir, tmp_path / "in", tmp_path / "out", batch_patches=1000, backend_obj=be)
    assert all(n <= 50 and b <= 3 for n, b in calls) and sum(n for n, _ in calls) == 90   # the 60 never ran
    assert summary.n_failed == 1 and summary.n_ok == 6
    from momkd.runtime.results import read_predictions

    row = read_predictions(tmp_path / "out" / "predictions.csv")[4]
    assert (row.slide_id, row.status, row.n_patches) == ("slide_004", "error", "60")
    assert row.error.startswith("too_large: slide has 60 patches, more than the tensorrt engine's maximum of 50")


def test_select_tensorrt_needs_an_engine_in_the_manifest(toy, tmp_path: Path, monkeypatch) -> None:
    import shutil

    model_dir = tmp_path / "m"
    shutil.copytree(toy[0], model_dir)
    (model_dir / "model.plan").write_bytes((model_dir / "model.onnx").read_bytes())
    raw = load_manifest(model_dir).raw
    raw["tensorrt"] = {"file": "model.plan", "profiles": [], "precision": "fp32", "device": "fake",
                       "tensorrt_version": "10"}
    raw.pop("artifacts")
    write_manifest(model_dir, raw)
    m = load_manifest(model_dir)
    assert m.tensorrt is not None and m.tensorrt_path.name == "model.plan" and "model.plan" in m.artifacts
    if not importable("tensorrt"):
        with pytest.raises(BackendError, match="needs the 'tensorrt' package"):
            select_backend("tensorrt", None, m)
        if not _has_cuda_ep():   # auto skips an unusable TensorRT and says why
            notes = []
            assert select_backend("auto", None, m, log=notes.append).name == "onnxruntime"
            assert "tensorrt: package not installed" in notes[0]


# ----------------------------------------------------------------------------- real GPU stacks
@pytest.mark.tensorrt
def test_tensorrt_engine_matches_onnxruntime(toy, tmp_path: Path) -> None:
    trt = pytest.importorskip("tensorrt")
    if not _torch_cuda() and not importable("cuda") and not importable("cupy"):
        pytest.skip("no CUDA memory library")
    model_dir, params = toy
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse((model_dir / "model.onnx").read_bytes())
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("features", (1, DIM), (64, DIM), (256, DIM))
    profile.set_shape("neighbors", (1, 1), (64, 8), (256, 16))
    profile.set_shape("slide_offsets", (2,), (4,), (9,))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    (tmp_path / "model.plan").write_bytes(bytes(plan))
    be = TensorRTBackend(tmp_path / "model.plan", "cuda")
    pack, raw = _batch()
    _check(be.run(pack.features, pack.neighbors, pack.slide_offsets), pack, raw, params, atol=1e-4)
    be.close()


@pytest.mark.gpu
def test_onnxruntime_cuda_matches_cpu(toy) -> None:
    if not _has_cuda_ep():
        pytest.skip("onnxruntime has no CUDA execution provider")
    model_dir, params = toy
    be = OnnxRuntimeBackend(model_dir / "model.onnx", "cuda")
    assert be.detail == "CUDAExecutionProvider"
    pack, raw = _batch()
    _check(be.run(pack.features, pack.neighbors, pack.slide_offsets), pack, raw, params, atol=1e-4)


@pytest.mark.gpu
def test_torch_cuda_matches_reference(tmp_path: Path) -> None:
    if not _torch_cuda():
        pytest.skip("no CUDA device for torch")
    model_dir = tmp_path / "m"
    params = build_toy_model_dir(model_dir, feature_dim=DIM, hidden=8, seed=2, torchscript=True)
    be = select_backend("torch", "cuda", load_manifest(model_dir))
    assert be.device == "cuda"
    pack, raw = _batch()
    _check(be.run(pack.features, pack.neighbors, pack.slide_offsets), pack, raw, params, atol=1e-4)
    # auto never runs the TorchScript file (code), even where it is the only CUDA backend: only --backend torch
    assert select_backend("auto", None, load_manifest(model_dir)).name != "torch"
