"""Read + validate + build the neighbour table of each slide in a worker pool; hand slides out in file order with
read-ahead bounded by bytes.

Two pools:

* ``threads``: no copies at all; but h5py serialises every HDF5 call behind one lock, so threads add little
  read throughput beyond the first (the neighbour search and NaN checks do run in parallel).
* ``processes`` (Linux): each worker has its own HDF5 library, so reads scale with cores. A worker copies the
  features into a ``/dev/shm`` segment; the calling process maps it and unlinks it at once (no pickling, no
  second copy, nothing left behind once the array is dropped). A worker that dies on a file (an HDF5 crash on
  a corrupt file) costs that file only: its row says so, the pool is rebuilt and the other files are retried.

``auto`` picks processes when the model runs on a GPU (the CPU cores are free for reading, and only processes
scale HDF5 reads across them) and threads when it runs on the CPU (compute needs the cores; on 2 cores the two
pools measured within noise of each other, see ``benchmarks/test_bench_runtime.py``). Readers run at a lower
CPU priority (nice 10, ``MOMKD_READER_NICE``) so that they fill the compute's gaps instead of preempting it.

Every problem with one slide becomes a ``SlideFailure`` (the run goes on); nothing here raises for a bad file.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import multiprocessing
import os
import sys
import threading
import time
from collections import deque
from concurrent.futures import BrokenExecutor, Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from momkd.data.batch import GraphSlide, load_graph_slide
from momkd.errors import SlideError

from .discover import SlideFile

POOLS = ("auto", "threads", "processes")
HEADER_TIMEOUT_S = 60.0     # seconds the processes pool's header process may take on one request
HEADER_BATCH = 64           # slide headers per request to it
HEADER_RESTARTS = 3         # header processes started again after a crash or hang, before estimating from disk
SHM_DIR = "/dev/shm"


@dataclass
class SlideFailure:
    file: SlideFile
    code: str
    message: str                # one line: the problem (the CSV's ``error`` column)
    n_patches: int | None = None


@dataclass
class ReaderConfig:
    feature_dim: int
    k: int = 8
    direction: str = "paper"
    keep_coords: bool = False
    encoder: str | None = None    # the model's encoder: a slide whose encoder attribute names another is refused


def one_line(text: str, limit: int = 500) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


GRAPH_STAGE = 1   # a worker's mark in the reader's per-file stage flags: read, now building the neighbour graph
_worker = threading.local()   # per worker thread/process: ``stages``, the reader's flags (see ``_init_worker``)


def _init_worker(nice: int, stages: "bytearray | None") -> None:
    """Worker start: lower the priority, and keep the reader's per-file stage flags (0 reading, 1 graph; a
    shared-memory array for processes) for ``load_one`` to mark."""
    _worker.stages = stages
    _lower_priority(nice)


def load_one(file: SlideFile, cfg: ReaderConfig) -> GraphSlide | SlideFailure:
    """Read, validate and graph one slide (``momkd.data.batch.load_graph_slide``: ``read_slide`` guarantees the
    slide contract, the model's feature dim included); any problem is returned as a SlideFailure, never raised."""
    if file.bad_name is not None:
        return SlideFailure(file, "bad_name", file.bad_name)
    if file.duplicate_of is not None:
        return SlideFailure(file, "duplicate", f"duplicate slide id {file.slide_id!r}, also at {file.duplicate_of}")
    stages = getattr(_worker, "stages", None)
    on_read = None if stages is None else lambda: stages.__setitem__(file.index, GRAPH_STAGE)
    try:
        return load_graph_slide(file.path, cfg.k, cfg.direction, slide_id=file.slide_id,
                                expected_dim=cfg.feature_dim, expected_encoder=cfg.encoder,
                                keep_coords=cfg.keep_coords, index=file.index, meta=file, on_read=on_read)
    except SlideError as e:
        return SlideFailure(file, e.code, one_line(getattr(e, "message", str(e))))
    except MemoryError:
        return SlideFailure(file, "memory", "out of memory while reading the slide")
    except Exception as e:  # noqa: BLE001 - a bad file must never stop the run
        return SlideFailure(file, "unexpected", one_line(f"cannot be used ({type(e).__name__}: {e})"))


# --------------------------------------------------------------------------- shared-memory hand-off
_counter = itertools.count()


@dataclass
class SharedArray:
    """A float32 array parked in ``/dev/shm`` by a worker process (picklable: a name and a shape)."""

    name: str
    shape: tuple[int, ...]

    @classmethod
    def export(cls, arr: np.ndarray) -> "SharedArray":
        name = f"momkd-{os.getppid()}-{os.getpid()}-{next(_counter)}"
        path = os.path.join(SHM_DIR, name)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, max(arr.nbytes, 1))
            with mmap.mmap(fd, max(arr.nbytes, 1)) as mm:
                np.frombuffer(mm, dtype=np.float32, count=arr.size).reshape(arr.shape)[...] = arr
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        return cls(name, tuple(arr.shape))

    def attach(self) -> np.ndarray:
        """Map the segment and unlink its name: the memory lives exactly as long as the returned array."""
        path = os.path.join(SHM_DIR, self.name)
        fd = os.open(path, os.O_RDWR)
        try:
            size = int(np.prod(self.shape)) * 4
            mm = mmap.mmap(fd, max(size, 1))
        finally:
            os.close(fd)
            os.unlink(path)
        return np.frombuffer(mm, dtype=np.float32, count=int(np.prod(self.shape))).reshape(self.shape)

    def discard(self) -> None:
        try:
            os.unlink(os.path.join(SHM_DIR, self.name))
        except OSError:  # already gone (the consumer attached and unlinked it)
            pass


