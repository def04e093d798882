"""``momkd bench``: latency of an exported model folder for every backend x device x precision x slide size.

For each pack shape (``n_patches`` rows per slide, ``slides_per_pack`` slides) one synthetic pack is built
(random N(0, 1) features, a TRIDENT-like patch grid -> the model's neighbour table), its matrix-product FLOPs are
counted from the ONNX graph (:mod:`momkd.runtime.flops`) and, where PyTorch and the folder's TorchScript twin are
there, the reference probabilities are computed by that twin on the CPU in fp32. Then every target runs the pack
``warmup`` times untimed and ``repeat`` times timed; a timing is one ``Backend.run`` call, numpy in and out (so on
a GPU it includes the host <-> device copies, as ``momkd infer`` pays them).

Precision: ONNX Runtime and TensorRT run the precision their artifact was exported in (others are skipped with
the reason); the torch backend runs fp32 as exported and fp16/bf16 under ``torch.autocast``.

Torch-free: nothing here imports torch unless a torch target runs or the reference is computed.
"""

from __future__ import annotations

import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from momkd.errors import ModelFolderError, MomkdError
from momkd.manifest import Manifest, load_manifest

from .backends import (Backend, OnnxRuntimeBackend, TensorRTBackend, TorchBackend, _cuda_driver_present, cpu_count,
                       importable, reduced_backend)
from .cpu import BF16_FLAGS, INT8_FLAGS, cpu_info
from .flops import count_matmul_flops
from momkd.data.batch import GraphSlide, Pack, pack_slides
from momkd.synth import grid_coords

BACKEND_NAMES = ("onnxruntime", "torch", "tensorrt")
DEVICES = ("cpu", "cuda")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
DEFAULT_PATCHES = (1000, 10000, 50000)
DEFAULT_SLIDES_PER_PACK = (1, 8)
DEFAULT_PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_MAX_ROWS = 262_144


class BenchError(MomkdError):
    """Bad ``momkd bench`` options (exit code 2)."""


@dataclass(frozen=True)
class Target:
    backend: str    # onnxruntime | torch | tensorrt
    device: str     # cpu | cuda
    precision: str  # fp32 | fp16 | bf16


@dataclass
class BenchRecord:
    """One row of the results (``status`` ok / failed / skipped; a skipped target has no pack shape)."""

    backend: str
    device: str
    precision: str
    n_patches: int | None            # patches per slide (N)
    slides_per_pack: int | None
    rows: int | None                 # rows of the pack = n_patches * slides_per_pack
    median_ms: float | None = None   # per call (= per pack)
    p90_ms: float | None = None
    slides_per_s: float | None = None
    gflop_per_slide: float | None = None   # matrix-product GFLOP of one slide (FlopCounterMode convention)
    gflop_per_s: float | None = None
    max_abs_dprob: float | None = None     # vs the PyTorch fp32 model on CPU (None without torch / model.pt)
    status: str = "ok"
    note: str = ""                          # what ran, or why it was skipped / failed
    repeat: int = 0
    machine: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- options
def parse_int_list(text: str, option: str) -> list[int]:
    """``"1000,10000"`` -> ``[1000, 10000]``; a BenchError naming ``option`` for anything but positive ints."""
    values = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or int(part) < 1:
            raise BenchError(f"{option}: {part!r} is not a positive integer (expected e.g. 1000,10000)")
        values.append(int(part))
    return values


def parse_choices(text: str, option: str, choices: tuple[str, ...]) -> list[str]:
    """``"fp32,fp16"`` -> ``["fp32", "fp16"]``, each one of ``choices`` (order kept, duplicates dropped)."""
    values: list[str] = []
    for part in text.split(","):
        part = part.strip().lower()
        if part not in choices:
            raise BenchError(f"{option}: unknown value {part!r} (choose from {', '.join(choices)})")
        if part not in values:
            values.append(part)
    return values


# --------------------------------------------------------------------------- inputs
def synthetic_pack(n_patches: int, slides: int, feature_dim: int, k: int, direction: str, seed: int = 0) -> Pack:
    """A pack of ``slides`` slides of ``n_patches`` patches each: features ~ N(0, 1) float32 (a different draw per
    slide), the neighbour table (``momkd.graph.neighbor_table``) of one TRIDENT-like grid with holes."""
    from momkd.graph import neighbor_table

    rng = np.random.default_rng(seed)
    neighbors = neighbor_table(grid_coords(n_patches, seed), k=k, direction=direction)
    items = [GraphSlide(f"synthetic_{i}", rng.standard_normal((n_patches, feature_dim), dtype=np.float32),
                        neighbors, n_patches, index=i) for i in range(slides)]
    return pack_slides(items)


