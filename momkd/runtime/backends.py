"""Inference backends behind one small protocol, and ``select_backend`` (auto = TensorRT > ORT-CUDA > ORT-CPU;
the torch backend runs only when named: a TorchScript file is code).

Every backend runs the exported graph's contract: inputs ``features (N, D) float32``, ``neighbors (N, W)
int64`` (global rows of the packed batch, -1 pad), ``slide_offsets (B+1,) int64``; outputs ``probability
(B,)``, ``logits (B, 2)``, ``attention (N,)``, ``patch_score (N,)``.

Every backend loads the bytes of its artifact once and, given the manifest's sha256 (``select_backend`` always
passes it), checks them before deserializing exactly those bytes (``momkd.manifest.read_artifact``); an ONNX
graph that references external data files is refused, as their bytes are not covered by any checksum.

Nothing here imports torch or tensorrt unless that backend is chosen (or tensorrt probed by ``auto``).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np

from momkd.data.batch import INPUT_NAMES, OUTPUT_NAMES
from momkd.errors import ModelFolderError, MomkdError
from momkd.manifest import MANIFEST_NAME, read_artifact

from .cpu import CpuInfo, cpu_info, usable_cpus

REQUIRED_OUTPUTS = ("probability", "attention", "patch_score")
BACKENDS = ("auto", "onnxruntime", "tensorrt", "torch")

TENSORRT_MISSING = "tensorrt backend needs the 'tensorrt' package and a CUDA GPU (pip install momkd[gpu])"


class BackendError(MomkdError):
    """The requested backend/device cannot be used here (a usage error: exit code 2)."""


@runtime_checkable
class Backend(Protocol):
    name: str                 # "onnxruntime" | "tensorrt" | "torch"
    device: str               # "cpu" | "cuda" | "cuda:N"
    detail: str               # what actually runs, e.g. "CPUExecutionProvider" (reported in the summary)
    max_rows: int | None      # most rows one call accepts (TensorRT profile), None = unlimited
    max_slides: int | None    # most slides one call accepts, None = unlimited
    # optional: max_width (widest neighbour table one call accepts; TensorRT profile), read with getattr
    # optional: run_options() and run(..., run_options=...): a call that another thread can cancel (onnxruntime)

    def run(self, features: np.ndarray, neighbors: np.ndarray, slide_offsets: np.ndarray) -> dict[str, np.ndarray]:
        """Run one packed batch; returns numpy arrays keyed by output name (at least REQUIRED_OUTPUTS)."""
        ...

    def close(self) -> None: ...


def cpu_count() -> int:
    """Threads worth running here: the CPUs this process may use (affinity, capped by the cgroup CPU quota;
    ``momkd.runtime.cpu.usable_cpus``)."""
    return usable_cpus()


def parse_device(device: str | None) -> tuple[str | None, int]:
    """``None``/``"auto"`` -> (None, 0); ``"cpu"``; ``"cuda"`` / ``"cuda:N"``. Anything else is a BackendError."""
    if device is None or device == "auto":
        return None, 0
    d = device.strip().lower()
    if d == "cpu":
        return "cpu", 0
    if d == "cuda":
        return "cuda", 0
    if d.startswith("cuda:") and d[5:].isdigit():
        return "cuda", int(d[5:])
    raise BackendError(f"unknown device {device!r} (use cpu, cuda or cuda:N)")


def _one_line(e: BaseException | str, limit: int = 300) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _check_io(where: str, inputs: list[str], outputs: list[str]) -> None:
    missing_in = [n for n in INPUT_NAMES if n not in inputs]
    missing_out = [n for n in REQUIRED_OUTPUTS if n not in outputs]
    if missing_in or missing_out:
        raise ModelFolderError(f"{where}: the model does not have the momkd inference signature "
                               f"(missing inputs {missing_in}, outputs {missing_out}; has {inputs} -> {outputs})")


# --------------------------------------------------------------------------- onnxruntime
# ONNX protobuf field numbers (onnx.proto3) of the messages that can hold a TensorProto, per message kind.
_ONNX_CHILDREN: dict[str, dict[int, str]] = {
    "model": {7: "graph", 25: "function"},                            # ModelProto.graph, .functions
    "function": {7: "node"},                                          # FunctionProto.node
    "graph": {1: "node", 5: "tensor", 15: "sparse"},                  # GraphProto.node, .initializer, .sparse_init.
    "node": {5: "attribute"},                                         # NodeProto.attribute
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},                             # SparseTensorProto.values, .indices
}
_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION, _EXTERNAL = 13, 14, 1  # TensorProto fields; DataLocation.EXTERNAL


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        byte = buf[i]
        value |= (byte & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if byte < 0x80:
            return value, i


def _proto_fields(buf: memoryview) -> list[tuple[int, Any]]:
    """The (field number, value) pairs of one protobuf message: ints for varints, memoryviews (no copy) for
    length-delimited fields; fixed-width fields are skipped. ValueError for a malformed message."""
    out: list[tuple[int, Any]] = []
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        wire = key & 7
        if wire == 0:
            value, i = _varint(buf, i)
            out.append((key >> 3, value))
        elif wire == 2:
            length, i = _varint(buf, i)
            if i + length > len(buf):
                raise ValueError("truncated field")
            out.append((key >> 3, buf[i:i + length]))
            i += length
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
    return out


def onnx_external_data(model: bytes) -> list[str]:
    """The files an ONNX model's tensors keep their data in (``data_location: EXTERNAL``), in order of first
    mention: initializers, sparse initializers and tensor attributes, in the main graph, its subgraphs and its
    functions. Raises ValueError when ``model`` is not a well-formed protobuf message."""
    locations: list[str] = []
    stack: list[tuple[str, memoryview]] = [("model", memoryview(model))]
    while stack:
        kind, buf = stack.pop()
        fields = _proto_fields(buf)
        if kind == "tensor":
            if (_TENSOR_DATA_LOCATION, _EXTERNAL) in fields:
                entries = [dict(_proto_fields(v)) for f, v in fields if f == _TENSOR_EXTERNAL_DATA]
                where = [bytes(e.get(2, b"")).decode("utf-8", "replace") for e in entries
                         if bytes(e.get(1, b"")) == b"location"]
                for name in where or ["?"]:
                    if name not in locations:
                        locations.append(name)
            continue
        children = _ONNX_CHILDREN[kind]
        stack.extend((children[f], v) for f, v in reversed(fields) if f in children and isinstance(v, memoryview))
    return locations


def _single_file_onnx(model_path: str | Path, model: bytes) -> None:
    """ModelFolderError unless ``model`` is a protobuf message whose tensors all keep their data inside the file
    (so its checksum covers all of it; onnxruntime would read external files relative to its working folder)."""
    try:
        external = onnx_external_data(model)
    except ValueError as e:
        raise ModelFolderError(f"{model_path}: onnxruntime cannot load the model (not an ONNX protobuf message: "
                               f"{e})") from None
    if external:
        raise ModelFolderError(f"{model_path}: references external data ({', '.join(external)}) not listed in "
                               f"{MANIFEST_NAME}; momkd loads single-file ONNX graphs only, re-export the model")


_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32, "tensor(double)": np.float64}


_CPU_ARENA_LOCK = threading.Lock()
_cpu_arena: bool | None = None  # None: not tried yet in this process


def shared_cpu_arena() -> bool:
    """Register (once per process) the CPU arena every ONNX Runtime CPU session of momkd uses: it extends by what
    is requested (``kSameAsRequested``) instead of rounding each extension up to the next power of two, and it
    is shared by the sessions of the process. Returns False where this onnxruntime cannot (sessions then keep
    their own default arena).

    With ONNX Runtime's defaults, ``momkd infer`` of a two-fold paper model on slides of 100000, 30000 and 100000
    patches peaked at 7.7 GiB; with this arena, and memory patterns and planned reuse off (``OnnxRuntimeBackend``),
    3.6 GiB at the same speed (``benchmarks/RESULTS.md``)."""
    global _cpu_arena
    with _CPU_ARENA_LOCK:
        if _cpu_arena is None:
            import onnxruntime as ort

            try:
                info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
                # (max_mem 0 = no limit, extend strategy 1 = kSameAsRequested, default chunk and dead-bytes sizes)
                ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, 1, -1, -1))
                _cpu_arena = True
            except Exception:  # noqa: BLE001 - an older onnxruntime without env allocators: its default arena
                _cpu_arena = False
        return _cpu_arena


class OnnxRuntimeBackend:
    """ONNX Runtime: CPU EP, or CUDA EP (``device="cuda"``, needs onnxruntime-gpu).

    ORT's TensorRT EP is added in front of CUDA only when ``MOMKD_ORT_TENSORRT=1`` (it builds engines when the
    session starts and for new shapes, which is slow; the dedicated ``tensorrt`` backend uses the engine built
    at export time instead).
    """

    name = "onnxruntime"

    def __init__(self, model_path: str | Path, device: str = "cpu", threads: int | None = None,
                 feature_dim: int | None = None, spinning: bool = False, *, sha256: str | None = None) -> None:
        import onnxruntime as ort

        model = read_artifact(model_path, sha256)
        _single_file_onnx(model_path, model)
        kind, index = parse_device(device)
        kind = kind or "cpu"
        available = ort.get_available_providers()
        if kind == "cuda":
            if "CUDAExecutionProvider" not in available:
                raise BackendError("--device cuda with onnxruntime: this onnxruntime has no CUDA execution provider "
                                   f"(available: {', '.join(available)}); install onnxruntime-gpu "
                                   "(pip install momkd[gpu]) or use --device cpu")
            providers: list[Any] = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
            if os.environ.get("MOMKD_ORT_TENSORRT") == "1" and "TensorrtExecutionProvider" in available:
                providers.insert(0, ("TensorrtExecutionProvider", {"device_id": index}))
        else:
            providers = ["CPUExecutionProvider"]
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads or cpu_count()
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # On CPU: memory patterns pre-plan one block per input shape, and every pack has a new N: no gain, more
        # memory. The planner's buffer reuse hands a dead tensor's buffer to a later tensor of the same symbolic
        # shape, which in a fold ensemble keeps the first fold's buffers through the second: off (the shared
        # arena below reuses freed blocks anyway; same speed, bit-identical outputs).
        so.enable_mem_pattern = kind != "cpu"
        so.enable_mem_reuse = kind != "cpu"
        if kind == "cpu" and shared_cpu_arena():
            so.add_session_config_entry("session.use_env_allocators", "1")
        so.log_severity_level = 3
        if not spinning:  # leave the cores to the reader threads while a call waits, and to other jobs on a
            # busy host (a spinning worker takes the CPU share the straggler needs: benchmarks/test_bench_busy_host.py)
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(model, sess_options=so, providers=providers)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise ModelFolderError(f"{model_path}: onnxruntime cannot load the model ({_one_line(e)})") from None
        used = self.session.get_providers()
        if kind == "cuda" and "CUDAExecutionProvider" not in used:
            raise BackendError("--device cuda with onnxruntime: the CUDA execution provider did not start "
                               "(no GPU visible, or CUDA/cuDNN libraries missing); use --device cpu")
        ins = {i.name: i for i in self.session.get_inputs()}
        outs = [o.name for o in self.session.get_outputs()]
        _check_io(str(model_path), list(ins), outs)
        fshape = ins["features"].shape
        if feature_dim is not None and len(fshape) == 2 and isinstance(fshape[1], int) and fshape[1] != feature_dim:
            raise ModelFolderError(f"{model_path}: model takes {fshape[1]} features per patch but the manifest says "
                                   f"{feature_dim}")
        self._in_types = {n: _ORT_TYPES.get(ins[n].type, None) for n in INPUT_NAMES}
        self.output_names = [n for n in outs if n in OUTPUT_NAMES]
        self.device = f"cuda:{index}" if kind == "cuda" and index else kind
        self.detail = used[0]
        self.max_rows: int | None = None
        self.max_slides: int | None = None

    def run(self, features: np.ndarray, neighbors: np.ndarray, slide_offsets: np.ndarray,
            run_options: Any = None) -> dict[str, np.ndarray]:
        feeds = {}
        for name, arr in zip(INPUT_NAMES, (features, neighbors, slide_offsets)):
            dtype = self._in_types[name]
            feeds[name] = arr if dtype is None or arr.dtype == dtype else arr.astype(dtype)
        values = self.session.run(self.output_names, feeds, run_options)
        return dict(zip(self.output_names, values))

    def run_options(self) -> Any:
        """Fresh ``onnxruntime.RunOptions`` for one :meth:`run`: setting its ``terminate`` to True from another
        thread stops that call (it raises; the pipeline's slide timeout)."""
        import onnxruntime as ort

        return ort.RunOptions()

    def close(self) -> None:
        self.session = None


# --------------------------------------------------------------------------- tensorrt
class _DeviceBuffer:
    """Device memory of one I/O tensor (grow-only), from cuda-python, cupy or torch, whichever is present."""

    def __init__(self, api: "_DeviceAPI", nbytes: int) -> None:
        self.api, self.nbytes = api, nbytes
        self.handle, self.ptr = api.malloc(nbytes)


class _DeviceAPI:
    """Minimal CUDA runtime surface: malloc, async copies on one stream, synchronize."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.kind = ""
        errors = []
        for kind in ("cuda-python", "cupy", "torch"):
            try:
                getattr(self, "_init_" + kind.replace("-", "_"))()
                self.kind = kind
                return
            except ImportError as e:
                errors.append(f"{kind}: {_one_line(e, 80)}")
            except Exception as e:  # noqa: BLE001 - a library present but no usable GPU
                raise BackendError(f"tensorrt backend: CUDA device {index} cannot be used via {kind} "
                                   f"({_one_line(e)})") from None
        raise BackendError(f"{TENSORRT_MISSING}: no CUDA memory library found (pip install cuda-python; "
                           f"{'; '.join(errors)})")

    # cuda-python -----------------------------------------------------------------------
    def _init_cuda_python(self) -> None:
        try:
            from cuda.bindings import runtime as rt  # cuda-python >= 12.6
        except ImportError:
            from cuda import cudart as rt
        self._rt = rt
        self._ok(rt.cudaSetDevice(self.index))
        self.stream = self._ok(rt.cudaStreamCreate())
        self.stream_handle = int(self.stream)
        h2d, d2h = rt.cudaMemcpyKind.cudaMemcpyHostToDevice, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost

        def malloc(n: int) -> tuple[Any, int]:
            ptr = self._ok(rt.cudaMalloc(max(n, 1)))
            return ptr, int(ptr)

        self.malloc = malloc
        self.free = lambda buf: rt.cudaFree(buf.handle)
        self.htod = lambda buf, arr: self._ok(
            rt.cudaMemcpyAsync(buf.ptr, arr.ctypes.data, arr.nbytes, h2d, self.stream))
        self.dtoh = lambda arr, buf: self._ok(
            rt.cudaMemcpyAsync(arr.ctypes.data, buf.ptr, arr.nbytes, d2h, self.stream))
        self.synchronize = lambda: self._ok(rt.cudaStreamSynchronize(self.stream))

    def _ok(self, result: Any) -> Any:
        err, *rest = result if isinstance(result, tuple) else (result,)
        if err != self._rt.cudaError_t.cudaSuccess:
            raise RuntimeError(f"CUDA error {err}")
        return rest[0] if rest else None

    # cupy --------------------------------------------------------------------------------
    def _init_cupy(self) -> None:
        import cupy

        cupy.cuda.Device(self.index).use()
        stream = cupy.cuda.Stream(non_blocking=True)
        self.stream, self.stream_handle = stream, stream.ptr

        def malloc(n: int) -> tuple[Any, int]:
            mem = cupy.cuda.alloc(max(n, 1))
            return mem, mem.ptr

        self.malloc = malloc
        self.free = lambda buf: None  # freed when the MemoryPointer is dropped
        self.htod = lambda buf, arr: buf.handle.copy_from_host_async(
            ctypes.c_void_p(arr.ctypes.data), arr.nbytes, stream)
        self.dtoh = lambda arr, buf: buf.handle.copy_to_host_async(ctypes.c_void_p(arr.ctypes.data), arr.nbytes, stream)
        self.synchronize = stream.synchronize

    # torch -------------------------------------------------------------------------------
    def _init_torch(self) -> None:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("torch sees no CUDA device")
        dev = torch.device("cuda", self.index)
        stream = torch.cuda.Stream(device=dev)
        self.stream, self.stream_handle = stream, stream.cuda_stream

        def malloc(n: int) -> tuple[Any, int]:
            t = torch.empty(max(n, 1), dtype=torch.uint8, device=dev)
            return t, t.data_ptr()

        def host(arr: np.ndarray) -> Any:
            return torch.from_numpy(arr.reshape(-1).view(np.uint8))

        def htod(buf: _DeviceBuffer, arr: np.ndarray) -> None:
            with torch.cuda.stream(stream):
                buf.handle[: arr.nbytes].copy_(host(arr), non_blocking=True)

        def dtoh(arr: np.ndarray, buf: _DeviceBuffer) -> None:
            with torch.cuda.stream(stream):
                host(arr).copy_(buf.handle[: arr.nbytes], non_blocking=True)

        self.malloc, self.htod, self.dtoh = malloc, htod, dtoh
        self.free = lambda buf: None
        self.synchronize = stream.synchronize


class TensorRTBackend:
    """A serialized TensorRT engine (``model.plan``) run with the TensorRT 10 Python API.

    The engine's first optimisation profile bounds one call: ``max_rows``, ``max_width`` (neighbour-table width)
    and ``max_slides`` tell the packer, and a slide over ``max_rows`` or ``max_width`` is reported, not run.
    """

    name = "tensorrt"

    def __init__(self, plan_path: str | Path, device: str = "cuda", device_api: Any = None, *,
                 sha256: str | None = None) -> None:
        try:
            import tensorrt as trt
        except ImportError:
            raise BackendError(TENSORRT_MISSING) from None
        kind, index = parse_device(device)
        if kind == "cpu":
            raise BackendError("tensorrt backend runs on CUDA only (use --device cuda, or --backend onnxruntime)")
        self._trt = trt
        self._api = device_api if device_api is not None else _DeviceAPI(index)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        plan = read_artifact(plan_path, sha256)
        engine = self._runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise BackendError(f"{plan_path}: TensorRT {getattr(trt, '__version__', '?')} cannot load this engine "
                               "(built for another GPU or TensorRT version?); rebuild it with `momkd export` here "
                               "or use --backend onnxruntime")
        self.engine = engine
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self._inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if engine.get_tensor_mode(n) != trt.TensorIOMode.INPUT and n in OUTPUT_NAMES]
        _check_io(str(plan_path), self._inputs, self._outputs)
        self._dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        _, _, fmax = engine.get_tensor_profile_shape("features", 0)
        _, _, nmax = engine.get_tensor_profile_shape("neighbors", 0)
        _, _, omax = engine.get_tensor_profile_shape("slide_offsets", 0)
        self.max_rows: int | None = int(fmax[0])
        self.max_width = int(nmax[1])
        self.max_slides: int | None = int(omax[0]) - 1
        self._buffers: dict[str, _DeviceBuffer] = {}
        self.device = f"cuda:{index}" if index else "cuda"
        self.detail = f"TensorRT {getattr(trt, '__version__', '')} via {getattr(self._api, 'kind', 'custom')}".strip()

    def _buffer(self, name: str, nbytes: int) -> _DeviceBuffer:
        buf = self._buffers.get(name)
        if buf is None or buf.nbytes < nbytes:
            if buf is not None:
                self._api.free(buf)
            buf = _DeviceBuffer(self._api, max(nbytes, 1 if buf is None else buf.nbytes * 5 // 4))
            self._buffers[name] = buf
        return buf

    def run(self, features: np.ndarray, neighbors: np.ndarray, slide_offsets: np.ndarray) -> dict[str, np.ndarray]:
        hosts: dict[str, np.ndarray] = {}
        for name, arr in zip(INPUT_NAMES, (features, neighbors, slide_offsets)):
            host = np.ascontiguousarray(arr, dtype=self._dtypes[name])
            hosts[name] = host
            if not self.context.set_input_shape(name, tuple(host.shape)):
                raise RuntimeError(f"TensorRT rejected input shape {name}{tuple(host.shape)} (outside the engine's "
                                   "optimisation profile)")
            buf = self._buffer(name, host.nbytes)
            self._api.htod(buf, host)
            self.context.set_tensor_address(name, buf.ptr)
        outs: dict[str, np.ndarray] = {}
        for name in self._outputs:
            shape = tuple(int(s) for s in self.context.get_tensor_shape(name))
            outs[name] = np.empty(shape, dtype=self._dtypes[name])
            self.context.set_tensor_address(name, self._buffer(name, outs[name].nbytes).ptr)
        if not self.context.execute_async_v3(self._api.stream_handle):
            raise RuntimeError("TensorRT execution failed")
        for name, host in outs.items():
            self._api.dtoh(host, self._buffers[name])
        self._api.synchronize()
        return {n: (a.astype(np.float32) if a.dtype == np.float16 else a) for n, a in outs.items()}

    def close(self) -> None:
        for buf in self._buffers.values():
            self._api.free(buf)
        self._buffers.clear()
        self.context = self.engine = None


# --------------------------------------------------------------------------- torch
def importable(module: str) -> bool:
    """True if ``import module`` would find a package (False when blocked with ``sys.modules[module] = None``)."""
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def torch_importable() -> bool:
    return importable("torch")


class TorchBackend:
    """The exported TorchScript module (``manifest.torch.file``, ``torch.jit.load``) on CUDA or CPU.

    A TorchScript file is code that runs with the user's rights: ``select_backend`` builds this backend only when
    it is named (``--backend torch``), never for ``auto``; use it for model folders you trust.

    Its ``forward(features, neighbors, slide_offsets)`` returns a dict keyed by output name, or a tuple in the
    order ``(probability, logits, attention, patch_score)`` (the ONNX outputs' order). A ``model.pt`` traced by
    ``momkd export`` calls the ``momkd::memory_head`` operator: the fused Triton head on CUDA, torch ops on CPU.
    """

    name = "torch"

    def __init__(self, model_path: str | Path, device: str | None = None, threads: int | None = None, *,
                 sha256: str | None = None) -> None:
        if not torch_importable():
            raise BackendError("torch backend needs PyTorch (pip install momkd[train]); use --backend onnxruntime")
        import torch

        kind, index = parse_device(device)
        if kind is None:
            kind = "cuda" if torch.cuda.is_available() else "cpu"
        if kind == "cuda" and not torch.cuda.is_available():
            raise BackendError("--device cuda with torch: PyTorch sees no CUDA device; use --device cpu")
        self._torch = torch
        self._dev = torch.device("cuda", index) if kind == "cuda" else torch.device("cpu")
        if kind == "cpu":
            torch.set_num_threads(threads or cpu_count())
        import io

        import momkd.kernels.ops  # noqa: F401 - registers momkd::memory_head (fused head on CUDA) before loading

        scripted = read_artifact(model_path, sha256)
        try:
            self.module = torch.jit.load(io.BytesIO(scripted), map_location=self._dev).eval()
        except Exception as e:  # noqa: BLE001
            raise ModelFolderError(f"{model_path}: torch cannot load the TorchScript model ({_one_line(e)})") from None
        self.device = f"cuda:{index}" if kind == "cuda" and index else kind
        self.detail = f"torch {torch.__version__} TorchScript"
        self.max_rows: int | None = None
        self.max_slides: int | None = None

    def run(self, features: np.ndarray, neighbors: np.ndarray, slide_offsets: np.ndarray) -> dict[str, np.ndarray]:
        torch = self._torch
        nb = self._dev.type == "cuda"
        with torch.inference_mode():
            args = [torch.from_numpy(np.ascontiguousarray(a)).to(self._dev, non_blocking=nb)
                    for a in (features, neighbors, slide_offsets)]
            out = self.module(*args)
        if hasattr(out, "_asdict"):
            out = out._asdict()
        if isinstance(out, dict):
            items = [(k, v) for k, v in out.items() if k in OUTPUT_NAMES and v is not None]
        elif isinstance(out, (tuple, list)):
            items = [(k, v) for k, v in zip(OUTPUT_NAMES, out) if v is not None]
        else:
            raise ModelFolderError(f"torch model returned {type(out).__name__}; expected a dict or tuple of outputs")
        return {k: v.detach().to("cpu", torch.float32).numpy() for k, v in items}

    def close(self) -> None:
        self.module = None


# --------------------------------------------------------------------------- selection
def _cuda_driver_present() -> bool:
    """Cheap check before importing heavy GPU libraries: is an NVIDIA driver loaded?"""
    if sys.platform.startswith("linux"):
        return os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia/version")
    return True


def select_backend(name: str, device: str | None, manifest: Any,
                   log: Callable[[str], None] | None = None, threads: int | None = None) -> Backend:
    """Build the backend named ``name`` (``auto`` = TensorRT > ORT-CUDA > ORT-CPU; ``torch`` only when named, as
    its TorchScript file is code) on ``device`` (``None`` = best available), loading the manifest's checksummed
    artifact bytes. Raises BackendError/ModelFolderError (usage/model errors) with one line."""
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
    kind, index = parse_device(device)
    dev = "cpu" if kind == "cpu" else (f"cuda:{index}" if index else "cuda")
    say = log or (lambda _msg: None)
    if name != "auto":
        return _named_backend(name, kind, dev, manifest, threads, say)
    if kind != "cpu":
        reasons: list[str] = []
        backend = _cuda_backend(dev, manifest, threads, reasons)
        if backend is not None:
            return backend
        if kind == "cuda":
            raise BackendError("--device cuda: no CUDA backend is usable (" + "; ".join(reasons) + ")")
        say("note: backend auto: " + "; ".join(reasons) + " -> onnxruntime on CPU")
    return _onnxruntime(manifest, "cpu", threads)


def _onnxruntime(manifest: Any, dev: str, threads: int | None) -> OnnxRuntimeBackend:
    """ONNX Runtime on ``dev`` with the manifest's ONNX graph (checksum verified on the bytes it loads)."""
    return OnnxRuntimeBackend(manifest.onnx_path, dev, threads, manifest.model.feature_dim,
                              sha256=manifest.artifact_sha256(manifest.onnx.file))


def _tensorrt(manifest: Any, dev: str) -> TensorRTBackend:
    """The manifest's TensorRT engine on ``dev`` (checksum verified on the bytes it deserializes)."""
    return TensorRTBackend(manifest.tensorrt_path, dev, sha256=manifest.artifact_sha256(manifest.tensorrt.file))


def _named_backend(name: str, kind: str | None, dev: str, manifest: Any, threads: int | None,
                   say: Callable[[str], None]) -> Backend:
    """The backend the user named (device ``kind`` None: its best device)."""
    if name == "onnxruntime":
        if kind is None:
            import onnxruntime as ort

            if "CUDAExecutionProvider" in ort.get_available_providers() and _cuda_driver_present():
                try:
                    return _onnxruntime(manifest, "cuda", threads)
                except BackendError as e:
                    say(f"note: onnxruntime CUDA not usable ({e}); running on CPU")
            dev = "cpu"
        return _onnxruntime(manifest, dev, threads)
    if name == "tensorrt":
        if manifest.tensorrt is None:
            raise BackendError(f"{manifest.root}: the model folder has no TensorRT engine "
                               "(export with --format trt, or use --backend onnxruntime)")
        return _tensorrt(manifest, "cuda" if kind is None else dev)
    if manifest.torch is None:
        raise BackendError(f"{manifest.root}: the model folder has no TorchScript model (manifest 'torch' is "
                           "null); use --backend onnxruntime")
    return TorchBackend(manifest.torch_path, None if kind is None else dev, threads,
                        sha256=manifest.artifact_sha256(manifest.torch.file))


def _cuda_backend(dev: str, manifest: Any, threads: int | None, reasons: list[str]) -> Backend | None:
    """The first usable CUDA backend of ``auto`` (TensorRT, ONNX Runtime CUDA; never torch), or None; why each was
    not usable is appended to ``reasons``. A model folder problem (a checksum mismatch) is raised, not skipped."""
    if manifest.tensorrt is None:
        reasons.append("tensorrt: no engine in the model folder")
    elif not importable("tensorrt"):
        reasons.append("tensorrt: package not installed")
    elif not _cuda_driver_present():
        reasons.append("tensorrt: no NVIDIA driver")
    else:
        try:
            return _tensorrt(manifest, dev)
        except BackendError as e:
            reasons.append(f"tensorrt: {e}")
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        reasons.append("onnxruntime: no CUDA execution provider")
    elif not _cuda_driver_present():
        reasons.append("onnxruntime: no NVIDIA driver")
    else:
        try:
            return _onnxruntime(manifest, dev, threads)
        except BackendError as e:
            reasons.append(f"onnxruntime-cuda: {e}")
    return None


# --------------------------------------------------------------------------- precision (CPU reduced-precision graphs)
PRECISIONS = ("auto", "fp32", "int8", "bf16")


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision ``momkd infer`` runs and why (recorded in run.json)."""

    precision: str   # fp32 | int8
    reason: str


def choose_precision(manifest: Any, requested: str, backend: str = "auto", device: str | None = None,
                     host: CpuInfo | None = None) -> PrecisionChoice:
    """``requested`` (auto | fp32 | int8 | bf16) -> the precision to run. ``auto``: int8 when the model folder has
    an int8 graph whose accuracy gates passed at export, the run is on ONNX Runtime on the CPU and the host CPU has
    one of the graph's ``requires_isa`` flags (VNNI / AMX: ``momkd.runtime.cpu``); else fp32, with the reason.
    An explicit ``int8`` runs a graph forced past failing gates too (said in the reason). BackendError for a
    precision this model folder, backend or device cannot run."""
    if requested not in PRECISIONS:
        raise BackendError(f"unknown precision {requested!r} (choose from {', '.join(PRECISIONS)})")
    if requested == "fp32":
        return PrecisionChoice("fp32", "asked for")
    if requested == "bf16":
        raise BackendError("--precision bf16: the lean runtime has no fast bf16 CPU backend (ONNX Runtime's CPU "
                           "kernels have no bf16 MatMul); use int8 or fp32 (`momkd bench --backends torch "
                           "--precision bf16` measures PyTorch's bf16 where it is installed)")
    info = manifest.reduced.get("int8")
    kind, _ = parse_device(device)
    host = host or cpu_info()
    isa = next((flag for flag in (info.requires_isa if info else ()) if flag in host.flags), None)
    why_not = None
    if backend not in ("auto", "onnxruntime"):
        why_not = f"the {backend} backend runs the fp32 graph"
    elif not _runs_on_cpu(manifest, backend, kind):
        why_not = "the int8 graph is for CPUs; this run uses a GPU"
    elif info is None:
        why_not = f"{manifest.root} has no int8 graph (momkd export --precision int8)"
    elif info.file is None:
        why_not = "the int8 graph failed its accuracy gates at export and was not written"
    if requested == "int8":
        if why_not is not None:
            raise BackendError(f"--precision int8: {why_not}")
        notes = ([] if info.passed else ["forced past failing accuracy gates at export"]) + (
            [] if isa else [f"this CPU has none of {', '.join(info.requires_isa)}: int8 may be no faster"])
        return PrecisionChoice("int8", "asked for" + (f" ({'; '.join(notes)})" if notes else ""))
    if why_not is None and info is not None and not info.passed:
        why_not = "the int8 graph failed its accuracy gates (written with --force-precision: never picked by auto)"
    if why_not is None and isa is None and info is not None:
        why_not = (f"this CPU ({host.model_name or 'unknown'}) has none of {', '.join(info.requires_isa)}: "
                   "int8 is not faster here")
    if why_not is not None:
        return PrecisionChoice("fp32", f"auto: {why_not}")
    return PrecisionChoice("int8", f"auto: accuracy gates passed at export, CPU has {isa}")


def _runs_on_cpu(manifest: Any, backend: str, kind: str | None) -> bool:
    """Whether ``backend`` (auto | onnxruntime) on device ``kind`` (None: best available) ends up on the CPU, as
    ``select_backend`` would choose."""
    if kind is not None:
        return kind == "cpu"
    if not _cuda_driver_present():
        return True
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        return False
    return backend == "onnxruntime" or manifest.tensorrt is None or not importable("tensorrt")


def reduced_backend(manifest: Any, precision: str, threads: int | None = None) -> Backend:
    """ONNX Runtime on the CPU running the model folder's ``precision`` graph (checksum checked on load)."""
    info = manifest.reduced.get(precision)
    if info is None or info.file is None:
        raise BackendError(f"{manifest.root}: the model folder has no {precision} graph")
    return OnnxRuntimeBackend(manifest.path(info.file), "cpu", threads, manifest.model.feature_dim,
                              sha256=manifest.artifact_sha256(info.file))
