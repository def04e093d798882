"""What this process may use of the CPU: instruction-set flags (``/proc/cpuinfo``) and usable CPUs (affinity and
cgroup quota), and the thread settings derived from them.

Reduced-precision graphs are only worth running where the host has the instructions that make them fast:

* int8 (ONNX Runtime's quantised MatMul / MatMulInteger / QLinear kernels): VNNI (``avx512_vnni`` or
  ``avx_vnni``) or AMX (``amx_int8``); without them MLAS emulates the dot products and int8 is no faster.
* bf16: AMX (``amx_bf16``) or ``avx512_bf16`` (oneDNN, i.e. PyTorch; ONNX Runtime's CPU EP has no fast bf16
  kernels for these operators).

Usable CPUs are ``len(os.sched_getaffinity(0))`` capped by the cgroup CPU quota (v2 ``cpu.max``, v1
``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``; the tightest one on the path from this process's cgroup to the
root), rounded up: a container limited to 2.5 CPUs on a 64-core host gets 3 threads, not 64.

Torch-free (the runtime tier uses it).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
CGROUP_ROOT = Path("/sys/fs/cgroup")

INT8_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni")   # any one: fast int8 dot products
BF16_FLAGS = ("amx_bf16", "avx512_bf16")               # any one: fast bf16 dot products
REPORTED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


@dataclass(frozen=True)
class CpuInfo:
    """The host CPU as far as momkd cares: model name, the relevant ISA flags, usable CPUs."""

    model_name: str
    flags: frozenset[str]          # only the REPORTED_FLAGS the CPU has
    usable_cpus: int
    quota_cpus: float | None       # the cgroup CPU quota in CPUs (None: no quota)

    @property
    def int8_isa(self) -> str | None:
        """The instruction set that makes int8 fast here (``"amx_int8"``, ``"avx512_vnni"``, ...), or None."""
        return next((f for f in INT8_FLAGS if f in self.flags), None)

    @property
    def bf16_isa(self) -> str | None:
        """The instruction set that makes bf16 fast here (``"amx_bf16"`` or ``"avx512_bf16"``), or None."""
        return next((f for f in BF16_FLAGS if f in self.flags), None)

    @property
    def isa(self) -> str:
        """One short name of the best matrix ISA here: ``amx``, ``avx512_vnni``, ``avx_vnni``, ``avx512f``,
        ``avx2`` or ``baseline`` (what ``momkd bench`` prints beside each row)."""
        if "amx_tile" in self.flags:
            return "amx"
        for flag in ("avx512_vnni", "avx_vnni", "avx512f", "avx2"):
            if flag in self.flags:
                return flag
        return "baseline"

    def to_dict(self) -> dict[str, object]:
        return {"cpu": self.model_name, "isa": self.isa, "flags": sorted(self.flags), "usable_cpus": self.usable_cpus,
                "cgroup_quota_cpus": self.quota_cpus}


def parse_cpuinfo(text: str) -> tuple[str, frozenset[str]]:
    """(model name, every flag) of the first processor in a ``/proc/cpuinfo`` text (x86 ``flags``, arm
    ``Features``); ("", {}) where it has neither."""
    name, flags = "", frozenset[str]()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not name:
            name = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = frozenset(value.split())
        if name and flags:
            break
    return name, flags


def _cgroup_dirs(root: Path, proc_cgroup: str) -> list[Path]:
    """The cgroup folders whose CPU quota applies to this process, innermost first (v2 and v1 cpu controller)."""
    dirs: list[Path] = []
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        if controllers == "":
            base = root / "unified" if (root / "unified" / "cgroup.controllers").exists() else root
        elif "cpu" in controllers.split(","):
            base = next((root / n for n in ("cpu,cpuacct", "cpu", "cpuacct,cpu") if (root / n).is_dir()), root / "cpu")
        else:
            continue
        here = base / rel.lstrip("/")
        while True:
            dirs.append(here)
            if here == base or base not in here.parents:
                break
            here = here.parent
    return dirs


def _quota_of(folder: Path) -> float | None:
    """CPUs allowed by the quota in one cgroup folder (None: no quota there or unreadable)."""
    try:
        if (folder / "cpu.max").is_file():
            quota, _, period = (folder / "cpu.max").read_text().strip().partition(" ")
            if quota == "max":
                return None
            return int(quota) / int(period or 100000)
        q_file, p_file = folder / "cpu.cfs_quota_us", folder / "cpu.cfs_period_us"
        if q_file.is_file() and p_file.is_file():
            quota_us = int(q_file.read_text().strip())
            period_us = int(p_file.read_text().strip())
            return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None
    return None


def cgroup_cpu_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """The tightest cgroup CPU quota over this process's cgroup and its ancestors, in CPUs (None: unlimited)."""
    try:
        text = proc_cgroup.read_text()
    except OSError:
        return None
    quotas = [q for q in (_quota_of(d) for d in _cgroup_dirs(root, text)) if q is not None and q > 0]
    return min(quotas) if quotas else None


def affinity_cpus() -> int:
    """CPUs this process may be scheduled on (``os.sched_getaffinity``; ``os.cpu_count`` where it is missing)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def usable_cpus() -> int:
    """Threads worth running: the affinity CPUs, capped by the cgroup quota (rounded up), at least 1."""
    quota = cgroup_cpu_quota()
    n = affinity_cpus()
    return max(1, min(n, math.ceil(quota))) if quota is not None else n


@functools.lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    """This host's ``CpuInfo`` (read once per process)."""
    try:
        name, flags = parse_cpuinfo(CPUINFO.read_text())
    except OSError:  # not Linux
        import platform

        name, flags = platform.processor() or platform.machine(), frozenset()
    return CpuInfo(model_name=name, flags=frozenset(f for f in REPORTED_FLAGS if f in flags),
                   usable_cpus=usable_cpus(), quota_cpus=cgroup_cpu_quota())


def thread_environment(threads: int | None = None) -> dict[str, str]:
    """OpenMP settings for a torch process (set before torch is imported; values the user set win).

    ``OMP_NUM_THREADS``: the usable CPUs (libgomp counts the affinity CPUs only, not the cgroup quota).
    ``OMP_WAIT_POLICY=PASSIVE``: an idle OpenMP worker sleeps instead of spinning ~300000 iterations at every
    barrier: on a host shared with other CPU-bound jobs the spinning workers take the CPU share the straggling
    worker needs (``benchmarks/test_bench_busy_host.py``)."""
    return {"OMP_NUM_THREADS": str(threads or usable_cpus()), "OMP_WAIT_POLICY": "PASSIVE"}


def apply_thread_environment(threads: int | None = None) -> dict[str, str]:
    """``os.environ.setdefault`` every ``thread_environment`` entry; returns the values now in force."""
    out = {}
    for key, value in thread_environment(threads).items():
        out[key] = os.environ.setdefault(key, value)
    return out
