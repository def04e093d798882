"""Latency of the exported model (GATv2 encoder + memory head + classifier; the encoder dominates) vs N, per backend,
and ONNX Runtime CPU at N = 20000 against the fp32 matmul roofline measured in the same test.

The model folder is ``MOMKD_BENCH_MODEL_DIR`` (from ``momkd export``) or, by default, a random-weight folder of the
paper preset with D_in = 1536 (``momkd.export.synthetic``; needs torch + onnx). One slide per call, synthetic
features on a TRIDENT-like grid (``momkd.runtime.bench.synthetic_pack``). Knobs: ``MOMKD_BENCH_NS`` (patches per
slide, default 1000,5000,20000,50000), ``MOMKD_BENCH_ROUNDS`` (5), ``MOMKD_BENCH_ASSERT=1`` (enforce >= 85% of the
roofline). Targets that cannot run here (no CUDA, no TensorRT engine, ...) are skipped with the reason.

``resident`` targets time the torch backend's TorchScript module on inputs already on the GPU (no host <-> device
copies); the others time ``Backend.run`` (numpy in and out), as ``momkd bench`` does. Run:

    python -m pytest benchmarks/test_bench_latency.py --benchmark-only --benchmark-json=latency.json
"""

from __future__ import annotations

import collections
import os
from typing import Any

import pytest

from momkd.manifest import Manifest, load_manifest
from momkd.runtime.bench import (Target, machine_info, matmul_roofline, open_backend, runner, skip_reason,
                                 synthetic_pack)
from momkd.runtime.flops import PRODUCT_OPS, node_events, profile_events, profile_products

ENV = os.environ.get
NS = [int(v) for v in ENV("MOMKD_BENCH_NS", "1000,5000,20000,50000").split(",")]
ROUNDS = int(ENV("MOMKD_BENCH_ROUNDS", "5"))
ASSERT = ENV("MOMKD_BENCH_ASSERT") == "1"
ROOFLINE_N = 20000
TARGETS = [  # (backend, device, precision, resident)
    ("onnxruntime", "cpu", "fp32", False), ("torch", "cpu", "fp32", False),
    ("onnxruntime", "cuda", "fp32", False), ("tensorrt", "cuda", "fp32", False), ("tensorrt", "cuda", "fp16", False),
    ("torch", "cuda", "fp32", False), ("torch", "cuda", "fp16", False), ("torch", "cuda", "bf16", False),
    ("torch", "cuda", "fp32", True), ("torch", "cuda", "fp16", True), ("torch", "cuda", "bf16", True),
]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Manifest:
    if ENV("MOMKD_BENCH_MODEL_DIR"):
        return load_manifest(ENV("MOMKD_BENCH_MODEL_DIR"))
    pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    from momkd.export.synthetic import export_random_model

    out = tmp_path_factory.mktemp("latency_model") / "paper_1536"
    export_random_model(out, "paper", 1536, folds=1)
    return load_manifest(out)


@pytest.fixture(scope="module")
def backends(manifest: Manifest):
    """Backends opened once per module, keyed by (backend, device)."""
    opened: dict[tuple[str, str], Any] = {}
    yield lambda backend, device: opened.setdefault((backend, device), open_backend(backend, device, manifest, None))
    for be in opened.values():
        be.close()


def _resident_call(be: Any, pack: Any, precision: str):  # noqa: ANN202
    """The TorchScript module on GPU-resident inputs, synchronised (no host <-> device copies)."""
    import torch

    args = [torch.from_numpy(a).to(be.device) for a in (pack.features, pack.neighbors, pack.slide_offsets)]
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)

    def call() -> None:
        with torch.inference_mode(), torch.autocast("cuda", dtype=dtype or torch.float16, enabled=dtype is not None):
            be.module(*args)
        torch.cuda.synchronize()

    return call


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("backend,device,precision,resident", TARGETS,
                         ids=[f"{b}-{d}-{p}{'-resident' if r else ''}" for b, d, p, r in TARGETS])
def test_model_latency(benchmark, manifest: Manifest, backends, backend: str, device: str, precision: str,
                       resident: bool, n: int) -> None:
    reason = skip_reason(Target(backend, device, precision), manifest)
    if reason:
        pytest.skip(reason)
    be = backends(backend, device)
    m = manifest.model
    pack = synthetic_pack(n, 1, m.feature_dim, m.k, m.graph_direction)
    if resident:
        call = _resident_call(be, pack, precision)
    else:
        run = runner(be, precision)

        def call() -> None:
            run(pack.features, pack.neighbors, pack.slide_offsets)

    products = profile_products(profile_events(manifest.onnx_path, pack.features, pack.neighbors, pack.slide_offsets))
    flops = sum(p["flops"] for p in products)
    benchmark.pedantic(call, rounds=ROUNDS, iterations=1, warmup_rounds=2)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(
        suite="latency", backend=backend, device=device, precision=precision, n_patches=n, slides_per_pack=1,
        transfers=not resident, gflop_per_slide=flops / 1e9, gflop_per_s=flops / median / 1e9, note=be.detail,
        model=str(manifest.root), machine=machine_info())