# --------------------------------------------------------------------------- targets
def skip_reason(target: Target, manifest: Manifest) -> str | None:
    """Why ``target`` cannot run with this model folder on this machine (None: it can be tried)."""
    backend, device, precision = target.backend, target.device, target.precision
    if backend == "onnxruntime":
        if device == "cuda":
            import onnxruntime as ort

            if "CUDAExecutionProvider" not in ort.get_available_providers():
                return "onnxruntime has no CUDA execution provider (pip install onnxruntime-gpu)"
            if not _cuda_driver_present():
                return "no NVIDIA driver"
        reduced = manifest.reduced.get(precision)
        if reduced is not None:
            if device != "cpu":
                return f"the {precision} graph is for the CPU"
            if reduced.file is None:
                return f"the {precision} graph failed its accuracy gates at export (not written)"
            return None
        if precision != manifest.onnx.precision:
            return (f"model.onnx is {manifest.onnx.precision} (export --fp16 for an fp16 graph, --precision int8 for "
                    "an int8 one; no bf16 graph: ONNX Runtime's CPU kernels have no bf16 MatMul)")
        return None
    if backend == "tensorrt":
        if manifest.tensorrt is None:
            return "no TensorRT engine in the model folder (export --format trt)"
        if device != "cuda":
            return "TensorRT runs on CUDA only"
        if not importable("tensorrt"):
            return "the tensorrt package is not installed"
        if precision != manifest.tensorrt.precision:
            return f"model.plan is {manifest.tensorrt.precision}"
        return None
    if manifest.torch is None:
        return "no TorchScript model (model.pt) in the model folder"
    if not importable("torch"):
        return "PyTorch is not installed"
    if precision == "int8":
        return "int8 is an ONNX Runtime graph (momkd export --precision int8)"
    if device == "cpu" and precision == "fp16":
        return "fp16 on CPU has no fast kernels (try bf16)"
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            return "PyTorch sees no CUDA device"
    return None


def head_note(backend: TorchBackend) -> str:
    """Whether the TorchScript model runs the fused Triton head (CUDA, a model.pt calling momkd::memory_head)."""
    from momkd.kernels.ops import fused_enabled

    calls_op = "momkd::memory_head" in str(backend.module.inlined_graph)
    if backend.device == "cpu":
        return "head: torch ops"
    if not calls_op:
        return "head: torch ops (model.pt predates the fused operator: re-export)"
    return "head: fused Triton kernel" if fused_enabled() else "head: torch ops (fused kernel off)"


def open_backend(backend: str, device: str, manifest: Manifest, threads: int | None, precision: str = "fp32"
                 ) -> Backend:
    """The backend object for ``backend`` on ``device`` (raises MomkdError with one line); ONNX Runtime runs the
    folder's ``precision`` graph where it has one (int8)."""
    if backend == "onnxruntime":
        if precision in manifest.reduced:
            return reduced_backend(manifest, precision, threads)
        return OnnxRuntimeBackend(manifest.onnx_path, device, threads, manifest.model.feature_dim)
    if backend == "tensorrt":
        plan = manifest.tensorrt_path
        if plan is None:   # skip_reason leaves such a target out
            raise ModelFolderError(f"{manifest.root}: the model folder has no TensorRT engine")
        return TensorRTBackend(plan, device)
    torch_path = manifest.torch_path
    if torch_path is None:   # skip_reason leaves such a target out
        raise ModelFolderError(f"{manifest.root}: the model folder has no TorchScript model")
    return TorchBackend(torch_path, device, threads)


def runner(be: Backend, precision: str) -> Callable[[np.ndarray, np.ndarray, np.ndarray], dict[str, np.ndarray]]:
    """``be.run``, under ``torch.autocast`` for a torch backend in fp16/bf16."""
    if be.name != "torch" or precision == "fp32":
        return be.run
    import torch

    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    device_type = "cuda" if be.device.startswith("cuda") else "cpu"

    def run(features: np.ndarray, neighbors: np.ndarray, slide_offsets: np.ndarray) -> dict[str, np.ndarray]:
        with torch.autocast(device_type, dtype=dtype):
            return be.run(features, neighbors, slide_offsets)

    return run


