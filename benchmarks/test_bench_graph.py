"""``knn_table`` (the exact k-NN graph every slide needs, in training and inference) at N = 20000 patches.

Two inputs: a TRIDENT-like 256-px patch grid with holes (integer coordinates, heavy distance ties: the lattice
lookup), and uniform random float coordinates (the KD-tree path). Target: <= 50 ms each on a 2-core machine.
Run:

    python -m pytest benchmarks/test_bench_graph.py --benchmark-only

Timings on shared machines are noisy; the machine is recorded in ``extra_info``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from momkd.graph import knn_table
from momkd.synth import grid_coords

N = 20000
K = 8


INPUTS = {
    "grid_with_holes": lambda: grid_coords(N),
    "random_float": lambda: np.random.default_rng(0).uniform(0, 256 * 160, (N, 2)),
}


@pytest.mark.parametrize("kind", list(INPUTS))
def test_knn_table_20000(benchmark: Any, record_machine: dict[str, Any], kind: str) -> None:
    coords = INPUTS[kind]()
    benchmark.extra_info.update(n=N, k=K, coords=kind)
    table = benchmark(knn_table, coords, K)
    assert table.shape == (N, K) and (table >= 0).all()
