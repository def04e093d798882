"""Memory head (eq. 6-8) of one slide: the fused Triton kernel vs the unfused torch reference, N = 10k, 100k, 200k.

``unfused`` is ``momkd.kernels.reference.head_reference`` (the torch ops the model runs everywhere but CUDA inference);
``fused`` is ``momkd.kernels.memory_head.fused_memory_head``. Embeddings are random (N, D) rows, the projection and
the unit codes random, dims of the ``paper`` (D 256, D_N 128, n 16) and ``official`` (D 512, D_N 64, n 16) presets.

On CUDA both run on the GPU; each timing synchronises, and ``extra_info["device_ms"]`` is the median of
``triton.testing.do_bench`` (CUDA events, L2 flushed between calls). Precisions there: fp32 (fused: "tf32x3" by
default and "ieee"), fp16 and bf16 (fused: half embeddings; unfused: the fp32 reference under ``torch.autocast``).
On CPU the fused kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``, set here when no GPU driver is
present): a correctness path, timed only up to ``MOMKD_BENCH_INTERPRET_MAX_N`` (10000) rows, one round.

On CUDA, ``test_fused_launch_config`` also times the fused kernel at the largest N under each ``block_n`` x
``num_warps`` (to pick the launch defaults). Knobs: ``MOMKD_BENCH_HEAD_NS`` (10000,100000,200000),
``MOMKD_BENCH_ROUNDS`` (20 on CUDA, 3 on CPU). Run:

    python -m pytest benchmarks/test_bench_head.py --benchmark-only --benchmark-json=head.json
"""

from __future__ import annotations

import functools
import os

import pytest

torch = pytest.importorskip("torch")
if not (os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia/version")):
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first import of triton
triton = pytest.importorskip("triton")

import torch.nn.functional as F  # noqa: E402

from momkd.kernels.memory_head import fused_memory_head  # noqa: E402
from momkd.kernels.reference import head_reference  # noqa: E402
from momkd.runtime.bench import machine_info  # noqa: E402

ENV = os.environ.get
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
NS = [int(v) for v in ENV("MOMKD_BENCH_HEAD_NS", "10000,100000,200000").split(",")]
ROUNDS = int(ENV("MOMKD_BENCH_ROUNDS", "20" if CUDA else "3"))
INTERPRET_MAX_N = int(ENV("MOMKD_BENCH_INTERPRET_MAX_N", "10000"))
DIMS = {"paper": (256, 128, 16), "official": (512, 64, 16)}
VARIANTS = [  # (impl, precision, fused input precision)
    ("unfused", "fp32", None), ("fused", "fp32", "tf32x3"), ("fused", "fp32", "ieee"),
    ("unfused", "fp16", None), ("fused", "fp16", None), ("unfused", "bf16", None), ("fused", "bf16", None),
]
HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


@functools.lru_cache(maxsize=2)
def head_case(n: int, preset: str) -> tuple[torch.Tensor, ...]:
    """(embeddings (n, D), weight (D_N, D), bias (D_N,), codes_pos, codes_neg (n_codes, D_N), offsets [0, n])."""
    dim, proj_dim, n_codes = DIMS[preset]
    g = torch.Generator().manual_seed(n)
    tensors = (torch.randn(n, dim, generator=g), torch.randn(proj_dim, dim, generator=g) / dim ** 0.5,
               torch.randn(proj_dim, generator=g) * 0.1,
               F.normalize(torch.randn(n_codes, proj_dim, generator=g), dim=-1),
               F.normalize(torch.randn(n_codes, proj_dim, generator=g), dim=-1), torch.tensor([0, n]))
    return tuple(t.to(DEVICE) for t in tensors)


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("preset", list(DIMS))
@pytest.mark.parametrize("impl,precision,input_precision", VARIANTS,
                         ids=[f"{i}-{p}{'-' + q if q else ''}" for i, p, q in VARIANTS])
def test_memory_head(benchmark, impl: str, precision: str, input_precision: str | None, preset: str, n: int) -> None:
    if not CUDA and precision != "fp32":
        pytest.skip("half precision: GPU only")
    if not CUDA and impl == "fused" and (n > INTERPRET_MAX_N or input_precision == "ieee"):
        pytest.skip(f"fused on CPU is Triton's interpreter: timed only at N <= {INTERPRET_MAX_N}")
    emb, weight, bias, pos, neg, offsets = head_case(n, preset)
    if impl == "fused":
        emb_in = emb.to(HALF[precision]) if precision in HALF else emb

        def op() -> None:
            fused_memory_head(emb_in, weight, bias, pos, neg, offsets, 0.2, input_precision=input_precision)
    else:
        def op() -> None:
            with torch.autocast(DEVICE, dtype=HALF.get(precision, torch.float16), enabled=precision in HALF):
                head_reference(emb, weight, bias, pos, neg, offsets, 0.2)

    def call() -> None:
        with torch.inference_mode():
            op()
        if CUDA:
            torch.cuda.synchronize()

    rounds = 1 if impl == "fused" and not CUDA else ROUNDS
    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1 if rounds == 1 else 3)
    info = {"suite": "head", "impl": impl, "precision": precision, "input_precision": input_precision,
            "preset": preset, "n_patches": n, "device": DEVICE, "interpreter": impl == "fused" and not CUDA,
            "machine": machine_info()}
    if CUDA:
        with torch.inference_mode():
            info["device_ms"] = triton.testing.do_bench(op, warmup=25, rep=200, return_mode="median")
    benchmark.extra_info.update(info)


CONFIGS = [(block_n, warps) for block_n in (32, 64, 128) for warps in (4, 8)]


@pytest.mark.skipif(not CUDA, reason="launch configurations: GPU only")
@pytest.mark.parametrize("preset", list(DIMS))
@pytest.mark.parametrize("block_n,num_warps", CONFIGS, ids=[f"block{b}-warps{w}" for b, w in CONFIGS])
def test_fused_launch_config(benchmark, preset: str, block_n: int, num_warps: int) -> None:
    """The fused kernel (fp32, default precision) at the largest N under each launch configuration: which
    ``block_n`` / ``num_warps`` the defaults of ``fused_memory_head`` should be."""
    n = max(NS)
    args = head_case(n, preset)

    def op() -> None:
        fused_memory_head(*args, 0.2, block_n=block_n, num_warps=num_warps)

    def call() -> None:
        with torch.inference_mode():
            op()
        torch.cuda.synchronize()

    benchmark.pedantic(call, rounds=ROUNDS, iterations=1, warmup_rounds=3)
    with torch.inference_mode():
        device_ms = triton.testing.do_bench(op, warmup=25, rep=200, return_mode="median")
    benchmark.extra_info.update(suite="head_config", preset=preset, n_patches=n, block_n=block_n,
                                num_warps=num_warps, device_ms=device_ms, machine=machine_info())
