"""Start and stop the ``tritonserver`` that the ``nvidia-pytriton`` wheel bundles (Triton 2.51 with its Python
backend), serving one momkd model folder.

The bundle's pieces are used directly (its ``pytriton`` Python package is never imported): the server binary,
the Python backend, and the Python-backend stub built for this interpreter's minor version. The stub links
``libpython3.X``; the server's environment puts this interpreter's own ``LIBDIR`` first on ``LD_LIBRARY_PATH``
(the stub otherwise picks a system libpython of another build and fails), then the wheel's bundled libraries.
The stub ignores ``PYTHONPATH``: the served ``model.py`` sets its import path itself
(:func:`momkd.serve.repository.model_py`).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from momkd.errors import MomkdError
from momkd.manifest import Manifest

from .repository import ServedModel, write_serving_repository

READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 15.0
SERVE_MISSING = "momkd serve needs the Triton server bundled with nvidia-pytriton (pip install momkd[serve])"


class ServeError(MomkdError):
    """The Triton server cannot be started, or stopped before it was ready (exit code 2)."""


@dataclass(frozen=True)
class TritonBundle:
    """Paths of the Triton server shipped in the ``nvidia-pytriton`` wheel."""

    binary: Path          # tritonserver
    python_backend: Path  # libtriton_python.so + triton_python_backend_utils.py
    stub: Path            # triton_python_backend_stub for this interpreter's Python version
    libs: Path            # the wheel's bundled shared libraries

    @classmethod
    def find(cls) -> TritonBundle:
        spec = importlib.util.find_spec("pytriton")
        if spec is None or not spec.submodule_search_locations:
            raise ServeError(SERVE_MISSING)
        root = Path(list(spec.submodule_search_locations)[0])
        server = root / "tritonserver"
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        bundle = cls(server / "bin" / "tritonserver", server / "backends" / "python",
                     server / "python_backend_stubs" / version / "triton_python_backend_stub",
                     root.parent / "nvidia_pytriton.libs")
        for path in (bundle.binary, bundle.python_backend / "libtriton_python.so", bundle.stub):
            if not path.is_file():
                raise ServeError(f"{path}: missing from the nvidia-pytriton install (Python {version} needs its "
                                 "Python-backend stub); reinstall momkd[serve]")
        return bundle

    def backend_directory(self, work: Path) -> Path:
        """``work/backends/python`` with the Python backend and this interpreter's stub (Triton looks for the
        stub beside the backend library)."""
        python = work / "backends" / "python"
        python.mkdir(parents=True, exist_ok=True)
        for item in self.python_backend.iterdir():
            if item.is_file():
                (python / item.name).symlink_to(item)
        shutil.copy2(self.stub, python / "triton_python_backend_stub")
        return work / "backends"


def server_environment(bundle: TritonBundle, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of the server process: this interpreter's libpython and the bundle's libraries first on
    ``LD_LIBRARY_PATH`` (see the module docstring)."""
    env = dict(os.environ if base is None else base)
    libdir = sysconfig.get_config_var("LIBDIR")
    lib_path = [p for p in (libdir, str(bundle.libs), env.get("LD_LIBRARY_PATH")) if p]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(lib_path)
    env.setdefault("OMP_NUM_THREADS", "1")   # the runtime backend sets its own intra-op threads
    return env


_PRCTL = ctypes.CDLL(None).prctl if sys.platform.startswith("linux") else None   # resolved before any fork
PR_SET_PDEATHSIG = 1


def _end_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the server gets SIGTERM when the thread that started it dies (a killed ``momkd serve`` leaves no
    orphaned server holding its ports)."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_ports(n: int, address: str = "127.0.0.1") -> list[int]:
    """``n`` distinct TCP ports free on ``address`` now (bound together, so distinct; released on return)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind((address, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass(frozen=True)
class Ports:
    """The server's HTTP, gRPC and Prometheus-metrics ports."""

    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002

    @classmethod
    def free(cls, address: str = "127.0.0.1") -> "Ports":
        """Three ports free on ``address`` now (tests and benchmarks)."""
        return cls(*free_ports(3, address))


