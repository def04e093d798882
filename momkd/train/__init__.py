"""Training (PyTorch): datasets, sampling, the fit loop and cross-validated runs."""

from momkd.runtime.cpu import apply_thread_environment

# Before torch is first imported (libgomp reads these once): one OpenMP thread per usable CPU (affinity and
# cgroup quota) and idle workers sleeping instead of spinning, so that training slows in proportion to the CPU
# share it gets on a busy host (benchmarks/test_bench_busy_host.py). A value the user set wins.
apply_thread_environment()
