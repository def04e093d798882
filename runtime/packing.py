"""Pack slides into one ragged batch: ``features (N, D)``, ``neighbors (N, W)`` (global rows, -1 pad),
``slide_offsets (B+1,)`` - the layout the exported model takes.

Slides go in file order; a pack holds slides whose rows add up to at most ``max_rows``; a slide larger than
that runs alone. A pack of one slide uses the slide's own arrays (no copy). A pack of several slides is
copied, slide by slide as they arrive, into a preallocated float32 buffer that is reused from pack to pack
(so its pages are faulted once), and each slide's features are released as soon as they are copied.
"""

from __future__ import annotations

import queue
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class PackSlide:
    """A slide ready to pack (read, validated, neighbour table built)."""

    index: int                   # discovery index (row of predictions.csv)
    slide_id: str
    features: np.ndarray | None  # (n, D) float32; set to None once copied into a pack buffer
    neighbors: np.ndarray        # (n, W) int64, local rows, -1 pad
    n: int
    coords: np.ndarray | None = None   # kept only when attention is saved
    meta: Any = None                   # passed through untouched (e.g. the SlideFile)
    read_s: float = 0.0                # time spent reading + validating
    graph_s: float = 0.0               # time spent building the neighbour table


@dataclass
class PackedEntry:
    index: int
    slide_id: str
    n: int
    offset: int
    coords: np.ndarray | None
    meta: Any


@dataclass
class Pack:
    entries: list[PackedEntry]
    features: np.ndarray        # (rows, D) float32, C-contiguous
    neighbors: np.ndarray       # (rows, W) int64, global rows, -1 pad
    slide_offsets: np.ndarray   # (B+1,) int64
    buffer: "_Buffer | None" = field(default=None, repr=False)   # returned to its pool by release()

    @property
    def rows(self) -> int:
        return int(self.slide_offsets[-1])

    @property
    def n_slides(self) -> int:
        return len(self.entries)

    def release(self) -> None:
        """Give the features buffer back to its pool (call after the backend has run on this pack)."""
        if self.buffer is not None:
            self.buffer.pool._free.put(self.buffer)
            self.buffer = None
        self.features = self.neighbors = None  # type: ignore[assignment]


def shift_neighbors(neighbors: np.ndarray, offset: int, width: int | None = None) -> np.ndarray:
    """Local neighbour rows -> global rows of a pack (``+ offset``), -1 kept, right-padded with -1 to ``width``."""
    n, w = neighbors.shape
    width = w if width is None else width
    if offset == 0 and width == w and neighbors.dtype == np.int64:
        return neighbors
    out = np.full((n, width), -1, dtype=np.int64)
    np.add(neighbors, offset, out=out[:, :w], where=neighbors >= 0)
    return out


class _Buffer:
    def __init__(self, pool: "BufferPool") -> None:
        self.pool = pool
        self.array: np.ndarray | None = None

    def view(self, rows: int, dim: int) -> np.ndarray:
        cap = self.pool.capacity_rows
        if self.array is None or self.array.shape[1] != dim or self.array.shape[0] < rows:
            self.array = None
            self.array = np.empty((max(rows, cap), dim), dtype=np.float32)
        return self.array[:rows]


class PoolClosed(Exception):
    """``BufferPool.acquire`` gave up waiting because the pool's stop event was set."""


class BufferPool:
    """Reusable float32 pack buffers of ``capacity_rows`` rows (pages faulted once, then reused).

    ``acquire`` hands out a free buffer, or a new one while fewer than ``max_buffers`` exist; at the limit it
    waits for a ``Pack.release`` (bounding the memory held by packs), giving up with ``PoolClosed`` once
    ``stop`` (a threading.Event) is set. ``max_buffers=None``: never waits.
    """

    def __init__(self, capacity_rows: int, max_buffers: int | None = None, stop: Any = None) -> None:
        self.capacity_rows = int(capacity_rows)
        self.max_buffers = max_buffers
        self.stop = stop
        self._free: queue.Queue[_Buffer] = queue.Queue()
        self.created = 0

    def acquire(self) -> _Buffer:
        try:
            return self._free.get_nowait()
        except queue.Empty:  # none free: make one, or wait below when at the limit
            pass
        if self.max_buffers is None or self.created < self.max_buffers:
            self.created += 1
            return _Buffer(self)
        while True:
            if self.stop is not None and self.stop.is_set():
                raise PoolClosed()
            try:
                return self._free.get(timeout=0.05)
            except queue.Empty:
                continue