def load_shared(file: SlideFile, cfg: ReaderConfig) -> GraphSlide | SlideFailure:
    """``load_one`` in a worker process, features handed over through ``/dev/shm``."""
    item = load_one(file, cfg)
    if isinstance(item, GraphSlide) and item.features is not None:
        try:
            item.features = SharedArray.export(item.features)   # type: ignore[assignment]
        except OSError:
            pass   # /dev/shm full or missing: the array travels by pickle instead
    return item


def _received(item: GraphSlide | SlideFailure) -> GraphSlide | SlideFailure:
    if isinstance(item, GraphSlide) and isinstance(item.features, SharedArray):
        item.features = item.features.attach()
    return item


def _discard(fut: Future) -> None:
    """Done-callback for results nobody will take: free their shared memory."""
    if fut.cancelled() or fut.exception() is not None:
        return
    item = fut.result()
    if isinstance(item, GraphSlide) and isinstance(item.features, SharedArray):
        item.features.discard()


def _lower_priority(nice: int) -> None:
    """Run this reader thread/process at a lower CPU priority (Linux: per thread), so that the backend's compute
    threads get the cores whenever they can use them and reading fills the gaps: without it, a reader that
    preempts one of ONNX Runtime's intra-op threads stalls the whole parallel operator."""
    if nice <= 0:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (AttributeError, OSError):  # pragma: no cover - not Linux / not permitted
        pass


def _worker_up() -> int:
    """A pool's first task: import what reading needs (HDF5, scipy's KD-tree), so that no slide's time budget
    pays for a worker's start-up; returns the worker's pid."""
    import h5py  # noqa: F401
    import scipy.spatial  # noqa: F401

    return os.getpid()


def _stop_workers(executor: Executor) -> None:
    """Kill the worker processes of a process pool (one of them is stuck); the pool is replaced after this."""
    processes = getattr(executor, "_processes", None) or {}   # ProcessPoolExecutor's {pid: Process}
    for process in list(processes.values()):
        process.kill()


def decoded_size(path: os.PathLike[str] | str, k: int) -> int:
    """Bytes a slide takes once read, from its header alone: features (N, D) float32, coords (N, 2) int64 and the
    neighbour table (N, k) int64."""
    from momkd.data.slide import read_slide_header   # h5py: not imported by ``momkd --help`` (see batch.py)

    n, d, _attrs = read_slide_header(path)
    return n * (4 * d + 8 * 2 + 8 * k)


def _decoded_sizes(fn: Callable[[Path, int], int], paths: list[Path], k: int) -> list[int]:
    """``fn(path, k)`` for each path, 0 where the header cannot be read (the header process's task)."""
    sizes = []
    for path in paths:
        try:
            sizes.append(fn(path, k))
        except Exception:  # noqa: BLE001 - the worker reports this file's problem; it costs no memory
            sizes.append(0)
    return sizes


