"""One MoMKD training step (forward + losses + backward + AdamW) on one slide, vs the fp32 matmul roofline.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on the same step (matmuls and the other ops
it knows); the roofline is the throughput of (20000 x 1536) @ (1536 x 768) measured in the same run, as in
the authors' code measurements (shared/reference/official-code.md). ``MOMKD_BENCH_DEVICE`` (cpu, or cuda) picks
the device; on CUDA each step synchronises and the roofline is the same product on the GPU (fp32, no TF32). Run:

    python -m pytest benchmarks/test_bench_train_step.py --benchmark-only
"""

from __future__ import annotations

import os
import platform
import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from momkd.config import preset
from momkd.graph import neighbor_table
from momkd.synth import grid_coords
from momkd.losses import MoMKDLoss
from momkd.models import build_model

IN_DIM = 1536
GENES = 768
DEVICE = torch.device(os.environ.get("MOMKD_BENCH_DEVICE", "cpu"))


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def matmul_roofline_gflops(repeats: int = 5) -> float:
    """fp32 GFLOP/s of (20000 x 1536) @ (1536 x 768) on DEVICE, now: the fastest of ``repeats`` runs (a roofline
    is what the machine can do; a run slowed by a neighbour must not lower it)."""
    a, b = torch.randn(20000, IN_DIM, device=DEVICE), torch.randn(IN_DIM, 768, device=DEVICE)
    torch.mm(a, b)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync()
        times.append(time.perf_counter() - t0)
    return 2 * 20000 * IN_DIM * 768 / min(times) / 1e9


@pytest.mark.parametrize("preset_name", ["paper", "official"])
@pytest.mark.parametrize("n_patches", [8000, 20000])
def test_train_step(benchmark, preset_name: str, n_patches: int) -> None:
    torch.manual_seed(0)
    model_cfg, loss_cfg = preset(preset_name)
    model = build_model(model_cfg, IN_DIM, GENES).to(DEVICE).train()
    loss_fn = MoMKDLoss(loss_cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=1e-4)
    coords = grid_coords(n_patches)
    neighbors = torch.from_numpy(neighbor_table(coords, k=model_cfg.k, direction=model_cfg.graph_direction)).to(DEVICE)
    features = torch.randn(n_patches, IN_DIM, device=DEVICE)
    omics = torch.randn(1, GENES, device=DEVICE)
    label = torch.tensor([1], device=DEVICE)

    def step() -> None:
        out = model(features, neighbors, omics, label)
        losses = loss_fn(out, label, omics, model.memory)
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        optimizer.step()
        sync()

    step()  # warm-up
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=0)
    roofline = matmul_roofline_gflops()
    seconds = benchmark.stats.stats.median
    achieved = flops / seconds / 1e9
    benchmark.extra_info.update(
        n_patches=n_patches, preset=preset_name, gflop_per_step=flops / 1e9, achieved_gflops=achieved,
        roofline_gflops=roofline, roofline_fraction=achieved / roofline, threads=torch.get_num_threads(),
        machine=f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip(),
        device=torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu",
    )
    print(f"\n{preset_name} N={n_patches}: {seconds * 1e3:.0f} ms/step, {flops / 1e9:.1f} GFLOP, "
          f"{achieved:.1f} GFLOP/s = {100 * achieved / roofline:.0f}% of {roofline:.1f} GFLOP/s roofline")
