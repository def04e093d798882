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

import itertools
import mmap
import multiprocessing
import os
import sys
import threading
from collections import deque
from concurrent.futures import BrokenExecutor, Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from momkd.data.batch import GraphSlide, load_graph_slide
from momkd.errors import SlideError

from .discover import SlideFile

POOLS = ("auto", "threads", "processes")
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


def one_line(text: str, limit: int = 500) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def load_one(file: SlideFile, cfg: ReaderConfig) -> GraphSlide | SlideFailure:
    """Read, validate and graph one slide (``momkd.data.batch.load_graph_slide``: ``read_slide`` guarantees the
    slide contract, the model's feature dim included); any problem is returned as a SlideFailure, never raised."""
    if file.duplicate_of is not None:
        return SlideFailure(file, "duplicate", f"duplicate slide id {file.slide_id!r}, also at {file.duplicate_of}")
    try:
        return load_graph_slide(file.path, cfg.k, cfg.direction, slide_id=file.slide_id,
                                expected_dim=cfg.feature_dim, keep_coords=cfg.keep_coords, index=file.index,
                                meta=file)
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
    count (``max_inflight``) and by bytes (files in flight add up to at most ``max_inflight_bytes`` on disk,
    estimated from file sizes; at least one is always in flight), so a folder of huge slides is never read into
    memory at once.
    """

    def __init__(self, files: list[SlideFile], cfg: ReaderConfig, workers: int = 2,
                 max_inflight_bytes: int = 1 << 30, max_inflight: int | None = None, pool: str = "threads") -> None:
        self.files = files
        self.cfg = cfg
        self.workers = max(1, int(workers))
        self.max_inflight = max_inflight or (2 * self.workers + 1)
        self.max_inflight_bytes = max_inflight_bytes
        self.pool = resolve_pool(pool, "cpu")
        self.nice = int(os.environ.get("MOMKD_READER_NICE", "10"))
        self._executor = self._new_executor()
        self._pending: deque[tuple[SlideFile, Future, int]] = deque()
        self._next = 0
        self._bytes = 0
        self._closed = False
        self._serial = 0          # after a worker crash: files to read one at a time (finds the culprit)
        self._refill()

    def _new_executor(self) -> Executor:
        if self.pool == "processes":
            return ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_lower_priority, initargs=(self.nice,))
        return ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="momkd-read",
                                  initializer=_lower_priority, initargs=(self.nice,))

    @staticmethod
    def _size(file: SlideFile) -> int:
        try:
            return os.stat(file.path).st_size
        except OSError:
            return 0

    def _submit(self, file: SlideFile) -> Future:
        return self._executor.submit(self.load_fn, file, self.cfg)

    @property
    def load_fn(self):  # noqa: ANN201 - overridable (tests)
        return load_shared if self.pool == "processes" else load_one

    def _refill(self) -> None:
        limit = 1 if self._serial else self.max_inflight
        while (not self._closed and self._next < len(self.files) and len(self._pending) < limit
               and (not self._pending or self._bytes < self.max_inflight_bytes)):
            f = self.files[self._next]
            size = self._size(f)
            self._pending.append((f, self._submit(f), size))
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
            item = fut.result()
        except BrokenExecutor:
            return self._after_crash(file)
        self._pending.popleft()
        self._bytes -= size
        if self._serial:
            self._serial -= 1
        self._refill()            # keep the workers busy while the caller uses this one
        return _received(item)

    def _after_crash(self, file: SlideFile) -> GraphSlide | SlideFailure:
        """A worker process died. Read alone (``_serial``), ``file`` is the culprit: it gets a failure row.
        Otherwise everything in flight is retried one file at a time on a fresh pool, so that the next crash
        names its file exactly; results that had already arrived are re-read (their memory freed)."""
        culprit = self._serial > 0
        for _, fut, _ in self._pending:
            if fut.done():
                _discard(fut)
            else:
                fut.cancel()
        in_flight = len(self._pending)
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._executor = self._new_executor()
        self._pending.clear()
        self._bytes = 0
        self._next = self.files.index(file)
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