class _HeaderProbe:
    """``decoded_size`` in one helper process, ``HEADER_BATCH`` files per request (the processes pool): the
    calling process never opens a slide file, so an HDF5 crash or hang on a corrupt header costs that request's
    estimates (``None``: use the size on disk), never the run. The helper is replaced after a crash or a hang
    (``HEADER_TIMEOUT_S``), at most ``HEADER_RESTARTS`` times (then every estimate is ``None``)."""

    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = None
        self._restarts = 0
        self._known: dict[int, int | None] = {}      # file index -> decoded bytes (None: unknown)

    def size(self, fn: Callable[[Path, int], int], files: list[SlideFile], position: int, k: int) -> int | None:
        """The decoded bytes of ``files[position]`` (asking for it and the files after it when not known yet)."""
        file = files[position]
        if file.index not in self._known:
            batch = files[position: position + HEADER_BATCH]
            self._known.update(zip((f.index for f in batch), self._ask(fn, [f.path for f in batch], k)))
        return self._known[file.index]

    def _ask(self, fn: Callable[[Path, int], int], paths: list[Path], k: int) -> list[int | None]:
        if self._restarts > HEADER_RESTARTS:
            return [None] * len(paths)
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        try:
            return list(self._pool.submit(_decoded_sizes, fn, paths, k).result(timeout=HEADER_TIMEOUT_S))
        except (BrokenExecutor, FutureTimeout):
            self.close()
            self._restarts += 1
            return [None] * len(paths)

    def close(self) -> None:
        if self._pool is not None:
            _stop_workers(self._pool)
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def processes_supported() -> bool:
    return sys.platform.startswith("linux") and os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)


def resolve_pool(pool: str, device: str) -> str:
    """``auto`` -> processes for a GPU backend (where /dev/shm exists), threads for a CPU backend."""
    if pool not in POOLS:
        raise ValueError(f"reader pool must be one of {POOLS}, got {pool!r}")
    if pool == "processes" and not processes_supported():
        return "threads"
    if pool == "auto":
        return "processes" if device.startswith("cuda") and processes_supported() else "threads"
    return pool