class TritonServer:
    """One ``tritonserver`` process serving ``manifest``'s model folder as ``served`` (or, with ``repository``,
    that model repository as it is: ``momkd export --format triton`` output, in tests).

    ``start()`` writes a private work folder (model repository, backend folder, ``triton.log``) and launches the
    server in its own process group; ``wait_ready()`` polls ``/v2/health/ready``; ``stop()`` ends it (SIGTERM,
    then SIGKILL after ``STOP_TIMEOUT_S``) and removes the work folder. Also a context manager (start + ready).
    """

    def __init__(self, manifest: Manifest | None, served: ServedModel = ServedModel(), ports: Ports = Ports(), *,
                 address: str = "0.0.0.0", work_dir: str | Path | None = None,
                 repository: str | Path | None = None) -> None:
        self.manifest = manifest
        self.repository = Path(repository) if repository is not None else None
        self.served = served
        self.ports = ports
        self.address = address
        self._given_work = Path(work_dir) if work_dir is not None else None
        self.work: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.startup_s: float | None = None
        self._t0 = 0.0

    @property
    def host(self) -> str:
        return "127.0.0.1" if self.address in ("0.0.0.0", "::") else self.address

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.ports.http}"

    @property
    def grpc_url(self) -> str:
        return f"grpc://{self.host}:{self.ports.grpc}"

    @property
    def log_path(self) -> Path:
        if self.work is None:
            raise ServeError("the server was not started")
        return self.work / "triton.log"

    def command(self, repository: Path, backends: Path, bundle: TritonBundle) -> list[str]:
        return [str(bundle.binary), f"--model-repository={repository}", f"--backend-directory={backends}",
                f"--http-address={self.address}", f"--http-port={self.ports.http}",
                f"--grpc-address={self.address}", f"--grpc-port={self.ports.grpc}",
                f"--metrics-address={self.address}", f"--metrics-port={self.ports.metrics}",
                "--allow-metrics=true", "--allow-gpu-metrics=false", "--strict-readiness=true",
                "--exit-timeout-secs=5", "--log-verbose=0",
                "--backend-config=python,shm-default-byte-size=16777216",
                "--backend-config=python,shm-growth-byte-size=67108864"]

    def start(self) -> TritonServer:
        bundle = TritonBundle.find()
        self.work = self._given_work or Path(tempfile.mkdtemp(prefix="momkd-serve-"))
        self.work.mkdir(parents=True, exist_ok=True)
        repository = self.repository
        if repository is None and self.manifest is not None:
            repository = write_serving_repository(self.work / "repository", self.manifest, self.served)
        if repository is None:
            raise ValueError("give the model folder's manifest or a model repository")
        backends = bundle.backend_directory(self.work)
        self._t0 = time.perf_counter()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command(repository, backends, bundle), stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=server_environment(bundle), cwd=self.work, start_new_session=True,
                                            preexec_fn=_end_with_parent)
        return self

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> float:
        """Poll until the server and its model are ready; returns the startup time in seconds. Raises
        ``ServeError`` (with the log's error lines) when the server exits or is not ready in ``timeout_s``."""
        if self.process is None:
            raise ServeError("the server was not started")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServeError(f"tritonserver exited with code {self.process.returncode} before it was ready: "
                                 f"{self.log_errors()} (log: {self.log_path})")
            if self.ready():
                self.startup_s = time.perf_counter() - self._t0
                return self.startup_s
            time.sleep(0.1)
        raise ServeError(f"tritonserver was not ready after {timeout_s:.0f} s: {self.log_errors()} "
                         f"(log: {self.log_path})")

    def log_errors(self, limit: int = 3) -> str:
        """The last error lines of ``triton.log`` (the model's own messages included), as one line."""
        try:
            lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return "no log"
        errors = [ln.strip() for ln in lines if ln.startswith("E") or "rror" in ln or ln.startswith("momkd:")]
        return " | ".join(errors[-limit:]) or (lines[-1].strip() if lines else "empty log")

    def _signal(self, sig: int, group_only: bool = False) -> None:
        """``sig`` to the server's process group while the server runs (``group_only``: also after it exited,
        for Python-backend stubs left in the group)."""
        if self.process is not None and (group_only or self.process.poll() is None):
            with contextlib.suppress(ProcessLookupError):   # the group has already gone
                os.killpg(self.process.pid, sig)   # the server and its Python-backend stubs

    def kill(self) -> None:
        """End the server at once (SIGKILL to its process group), as a crash would; the work folder is kept."""
        self._signal(signal.SIGKILL)
        if self.process is not None:
            self.process.wait(timeout=STOP_TIMEOUT_S)
        self._signal(signal.SIGKILL, group_only=True)

    def stop(self) -> None:
        """End the server (SIGTERM: Triton finishes requests in flight for up to 5 s) and remove the work folder
        (unless it was given)."""
        if self.process is not None and self.process.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.kill()
        self._signal(signal.SIGKILL, group_only=True)   # any stub left in the group
        if self.work is not None and self._given_work is None:
            shutil.rmtree(self.work, ignore_errors=True)

    def __enter__(self) -> TritonServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