class Packer:
    """Incremental packer: ``add`` slides in order, it returns the packs they complete; ``finish`` the rest.

    ``ramp`` = r starts small so the compute starts early (the first pack cannot overlap any reading): the
    first packs get ``max_rows / 2**r``, ``/ 2**(r-1)``, ... rows, then ``max_rows``. Pack boundaries depend on
    the slides' order and sizes alone, never on timing.
    """

    def __init__(self, max_rows: int, max_slides: int | None = None, pool: BufferPool | None = None,
                 ramp: int = 0) -> None:
        if max_rows < 1:
            raise ValueError("max_rows must be >= 1")
        self.max_rows = int(max_rows)
        self.max_slides = max_slides
        self.pool = pool
        self.ramp = int(ramp)
        self.n_packs = 0
        self._reset()

    @property
    def limit(self) -> int:
        """Row budget of the pack being built."""
        return max(1, self.max_rows >> max(0, self.ramp - self.n_packs))

    def _reset(self) -> None:
        self._slides: list[PackSlide] = []
        self._rows = 0
        self._buffer: _Buffer | None = None
        self._feats: np.ndarray | None = None   # the buffer's full-capacity view while copying

    def add(self, slide: PackSlide) -> list[Pack]:
        done: list[Pack] = []
        full = self.max_slides is not None and len(self._slides) >= self.max_slides
        if self._slides and (full or self._rows + slide.n > self.limit):
            done.append(self._emit())
        if slide.n >= self.limit:
            done.append(self._single(slide))
            return done
        if len(self._slides) == 1:
            self._start_buffer(slide.features.shape[1])    # type: ignore[union-attr]
            self._copy_in(self._slides[0], 0)
        if self._slides:
            self._copy_in(slide, self._rows)
        self._slides.append(slide)
        self._rows += slide.n
        return done

    def finish(self) -> Pack | None:
        return self._emit() if self._slides else None

    # --- internals
    def _start_buffer(self, dim: int) -> None:
        if self.pool is not None:
            self._buffer = self.pool.acquire()
            self._feats = self._buffer.view(self.max_rows, dim)
        else:
            self._buffer = None
            self._feats = np.empty((self.max_rows, dim), dtype=np.float32)

    def _copy_in(self, slide: PackSlide, row: int) -> None:
        feats = slide.features
        assert self._feats is not None and feats is not None
        if feats.shape[1] != self._feats.shape[1]:
            raise ValueError(f"slide {slide.slide_id}: feature dim {feats.shape[1]} != pack dim {self._feats.shape[1]}")
        self._feats[row:row + slide.n] = feats
        slide.features = None   # release the slide's own copy now

    def _single(self, slide: PackSlide) -> Pack:
        self.n_packs += 1
        feats = np.ascontiguousarray(slide.features, dtype=np.float32)
        entry = PackedEntry(slide.index, slide.slide_id, slide.n, 0, slide.coords, slide.meta)
        nb = shift_neighbors(slide.neighbors, 0)
        slide.features = None
        return Pack([entry], feats, nb, np.array([0, slide.n], dtype=np.int64))

    def _emit(self) -> Pack:
        if len(self._slides) == 1:
            pack = self._single(self._slides[0])
            self._reset()
            return pack
        self.n_packs += 1
        width = max(s.neighbors.shape[1] for s in self._slides)
        entries, nbs, offsets, row = [], [], [0], 0
        for s in self._slides:
            entries.append(PackedEntry(s.index, s.slide_id, s.n, row, s.coords, s.meta))
            nbs.append(shift_neighbors(s.neighbors, row, width))
            row += s.n
            offsets.append(row)
        assert self._feats is not None
        pack = Pack(entries, self._feats[:row], np.concatenate(nbs, axis=0), np.asarray(offsets, dtype=np.int64),
                    buffer=self._buffer)
        self._reset()
        return pack


def pack_slides(slides: list[PackSlide]) -> Pack:
    """All ``slides`` in one pack (whatever their total rows): the reference packing, used by tests."""
    packer = Packer(max_rows=max(1, sum(s.n for s in slides) + 1))
    for s in slides:
        assert not packer.add(s)
    pack = packer.finish()
    assert pack is not None
    return pack


def split_outputs(pack: Pack, outputs: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Per-slide views of a pack's outputs: per-slide arrays indexed by b, per-row arrays sliced by offsets."""
    B, N = pack.n_slides, pack.rows
    per_slide = []
    for b, e in enumerate(pack.entries):
        d: dict[str, Any] = {}
        for name, arr in outputs.items():
            if arr.ndim >= 1 and arr.shape[0] == B and name in ("probability", "logits"):
                d[name] = arr[b]
            elif arr.ndim >= 1 and arr.shape[0] == N:
                d[name] = arr[e.offset:e.offset + e.n]
        per_slide.append(d)
    return per_slide
