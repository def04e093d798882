"""The runtime's streaming packer: slides into the exported graph's ragged batch (``momkd.data.batch.Pack``)
as they arrive, copied into reused buffers.

Slides go in file order; a pack holds slides whose rows add up to at most ``max_rows``; a slide larger than
that runs alone. A pack of one slide uses the slide's own arrays (no copy). A pack of several slides is
copied, slide by slide as they arrive, into a preallocated float32 buffer that is reused from pack to pack
(so its pages are faulted once), and each slide's features are released as soon as they are copied.
"""

from __future__ import annotations

import queue
from typing import Any

import numpy as np

from momkd.data.batch import GraphSlide, Pack, PackedEntry, shift_neighbors


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

    def give_back(self, buffer: _Buffer) -> None:
        """Return a buffer handed out by ``acquire`` (``Pack.release`` calls this)."""
        self._free.put(buffer)

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
        self._slides: list[GraphSlide] = []
        self._rows = 0
        self._buffer: _Buffer | None = None
        self._feats: np.ndarray | None = None   # the buffer's full-capacity view while copying

    def add(self, slide: GraphSlide) -> list[Pack]:
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

    def _copy_in(self, slide: GraphSlide, row: int) -> None:
        feats = slide.features
        if self._feats is None or feats is None:
            raise RuntimeError(f"slide {slide.slide_id}: copied twice or into no buffer")
        if feats.shape[1] != self._feats.shape[1]:
            raise ValueError(f"slide {slide.slide_id}: feature dim {feats.shape[1]} != pack dim {self._feats.shape[1]}")
        self._feats[row:row + slide.n] = feats
        slide.features = None   # release the slide's own copy now

    def _single(self, slide: GraphSlide) -> Pack:
        self.n_packs += 1
        feats = np.ascontiguousarray(slide.features, dtype=np.float32)
        nb = shift_neighbors(slide.neighbors, 0)
        slide.features = None
        return Pack([PackedEntry.of(slide, 0)], feats, nb, np.array([0, slide.n], dtype=np.int64))

    def _emit(self) -> Pack:
        if len(self._slides) == 1:
            pack = self._single(self._slides[0])
            self._reset()
            return pack
        self.n_packs += 1
        width = max(s.neighbors.shape[1] for s in self._slides)
        entries, nbs, offsets, row = [], [], [0], 0
        for s in self._slides:
            entries.append(PackedEntry.of(s, row))
            nbs.append(shift_neighbors(s.neighbors, row, width))
            row += s.n
            offsets.append(row)
        if self._feats is None:
            raise RuntimeError("a pack of several slides without its buffer")
        buffer = self._buffer
        pack = Pack(entries, self._feats[:row], np.concatenate(nbs, axis=0), np.asarray(offsets, dtype=np.int64),
                    on_release=None if buffer is None else (lambda: buffer.pool.give_back(buffer)))
        self._reset()
        return pack