def time_calls(run: Callable[..., dict[str, np.ndarray]], pack: Pack, warmup: int, repeat: int,
               ) -> tuple[list[float], dict[str, np.ndarray]]:
    """``warmup`` untimed calls, then ``repeat`` timed ones; returns (seconds per call, last outputs)."""
    args = (pack.features, pack.neighbors, pack.slide_offsets)
    out: dict[str, np.ndarray] = {}
    for _ in range(warmup):
        out = run(*args)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = run(*args)
        times.append(time.perf_counter() - t0)
    return times, out


def reference_probability(manifest: Manifest, pack: Pack, threads: int | None) -> np.ndarray | None:
    """(B,) probabilities of the folder's TorchScript twin on CPU in fp32 (None without PyTorch or model.pt)."""
    torch_path = manifest.torch_path   # None exactly when manifest.torch is
    if torch_path is None or not importable("torch"):
        return None
    be = TorchBackend(torch_path, "cpu", threads)
    try:
        return be.run(pack.features, pack.neighbors, pack.slide_offsets)["probability"].astype(np.float64)
    finally:
        be.close()


def _isa_note(precision: str) -> str:
    """For a reduced precision: the instructions of this CPU it runs on (or that it has none of them)."""
    flags = {"int8": INT8_FLAGS, "bf16": BF16_FLAGS}.get(precision)
    if flags is None:
        return ""
    isa = next((f for f in flags if f in cpu_info().flags), None)
    return f"; {precision} on {isa}" if isa else f"; no {'/'.join(flags)} on this CPU: {precision} emulated"


def machine_info() -> dict[str, Any]:
    """CPU model, its matrix ISA and flags (``momkd.runtime.cpu``), usable CPUs; the GPU's name when PyTorch is
    already loaded and sees one."""
    host = cpu_info()
    info: dict[str, Any] = {"cpu": host.model_name or platform.processor() or platform.machine(), "isa": host.isa,
                            "flags": " ".join(sorted(host.flags)) or "none", "usable_cpus": host.usable_cpus}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