def _kernel_ms(events: list[dict[str, Any]]) -> dict[str, float]:
    """ms per operator type in one profiled run."""
    out: collections.Counter = collections.Counter()
    for e in node_events(events):
        out[e["args"]["op_name"]] += e["dur"] / 1e3
    return dict(out)


def _neighbourhood_ms(events: list[dict[str, Any]], width: int) -> float:
    """ms of the nodes that work on per-edge tensors: an operand or output of shape (rows, width, ...) with
    width = W + 1, or its flat form (rows * width, ...)."""
    nodes = []
    for e in node_events(events):
        args = e["args"]
        shapes = [next(iter(x.values())) for x in args.get("input_type_shape", []) + args.get("output_type_shape", [])]
        nodes.append((e["dur"] / 1e3, shapes))
    flat_rows = {s[0] * width for _, shapes in nodes for s in shapes if len(s) == 3 and s[1] == width}
    return sum(ms for ms, shapes in nodes
               if any((len(s) == 3 and s[1] == width) or (len(s) == 2 and s[0] in flat_rows) for s in shapes))


def test_onnxruntime_cpu_vs_matmul_roofline(benchmark, manifest: Manifest, backends) -> None:
    """ONNX Runtime CPU, one 20000-patch slide: achieved matrix-product GFLOP/s over the fp32 matmul roofline
    (the best of numpy and ONNX Runtime's own MatMul on (20000 x D_in) @ (D_in x 768)), measured in this test."""
    m = manifest.model
    pack = synthetic_pack(ROOFLINE_N, 1, m.feature_dim, m.k, m.graph_direction)
    be = backends("onnxruntime", "cpu")
    before = matmul_roofline(ROOFLINE_N, m.feature_dim)
    benchmark.pedantic(be.run, args=(pack.features, pack.neighbors, pack.slide_offsets), rounds=ROUNDS,
                       iterations=1, warmup_rounds=2)
    after = matmul_roofline(ROOFLINE_N, m.feature_dim)
    events = profile_events(manifest.onnx_path, pack.features, pack.neighbors, pack.slide_offsets, runs=3)
    flops = sum(p["flops"] for p in profile_products(events))
    roofline = max(*before.values(), *after.values())
    median = benchmark.stats.stats.median
    achieved = flops / median / 1e9
    per_op = _kernel_ms(events)
    products = profile_products(events)
    products_ms = sum(v for k, v in per_op.items() if k in PRODUCT_OPS)
    # where the 15% allowance goes: the largest product alone (the GATv2 projection, the roofline's own shape),
    # the fraction the call would reach if every non-product node took no time, and the per-edge (W+1) work
    durations = {e["name"][: -len("_kernel_time")]: e["dur"] / 1e3 for e in node_events(events)}
    largest = max(products, key=lambda p: p["flops"])
    largest_ms = durations[largest["node"]]
    neighbourhood_ms = _neighbourhood_ms(events, int(pack.neighbors.shape[1]) + 1)
    info = {"suite": "roofline", "backend": "onnxruntime", "device": "cpu", "precision": manifest.onnx.precision,
            "n_patches": ROOFLINE_N, "feature_dim": m.feature_dim, "gflop": flops / 1e9,
            "median_ms": median * 1e3, "achieved_gflop_per_s": achieved,
            "roofline_gflop_per_s": roofline, "roofline_fraction": achieved / roofline,
            "roofline_engines": {k: round(max(before[k], after[k]), 1) for k in before},
            "profiled_ms": round(sum(per_op.values()), 1), "matrix_products_ms": round(products_ms, 1),  # 3rd run
            "products_only_fraction": flops / (products_ms / 1e3) / 1e9 / roofline,
            "largest_product": {"shape": [*largest["inputs"][0], largest["output"][-1]], "ms": round(largest_ms, 1),
                                "gflop": largest["flops"] / 1e9,
                                "roofline_fraction": largest["flops"] / (largest_ms / 1e3) / 1e9 / roofline},
            "neighbourhood_ms": round(neighbourhood_ms, 1),
            # ... and if the whole per-edge step were one operator that took no time
            "without_neighbourhood_fraction":
                flops / ((sum(per_op.values()) - neighbourhood_ms) / 1e3) / 1e9 / roofline,
            "top_ops_ms": {k: round(v, 1) for k, v in sorted(per_op.items(), key=lambda kv: -kv[1])[:8]},
            "model": str(manifest.root), "machine": machine_info()}
    benchmark.extra_info.update(info)
    print(f"\nONNX Runtime CPU, N={ROOFLINE_N}: {median * 1e3:.0f} ms, {flops / 1e9:.1f} GFLOP -> "
          f"{achieved:.1f} GFLOP/s"
          f" = {100 * achieved / roofline:.0f}% of the {roofline:.1f} GFLOP/s fp32 matmul roofline; matrix products "
          f"{products_ms:.0f} of {sum(per_op.values()):.0f} profiled ms (with every other node free: "
          f"{100 * info['products_only_fraction']:.0f}%); largest product {largest_ms:.0f} ms = "
          f"{100 * info['largest_product']['roofline_fraction']:.0f}% of the roofline; per-edge (W+1) nodes "
          f"{neighbourhood_ms:.0f} ms (if they took no time: {100 * info['without_neighbourhood_fraction']:.0f}%)")
    if ASSERT:
        assert achieved >= 0.85 * roofline, info
