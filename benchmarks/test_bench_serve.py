"""Serving on Triton (``momkd serve`` + ``momkd infer --server``) against local inference, same model, same folder,
same run: folder throughput through one server vs local ``momkd infer``; p50/p99 latency of one request at
N = 2000 and 20000 over HTTP and gRPC; the cost of sending features as fp16 instead of fp32.

The model is the toy with the exported graph's exact I/O (``momkd.testing.toy``) unless ``MOMKD_BENCH_MODEL_DIR``
names a real model folder. Knobs: ``MOMKD_BENCH_DIM`` (1536), ``MOMKD_BENCH_HIDDEN`` (256),
``MOMKD_BENCH_SLIDES`` (16), ``MOMKD_BENCH_ROUNDS`` (latency requests per case, 20), ``MOMKD_BENCH_THREADS``
(engine threads, server and local alike; default all cores). Run:

    python -m pytest benchmarks/test_bench_serve.py --benchmark-only -s

Client and server share the machine here: on a 2-core box they compete for the cores, which a deployment
(server on its own GPU box) does not.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from momkd.manifest import Manifest, load_manifest
from momkd.runtime.pipeline import run_inference
from momkd.runtime.remote import RemoteBackend, remote_engine
from momkd.serve.repository import ServedModel
from momkd.serve.server import Ports, TritonServer
from momkd.synth import grid_coords
from momkd.testing.toy import build_toy_model_dir, write_slide_folder

ENV = os.environ.get
ROUNDS = int(ENV("MOMKD_BENCH_ROUNDS", "20"))
THREADS = int(ENV("MOMKD_BENCH_THREADS")) if ENV("MOMKD_BENCH_THREADS") else None

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    if ENV("MOMKD_BENCH_MODEL_DIR"):
        return load_manifest(ENV("MOMKD_BENCH_MODEL_DIR"))
    root = tmp_path_factory.mktemp("bench_serve") / "model"
    build_toy_model_dir(root, feature_dim=int(ENV("MOMKD_BENCH_DIM", "1536")),
                        hidden=int(ENV("MOMKD_BENCH_HIDDEN", "256")))
    return load_manifest(root)


@pytest.fixture(scope="module")
def folder(model: Manifest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bench_serve_slides") / "slides"
    sizes = np.random.default_rng(0).integers(1000, 6000, size=int(ENV("MOMKD_BENCH_SLIDES", "16")))
    write_slide_folder(path, [int(n) for n in sizes], model.model.feature_dim, chunk_rows=None)
    return path


@pytest.fixture(scope="module")
def server(model: Manifest):
    ports = Ports.free()
    with TritonServer(model, ServedModel(threads=THREADS), ports, address="127.0.0.1") as started:
        print(f"\ntritonserver ready in {started.startup_s:.2f} s")
        yield started


def _slide(n: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    return np.random.default_rng(n).standard_normal((n, d)).astype(np.float32), grid_coords(n, seed=n)


def test_folder_throughput_server_vs_local(benchmark: Any, record_machine: dict[str, Any], model: Manifest,
                                          folder: Path, server: TritonServer, tmp_path: Path) -> None:
    local = run_inference(model.root, folder, tmp_path / "local", backend="onnxruntime", device="cpu",
                          threads=THREADS)
    runs: list[float] = []

    def remote_run() -> None:
        s = run_inference(model.root, folder, tmp_path / f"remote{len(runs)}",
                          engine=remote_engine([server.grpc_url]))
        assert s.n_failed == 0
        runs.append(s.slides_per_s)

    benchmark.pedantic(remote_run, rounds=max(1, ROUNDS // 10), iterations=1)
    remote = float(np.median(runs))
    benchmark.extra_info.update({"local_slides_per_s": local.slides_per_s, "server_slides_per_s": remote,
                                 "server_over_local": remote / local.slides_per_s,
                                 "server_startup_s": server.startup_s, "slides": local.n_files})
    print(f"\nlocal {local.slides_per_s:.2f} slides/s, one server {remote:.2f} slides/s "
          f"(x{remote / local.slides_per_s:.2f}), {local.n_files} slides")


def _latency(benchmark: Any, remote: RemoteBackend, features: np.ndarray, coords: np.ndarray) -> dict[str, float]:
    times: list[float] = []

    def one() -> None:
        t0 = time.perf_counter()
        remote.infer_slide(features, coords)
        times.append(time.perf_counter() - t0)

    one()   # warm-up: the connection, the engine's first run at this shape
    times.clear()
    benchmark.pedantic(one, rounds=ROUNDS, iterations=1)
    ms = np.array(times) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("n", [2000, 20000])
def test_request_latency(benchmark: Any, record_machine: dict[str, Any], model: Manifest, server: TritonServer,
                         n: int, protocol: str) -> None:
    url = server.http_url if protocol == "http" else server.grpc_url
    remote = RemoteBackend([url], model.sha256, model.model.feature_dim, max_inflight=1)
    try:
        stats = _latency(benchmark, remote, *_slide(n, model.model.feature_dim))
    finally:
        remote.close()
    benchmark.extra_info.update({"n": n, "protocol": protocol, **stats})
    print(f"\nN={n} {protocol}: p50 {stats['p50_ms']:.1f} ms, p99 {stats['p99_ms']:.1f} ms")


def test_fp16_vs_fp32_request(benchmark: Any, record_machine: dict[str, Any], model: Manifest,
                              server: TritonServer) -> None:
    features, coords = _slide(20000, model.model.feature_dim)
    stats = {}
    for dtype in ("fp32", "fp16"):
        remote = RemoteBackend([server.http_url], model.sha256, model.model.feature_dim, max_inflight=1,
                               features_dtype=dtype)
        try:
            stats[dtype] = _latency(benchmark if dtype == "fp16" else _Timer(), remote, features, coords)
        finally:
            remote.close()
    ratio = stats["fp16"]["p50_ms"] / stats["fp32"]["p50_ms"]
    benchmark.extra_info.update({"n": 20000, "fp32": stats["fp32"], "fp16": stats["fp16"], "fp16_over_fp32": ratio})
    print(f"\nN=20000 http p50: fp32 {stats['fp32']['p50_ms']:.1f} ms, fp16 {stats['fp16']['p50_ms']:.1f} ms "
          f"(x{ratio:.2f})")


class _Timer:
    """``benchmark.pedantic`` for the reference case of a comparison (pytest-benchmark times one case per test)."""

    def pedantic(self, fn: Any, rounds: int, iterations: int) -> None:
        for _ in range(rounds * iterations):
            fn()