class SlideReader:
    """Reads ``files`` ahead with ``workers`` threads or processes and hands them out in file order.

    ``take()`` returns the next ``GraphSlide | SlideFailure`` (waiting for it if needed), ``ready()`` says whether
    the next one is already read, ``exhausted`` whether everything has been handed out. Read-ahead is bounded by
    count (``max_inflight``) and by bytes (files in flight add up to at most ``max_inflight_bytes`` once read,
    from their headers: see ``_size``; at least one is always in flight), so a folder of huge slides, or of small
    compressed files that decode to huge slides, is never read into memory at once.
    """

    def __init__(self, files: list[SlideFile], cfg: ReaderConfig, workers: int = 2,
                 max_inflight_bytes: int = 1 << 30, max_inflight: int | None = None, pool: str = "threads",
                 slide_timeout: float | None = None) -> None:
        self.files = files
        self.cfg = cfg
        self.workers = max(1, int(workers))
        self.max_inflight = max_inflight or (2 * self.workers + 1)
        self.max_inflight_bytes = max_inflight_bytes
        self.pool = resolve_pool(pool, "cpu")
        self.nice = int(os.environ.get("MOMKD_READER_NICE", "10"))
        size = max((f.index for f in files), default=-1) + 1
        self._stages = (multiprocessing.get_context("spawn").RawArray("b", size) if self.pool == "processes"
                        else bytearray(size))   # per discovery index: 0 reading, GRAPH_STAGE building the graph
        self._start_pool()
        self._pending: deque[tuple[SlideFile, Future, int]] = deque()
        self._next = 0
        self._bytes = 0
        self._closed = False
        self._serial = 0          # after a worker crash: files to read one at a time (finds the culprit)
        self._headers = _HeaderProbe()                # processes pool: slide headers read in a helper process
        self.slide_timeout = slide_timeout or None   # seconds one file may take in a worker (None: no limit)
        self._head_since = time.monotonic()          # the first file in flight has been running at least since
        self.abandoned: list[SlideFile] = []         # timed-out reads still running in a thread (not killable)
        self._refill()

    def _start_pool(self) -> None:
        """A fresh pool; its first task says the pool is up (process start-up is no slide's time)."""
        self._executor = self._new_executor()
        self._pool_up_at: float | None = None
        self._pool_up = self._executor.submit(_worker_up)
        self._pool_up.add_done_callback(self._mark_pool_up)

    def _mark_pool_up(self, fut: Future) -> None:
        if fut is self._pool_up:
            self._pool_up_at = time.monotonic()

    def _new_executor(self) -> Executor:
        if self.pool == "processes":
            return ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_init_worker, initargs=(self.nice, self._stages))
        return ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="momkd-read",
                                  initializer=_init_worker, initargs=(self.nice, self._stages))

    def _size(self, file: SlideFile) -> int:
        """Bytes the slide takes once read (``decoded_size``: a compressed file decodes to far more than its size
        on disk); 0 for a file that will not be read or whose header cannot be (it fails at once). The processes
        pool reads headers in a helper process (``_HeaderProbe``), and uses the size on disk where that fails."""
        if file.bad_name is not None or file.duplicate_of is not None:
            return 0
        if self.pool == "processes":
            here = self._next if self._next < len(self.files) and self.files[self._next] is file else None
            position = here if here is not None else self.files.index(file)
            size = self._headers.size(self.header_fn, self.files, position, self.cfg.k)
            if size is not None:
                return size
            try:
                return os.stat(file.path).st_size
            except OSError:
                return 0
        try:
            return self.header_fn(file.path, self.cfg.k)
        except Exception:  # noqa: BLE001 - the worker reports this file's problem; it costs no memory
            return 0

    @property
    def header_fn(self):  # noqa: ANN201 - overridable (tests)
        return decoded_size

    def _submit(self, file: SlideFile) -> Future:
        self._stages[file.index] = 0
        return self._executor.submit(self.load_fn, file, self.cfg)

    @property
    def load_fn(self):  # noqa: ANN201 - overridable (tests)
        return load_shared if self.pool == "processes" else load_one

    def _refill(self) -> None:
        limit = 1 if self._serial else self.max_inflight
        while (not self._closed and self._next < len(self.files) and len(self._pending) < limit
               and (not self._pending or self._bytes < self.max_inflight_bytes)):
            f = self.files[self._next]
            if not self._pending:
                self._head_since = time.monotonic()
            fut = self._submit(f)     # before its size: the pool starts on it while its header is read
            size = self._size(f)
            self._pending.append((f, fut, size))
            self._bytes += size
            self._next += 1

    @property
    def exhausted(self) -> bool:
        return not self._pending

    def ready(self) -> bool:
        return bool(self._pending) and self._pending[0][1].done()

    def take(self) -> GraphSlide | SlideFailure:
        if not self._pending:
            raise StopIteration
        file, fut, size = self._pending[0]
        try:
            item = fut.result(timeout=self._time_left())
        except FutureTimeout:
            return self._after_timeout(file)
        except BrokenExecutor:
            return self._after_crash(file)
        self._pending.popleft()
        # the pool runs files in submission order: the next one is running by the time this one is done
        self._head_since = time.monotonic()
        self._bytes -= size
        if self._serial:
            self._serial -= 1
        self._refill()            # keep the workers busy while the caller uses this one
        return _received(item)

    def _time_left(self) -> float | None:
        """Seconds the first file in flight may still take (None: no limit); it has been running at least since
        ``_head_since``, so a file never times out early (one read ahead gets longer, never shorter)."""
        if self.slide_timeout is None:
            return None
        if self._pool_up_at is None:
            with contextlib.suppress(BrokenExecutor):   # the pool cannot start: the file's own future says so
                self._pool_up.result()
        since = max(self._head_since, self._pool_up_at or time.monotonic())
        return max(0.0, self.slide_timeout - (time.monotonic() - since))

    def _after_timeout(self, file: SlideFile) -> SlideFailure:
        """``file`` ran past the slide budget: it gets a timeout row and reading goes on with the next file on a
        fresh pool. A stuck process is killed; a thread cannot be: it is left to finish, its result dropped
        (``abandoned``; Python waits for it at exit)."""
        stage = "graph" if self._stages[file.index] == GRAPH_STAGE else "reading"
        if self.pool == "processes":
            _stop_workers(self._executor)
        else:
            self.abandoned.append(file)
        self._serial = max(self._serial - 1, 0)
        self._restart(self.files.index(file) + 1)
        self._refill()
        return SlideFailure(file, "timeout", f"slide took more than {self.slide_timeout:g} s ({stage})")

    def _restart(self, at: int) -> None:
        """Drop everything in flight (results already in: memory freed), replace the pool, read on from file
        ``at``."""
        for _, fut, _ in self._pending:
            if fut.done():
                _discard(fut)
            else:
                fut.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._start_pool()
        self._pending.clear()
        self._bytes = 0
        self._next = at

    def _after_crash(self, file: SlideFile) -> GraphSlide | SlideFailure:
        """A worker process died. Read alone (``_serial``), ``file`` is the culprit: it gets a failure row.
        Otherwise everything in flight is retried one file at a time on a fresh pool, so that the next crash
        names its file exactly; results that had already arrived are re-read (their memory freed)."""
        culprit = self._serial > 0
        in_flight = len(self._pending)
        self._restart(self.files.index(file))
        if culprit:
            self._next += 1
            self._serial -= 1
            self._refill()
            return SlideFailure(file, "crashed", "the reader process crashed on this file (corrupt HDF5?)")
        self._serial = in_flight
        self._refill()
        return self.take()

    def __iter__(self) -> Iterator[GraphSlide | SlideFailure]:
        try:
            while not self.exhausted:
                yield self.take()
        finally:
            self.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            for _, fut, _ in self._pending:
                if not fut.cancel():
                    fut.add_done_callback(_discard)
            self._pending.clear()
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._headers.close()
