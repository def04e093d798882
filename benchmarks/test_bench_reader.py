"""``read_slide`` (the checked reader training and the runtime share) against h5py's own full read, on a
20000-patch TRIDENT file (one-row chunks, as TRIDENT writes them), D = 1536. Target: the checked read (shape,
row count, NaN/Inf checks, float32 cast) is not slower than the plain read. A third row records the CPU seconds
of the runtime's ``load_one`` (read, checks and neighbour graph) for one such slide on a patch grid: with the
model using every core, each CPU-second the reader spends is model throughput lost (``cpu_s_per_slide``). Run:

    python -m pytest benchmarks/test_bench_reader.py --benchmark-only --benchmark-group-by=param:dim

Compare the two rows of one run; the machine is recorded in ``extra_info``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from momkd.data.slide import read_slide
from momkd.runtime.discover import discover_slides
from momkd.runtime.reader import ReaderConfig, SlideFailure, load_one
from momkd.synth import grid_coords, write_slide_h5
from momkd.testing.toy import write_trident_slide

N = 20000


@pytest.fixture(scope="module", params=[1536])
def trident_file(request: Any, tmp_path_factory: Any) -> Path:
    dim = request.param
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("reader") / "slide.h5"
    return write_slide_h5(path, rng.standard_normal((N, dim), dtype=np.float32),
                          rng.integers(0, 10**5, size=(N, 2)))


def plain_h5py_read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with h5py.File(path, "r") as h5:
        return h5["features"][()], h5["coords"][()]


@pytest.mark.parametrize("reader", ["read_slide", "h5py_full_read"])
def test_read_20000_patch_trident_file(benchmark: Any, record_machine: dict[str, Any], trident_file: Path,
                                       reader: str) -> None:
    fn = (lambda: read_slide(trident_file)) if reader == "read_slide" else (lambda: plain_h5py_read(trident_file))
    fn()  # page cache warm for both
    benchmark.pedantic(fn, rounds=7, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(n_patches=N, reader=reader)


def test_load_one_cpu_per_slide(benchmark: Any, record_machine: dict[str, Any], tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    write_trident_slide(tmp_path / "slide.h5", rng.standard_normal((N, 1536), dtype=np.float32), grid_coords(N))
    file, = discover_slides(tmp_path)
    cfg = ReaderConfig(1536, 8, "paper")
    cpu: list[float] = []

    def run() -> object:
        start = time.process_time()
        unit = load_one(file, cfg)
        cpu.append(time.process_time() - start)
        return unit

    assert not isinstance(run(), SlideFailure)   # page cache warm
    benchmark.pedantic(run, rounds=7, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(n_patches=N, reader="load_one", cpu_s_per_slide=min(cpu))
