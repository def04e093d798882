"""`momkd infer` throughput on a folder of TRIDENT-layout files (one-row chunks, as TRIDENT writes them) versus the
compute-only slide rate (the same packs, already in memory, through the same backend), and the peak RSS of
100000-patch slides (one alone; 100k, 30k and 100k in one folder).

The model is a toy with the exported graph's exact I/O (``momkd.testing.toy``, a dense layer + neighbour mean +
per-slide softmax pooling) unless ``MOMKD_BENCH_MODEL_DIR`` names a real model folder from ``momkd export``.
Other knobs: ``MOMKD_BENCH_DIM`` (toy feature dim, 1536), ``MOMKD_BENCH_HIDDEN`` (toy width, 256),
``MOMKD_BENCH_SLIDES`` (24) or ``MOMKD_BENCH_FOLDER`` (an existing folder of .h5 files),
``MOMKD_BENCH_BACKEND`` (auto), ``MOMKD_BENCH_DEVICE``, ``MOMKD_BENCH_BUDGET``
(rows per pack, the CLI default), ``MOMKD_BENCH_WORKERS`` (2), ``MOMKD_BENCH_ASSERT=1`` to enforce the targets
(folder >= 90% of compute-only; peak RSS <= 2.5 GB). Run:

    python -m pytest benchmarks/test_bench_runtime.py --benchmark-only -s

Timings on shared machines are noisy: the ratio is measured in one run, and the device is recorded with it.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from momkd.manifest import load_manifest
from momkd.runtime.backends import select_backend
from momkd.runtime.discover import discover_slides
from momkd.runtime.packing import Packer
from momkd.runtime.pipeline import DEFAULT_BATCH_PATCHES, RAMP, run_inference
from momkd.runtime.reader import ReaderConfig, load_one
from momkd.synth import grid_coords

from momkd.testing.toy import build_toy_model_dir, write_slide_folder, write_trident_slide

ENV = os.environ.get
ASSERT = ENV("MOMKD_BENCH_ASSERT") == "1"
BUDGET = int(ENV("MOMKD_BENCH_BUDGET", str(DEFAULT_BATCH_PATCHES)))
WORKERS = int(ENV("MOMKD_BENCH_WORKERS", "2"))


def _device() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus"


@pytest.fixture(scope="module")
def bench_model(tmp_path_factory) -> Path:
    """``MOMKD_BENCH_MODEL_DIR`` (a real exported model folder), or the toy."""
    if ENV("MOMKD_BENCH_MODEL_DIR"):
        return Path(ENV("MOMKD_BENCH_MODEL_DIR"))
    d = tmp_path_factory.mktemp("bench_model") / "model"
    build_toy_model_dir(d, feature_dim=int(ENV("MOMKD_BENCH_DIM", "1536")),
                        hidden=int(ENV("MOMKD_BENCH_HIDDEN", "256")))
    return d


@pytest.fixture(scope="module")
def bench_folder(tmp_path_factory, bench_model) -> Path:
    if ENV("MOMKD_BENCH_FOLDER"):
        return Path(ENV("MOMKD_BENCH_FOLDER"))
    dim = load_manifest(bench_model).model.feature_dim
    folder = tmp_path_factory.mktemp("bench_slides")
    sizes = np.random.default_rng(0).integers(2000, 16000, int(ENV("MOMKD_BENCH_SLIDES", "24"))).tolist()
    write_slide_folder(folder, sizes, dim)
    return folder


@pytest.mark.parametrize("reader", ["threads", "processes"])
def test_folder_throughput_vs_compute_only(benchmark, bench_model: Path, bench_folder: Path, tmp_path: Path,
                                           reader: str) -> None:
    manifest = load_manifest(bench_model)
    be = select_backend(ENV("MOMKD_BENCH_BACKEND", "auto"), ENV("MOMKD_BENCH_DEVICE"), manifest)
    files = discover_slides(bench_folder)
    m = manifest.model

    # compute only: the same packs, read beforehand, through the same backend
    packer = Packer(min(BUDGET, be.max_rows or BUDGET), be.max_slides, ramp=RAMP)   # the pipeline's packs
    cfg = ReaderConfig(m.feature_dim, m.k, m.graph_direction)
    t = time.perf_counter()
    items = [load_one(f, cfg) for f in files]
    read_graph_s = time.perf_counter() - t
    rows = sum(i.n for i in items)
    packs = [p for i in items for p in packer.add(i)]
    packs.append(packer.finish())
    packs = [p for p in packs if p is not None]
    del items
    be.run(packs[0].features, packs[0].neighbors, packs[0].slide_offsets)   # warm-up
    compute: list[float] = []

    def compute_only() -> None:
        t = time.perf_counter()
        for p in packs:
            be.run(p.features, p.neighbors, p.slide_offsets)
        compute.append(time.perf_counter() - t)

    summaries: list = []

    def folder_run() -> None:
        summaries.append(run_inference(bench_model, bench_folder, tmp_path / "out", batch_patches=BUDGET,
                                       workers=WORKERS, backend_obj=be, reader=reader))

    def both() -> None:     # interleaved, so that both see the same machine load
        compute_only()
        folder_run()

    benchmark.pedantic(both, rounds=3, iterations=1, warmup_rounds=0)
    packs.clear()   # free the packs (the closures keep the list itself)
    compute_s = min(compute)
    folder_s = min(s.elapsed_s for s in summaries)
    assert all(s.n_ok == len(files) for s in summaries)
    ratio = compute_s / folder_s
    info = {
        "device": _device(), "backend": f"{be.name} {be.device} ({be.detail})", "model": str(bench_model),
        "feature_dim": m.feature_dim, "slides": len(files), "rows": rows, "budget": BUDGET, "workers": WORKERS,
        "reader": summaries[-1].reader,
        "read_graph_sequential_s": round(read_graph_s, 3), "compute_only_s": round(compute_s, 3),
        "compute_only_slides_per_s": round(len(files) / compute_s, 2), "folder_s": round(folder_s, 3),
        "folder_slides_per_s": round(len(files) / folder_s, 2), "folder_over_compute": round(ratio, 3),
        "folder_over_compute_per_round": [round(c / f.elapsed_s, 3) for c, f in zip(compute, summaries)],
        "folder_timings": {k: round(v, 3) for k, v in summaries[-1].timings.items()},
    }
    benchmark.extra_info.update(info)
    print("\n" + "\n".join(f"  {k}: {v}" for k, v in info.items()))
    if ASSERT:
        assert ratio >= 0.9, info


@pytest.mark.parametrize("sizes", [(100_000,), (100_000, 30_000, 100_000)], ids=["100k", "100k-30k-100k"])
def test_peak_rss_100k_patch_slides(benchmark, bench_model: Path, tmp_path: Path, sizes: tuple[int, ...]) -> None:
    """`momkd infer` (a fresh process, torch blocked) on a folder of TRIDENT files of these sizes (one 100000-patch
    slide, or 100k, 30k and 100k patches, read in that order); peak RSS of that process."""
    dim = load_manifest(bench_model).model.feature_dim
    folder = tmp_path / "big"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, size in enumerate(sizes):
        write_trident_slide(folder / f"slide_{i}.h5", rng.standard_normal((size, dim), dtype=np.float32),
                            grid_coords(size))
    n = max(sizes)
    code = ("import resource, sys; sys.modules['torch'] = None\n"
            "from momkd.cli.main import app\n"
            "try:\n    app()\nexcept SystemExit as e:\n    rc = e.code\n"
            "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\nsys.exit(rc)\n")
    args = [sys.executable, "-c", code, "infer", str(bench_model), str(folder), "--out", str(tmp_path / "out"),
            "--quiet"]
    runs = []
    benchmark.pedantic(lambda: runs.append(subprocess.run(args, capture_output=True, text=True, timeout=900)),
                       rounds=1, iterations=1)
    r = runs[0]
    wall = benchmark.stats.stats.max
    assert r.returncode == 0, r.stderr
    peak_gb = int(r.stdout.split("MAXRSS_KB")[-1].split()[0]) / 2**20
    features_gb = n * dim * 4 / 2**30  # the largest slide's
    info = {"device": _device(), "model": str(bench_model), "patches": list(sizes), "feature_dim": dim,
            "features_gib": round(features_gb, 3), "peak_rss_gib": round(peak_gb, 3), "wall_s": round(wall, 2),
            "summary": r.stdout.splitlines()[0]}
    benchmark.extra_info.update(info)
    print("\n" + "\n".join(f"  {k}: {v}" for k, v in info.items()))
    if ASSERT:
        assert peak_gb <= 2.5
