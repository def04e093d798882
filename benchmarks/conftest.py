"""Shared benchmark fixtures (generic: nothing here knows what a benchmark measures)."""

from __future__ import annotations

import os
import platform
import sys
from typing import Any

import numpy as np
import pytest


def machine_info() -> dict[str, Any]:
    """The machine a timing was taken on: CPU, usable cores, Python and numpy/scipy versions."""
    import scipy

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "machine": f"{platform.machine()} {platform.processor()}".strip(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable,
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "scipy": scipy.__version__,
    }


@pytest.fixture()
def record_machine(benchmark: Any) -> dict[str, Any]:
    """Adds ``machine_info()`` to the benchmark's ``extra_info`` and returns it."""
    info = machine_info()
    benchmark.extra_info.update(info)
    return info