# --------------------------------------------------------------------------- the benchmark
def run_bench(model_dir: str | Path, patches: list[int], slides_per_pack: list[int], backends: list[str],
              devices: list[str], precisions: list[str], *, repeat: int = 10, warmup: int = 2,
              max_rows: int = DEFAULT_MAX_ROWS, threads: int | None = None, seed: int = 0,
              log: Callable[[str], None] | None = None) -> list[BenchRecord]:
    """Benchmark every target (backend x device x precision) on every pack shape (patches x slides_per_pack).

    Returns one record per target that cannot run here (``status="skipped"``, no pack shape) and one per
    (runnable target, pack shape) (``ok``, ``failed``, or ``skipped`` for a pack over ``max_rows``).
    Raises BenchError for bad options, ModelFolderError for an unusable model folder.
    """
    say = log or (lambda _msg: None)
    if repeat < 1 or warmup < 0 or max_rows < 1:
        raise BenchError(f"need --repeat >= 1, --warmup >= 0 and --max-rows >= 1 (got {repeat}, {warmup}, {max_rows})")
    manifest = load_manifest(model_dir)
    m = manifest.model
    records: list[BenchRecord] = []
    unavailable: list[BenchRecord] = []
    targets: list[Target] = []
    for backend in backends:
        for device in devices:
            for precision in precisions:
                target = Target(backend, device, precision)
                reason = skip_reason(target, manifest)
                if reason is None:
                    targets.append(target)
                else:
                    unavailable.append(BenchRecord(backend, device, precision, None, None, None, status="skipped",
                                                   note=reason))
    opened: dict[tuple[str, str, str], Backend | str] = {}  # an open backend, or why it failed to open
    notes: dict[tuple[str, str, str], str] = {}
    try:
        for n in patches:
            for slides in slides_per_pack:
                rows = n * slides
                if not targets:
                    break
                if rows > max_rows:
                    for t in targets:
                        records.append(BenchRecord(t.backend, t.device, t.precision, n, slides, rows, status="skipped",
                                                   note=f"pack of {rows} rows > --max-rows {max_rows}"))
                    continue
                say(f"N={n} x {slides} slide(s): building the pack, counting FLOPs, computing the reference")
                pack = synthetic_pack(n, slides, m.feature_dim, m.k, m.graph_direction, seed)
                flops: float | None
                try:
                    flops = float(count_matmul_flops(manifest.onnx_path, pack.features, pack.neighbors,
                                                     pack.slide_offsets, threads))
                except MomkdError as e:
                    flops = None
                    say(f"note: no FLOP count ({e})")
                reference = reference_probability(manifest, pack, threads)
                for t in targets:
                    # one ONNX Runtime session per graph; torch runs every precision on one module
                    key = (t.backend, t.device, t.precision if t.backend == "onnxruntime" else "")
                    if key not in opened:
                        try:
                            new = opened[key] = open_backend(t.backend, t.device, manifest, threads, t.precision)
                            notes[key] = new.detail + (f"; {head_note(cast(TorchBackend, new))}" if new.name == "torch"
                                                       else _isa_note(t.precision))
                        except MomkdError as e:
                            opened[key] = str(e)
                    be_or_error = opened[key]
                    record = BenchRecord(t.backend, t.device, t.precision, n, slides, rows, repeat=repeat,
                                         gflop_per_slide=None if flops is None else flops / slides / 1e9)
                    records.append(record)
                    if isinstance(be_or_error, str):
                        record.status, record.note = "failed", be_or_error
                        continue
                    say(f"  {t.backend} {t.device} {t.precision}")
                    try:
                        times, out = time_calls(runner(be_or_error, t.precision), pack, warmup, repeat)
                    except Exception as e:  # noqa: BLE001 - one failed target must not stop the others
                        record.status = "failed"
                        record.note = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
                        continue
                    median = float(np.median(times))
                    record.median_ms = median * 1e3
                    record.p90_ms = float(np.percentile(times, 90)) * 1e3
                    record.slides_per_s = slides / median
                    record.gflop_per_s = None if flops is None else flops / median / 1e9
                    if reference is not None:
                        record.max_abs_dprob = float(np.abs(out["probability"].astype(np.float64) - reference).max())
                    record.note = notes[key]
                del pack
    finally:
        for be in opened.values():
            if not isinstance(be, str):
                be.close()
    machine = machine_info()
    if any(r.status == "ok" and r.device == "cpu" for r in records):
        machine["cpu_fp32_matmul_gflop_per_s"] = round(max(matmul_roofline(inner=m.feature_dim,
                                                                           threads=threads).values()), 1)
    records += unavailable
    for r in records:
        r.machine = machine
    return records


def fastest_s(fn: Callable[[], Any], repeat: int = 5) -> float:
    """Seconds of the fastest of ``repeat`` calls of ``fn`` after one warm-up call: what the machine can do, not
    what a neighbour on a shared host left of it."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_model(b: np.ndarray) -> Any:
    """A one-node ONNX model ``c = a @ b``: input ``a`` (N, inner) float32, the constant ``b`` (inner, cols)."""
    from onnx import TensorProto, helper, numpy_helper

    inner, cols = b.shape
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"], name="matmul")], "matmul",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", inner])],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, ["N", cols])],
                              [numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model


def matmul_roofline(rows: int = 20000, inner: int = 1536, cols: int = 768, repeat: int = 5,
                    threads: int | None = None) -> dict[str, float]:
    """fp32 GFLOP/s of one (rows x inner) @ (inner x cols) product on this CPU, now: the roofline the model's
    GFLOP/s are compared with. Measured with numpy and, when the ``onnx`` package is there to build the one-node
    graph, with ONNX Runtime's MatMul (the kernel library the ONNX backend uses); the fastest of ``repeat`` runs
    each: a roofline is what the machine can do, so a run slowed by a neighbour on a shared host must not lower it
    (which would flatter the model's fraction of it).
    (20000 x 1536) @ (1536 x 768) is the shape of the paper model's first GATv2 projection at N = 20000."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((rows, inner), dtype=np.float32)
    b = rng.standard_normal((inner, cols), dtype=np.float32)
    flop = 2.0 * rows * inner * cols
    engines: dict[str, Callable[[], Any]] = {"numpy": lambda: a @ b}
    if importable("onnx"):
        import onnxruntime as ort

        model = matmul_model(b)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads or cpu_count()
        so.log_severity_level = 3
        session = ort.InferenceSession(model.SerializeToString(), sess_options=so, providers=["CPUExecutionProvider"])
        engines["onnxruntime"] = lambda: session.run(None, {"a": a})
    return {name: flop / fastest_s(fn, repeat) / 1e9 for name, fn in engines.items()}

