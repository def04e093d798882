"""The slide unit every stage hands to the model, the ragged batch it is packed into, and the exported graph's
input/output contract. numpy only (no torch): training, export verification, the runtime and the benchmarks
all use this module.

A :class:`GraphSlide` is one slide ready for the model: its patch features and its neighbour table (built by
:func:`momkd.graph.neighbor_table`, the one graph function of training and inference). A :class:`Pack` is B
slides in the exported graph's layout::

    features       (N, D)  float32   the slides' rows, concatenated
    neighbors      (N, W)  int64     global row indices of each row's neighbours, -1 padded, no self
    slide_offsets  (B+1,)  int64     rows of slide b are slide_offsets[b]:slide_offsets[b+1]

and the graph returns ``probability (B,)``, ``logits (B, 2)``, ``attention (N,)`` and ``patch_score (N,)``
(:data:`OUTPUT_SHAPES`). :func:`pack_slides` is the one way to build a pack from whole slides; the runtime's
streaming packer (``momkd.runtime.packing.Packer``) builds the same packs into reused buffers.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from momkd.errors import SlideDuplicateCoordsError, SlideEncoderError
from momkd.graph import DuplicateCoordsError, neighbor_table

INPUT_NAMES = ("features", "neighbors", "slide_offsets")
OUTPUT_NAMES = ("probability", "logits", "attention", "patch_score")
INPUT_SHAPES: dict[str, list[str | int]] = {
    "features": ["N", "D"], "neighbors": ["N", "W"], "slide_offsets": ["B+1"]}
OUTPUT_SHAPES: dict[str, list[str | int]] = {
    "probability": ["B"], "logits": ["B", 2], "attention": ["N"], "patch_score": ["N"]}
PER_SLIDE_OUTPUTS = tuple(name for name, shape in OUTPUT_SHAPES.items() if shape[0] == "B")


@dataclass
class GraphSlide:
    """One slide ready for the model.

    Attributes:
        slide_id: the slide's id (its file stem).
        features: (n, D) float32, C-contiguous; ``None`` once a packer has copied it into a pack buffer.
        neighbors: (n, W) int64 local row indices, -1 padded, self excluded.
        n: number of patches.
        coords: (n, 2) level-0 patch coordinates, or None where the caller does not keep them.
        index: the slide's position in its run (the runtime's predictions.csv row).
        meta: passed through untouched (the runtime's SlideFile).
        note: what the slide is for (export verification: "test split fold 0", "edge case ...").
        read_s, graph_s: seconds spent reading + validating, and building the neighbour table.
    """

    slide_id: str
    features: np.ndarray | None
    neighbors: np.ndarray
    n: int
    coords: np.ndarray | None = None
    index: int = 0
    meta: Any = None
    note: str = ""
    read_s: float = 0.0
    graph_s: float = 0.0

    @property
    def nbytes(self) -> int:
        arrays = (self.features, self.neighbors, self.coords)
        return sum(a.nbytes for a in arrays if a is not None)


def graph_slide(slide_id: str, features: np.ndarray, coords: np.ndarray, k: int, direction: str, *,
                keep_coords: bool = True, **extra: Any) -> GraphSlide:
    """The unit of ``features`` (n, D) and ``coords`` (n, 2): float32 C-contiguous features and the neighbour
    table of ``coords`` (``k``, ``direction``); ``extra`` goes to :class:`GraphSlide` (index, meta, note)."""
    t0 = time.perf_counter()
    neighbors = neighbor_table(coords, k=k, direction=direction)
    features = np.ascontiguousarray(features, dtype=np.float32)
    return GraphSlide(slide_id, features, neighbors, int(features.shape[0]), coords if keep_coords else None,
                      graph_s=time.perf_counter() - t0, **extra)


def same_encoder(a: str, b: str) -> bool:
    """Do two encoder names name the same encoder? Compared case-insensitively, ignoring everything but letters
    and digits (``uni_v2``, ``UNI-v2`` and ``univ2`` match); aliases (``UNI2-h`` for ``uni_v2``) do not."""
    def key(name: str) -> str:
        return re.sub(r"[^0-9a-z]", "", name.lower())

    return key(a) == key(b)


def load_graph_slide(path: str | os.PathLike[str], k: int, direction: str, *, slide_id: str | None = None,
                     expected_dim: int | None = None, expected_encoder: str | None = None, keep_coords: bool = True,
                     on_read: Callable[[], None] | None = None, **extra: Any) -> GraphSlide:
    """``read_slide`` (every check of the slide contract; raises its ``SlideError``) then :func:`graph_slide`
    (repeated coordinates raise ``SlideDuplicateCoordsError``). With ``expected_encoder`` (the model's), a slide
    whose ``encoder`` attribute names another encoder (:func:`same_encoder`) raises ``SlideEncoderError``; a
    slide without the attribute (CLAM) is accepted. ``on_read()`` is called once the slide is read and checked,
    before the neighbour graph is built (the runtime's slide timeout names the stage)."""
    from momkd.data.slide import read_slide

    t0 = time.perf_counter()
    slide = read_slide(path, expected_dim=expected_dim)
    found = slide.attrs.encoder
    if expected_encoder and found and not same_encoder(found, expected_encoder):
        raise SlideEncoderError(Path(path), f"encoder {found!r} does not match the model's {expected_encoder!r} "
                                "(--allow-encoder-mismatch uses it anyway)")
    read_s = time.perf_counter() - t0
    if on_read is not None:
        on_read()
    try:
        unit = graph_slide(slide_id or slide.slide_id, slide.features, slide.coords, k, direction,
                           keep_coords=keep_coords, **extra)
    except DuplicateCoordsError as e:
        raise SlideDuplicateCoordsError(Path(path), str(e)) from None
    unit.read_s = read_s
    return unit


@dataclass
class PackedEntry:
    """Where one slide sits in a pack."""

    index: int
    slide_id: str
    n: int
    offset: int
    coords: np.ndarray | None = None
    meta: Any = None

    @classmethod
    def of(cls, slide: GraphSlide, offset: int) -> PackedEntry:
        return cls(slide.index, slide.slide_id, slide.n, offset, slide.coords, slide.meta)


@dataclass
class Pack:
    """B slides in the exported graph's input layout (see the module docstring)."""

    entries: list[PackedEntry]
    features: np.ndarray        # (N, D) float32, C-contiguous
    neighbors: np.ndarray       # (N, W) int64, global rows, -1 pad
    slide_offsets: np.ndarray   # (B+1,) int64
    on_release: Callable[[], None] | None = field(default=None, repr=False)   # gives a reused buffer back

    @property
    def rows(self) -> int:
        return int(self.slide_offsets[-1])

    @property
    def n_slides(self) -> int:
        return len(self.entries)

    def release(self) -> None:
        """Drop the arrays (and give a reused features buffer back) once the backend has run on this pack."""
        if self.on_release is not None:
            self.on_release()
            self.on_release = None
        self.features = self.neighbors = None  # type: ignore[assignment]

    def singles(self) -> list[Pack]:
        """One pack per slide (views of this pack's features; neighbours shifted back to local rows)."""
        out = []
        for e in self.entries:
            r0, r1 = e.offset, e.offset + e.n
            local = shift_neighbors(self.neighbors[r0:r1], -r0)
            out.append(Pack([PackedEntry(e.index, e.slide_id, e.n, 0, e.coords, e.meta)], self.features[r0:r1],
                            local, np.array([0, e.n], dtype=np.int64)))
        return out


def shift_neighbors(neighbors: np.ndarray, offset: int, width: int | None = None) -> np.ndarray:
    """(n, w) neighbour rows + ``offset`` (-1 kept), right-padded with -1 to ``width`` -> (n, width) int64."""
    n, w = neighbors.shape
    width = w if width is None else width
    if offset == 0 and width == w and neighbors.dtype == np.int64:
        return neighbors
    out = np.full((n, width), -1, dtype=np.int64)
    np.add(neighbors, offset, out=out[:, :w], where=neighbors >= 0)
    return out


def pack_slides(slides: Sequence[GraphSlide]) -> Pack:
    """All ``slides`` in one pack, whatever their total rows (the slides' own arrays are left untouched)."""
    if not slides:
        raise ValueError("cannot pack zero slides")
    offsets = np.concatenate([[0], np.cumsum([s.n for s in slides])]).astype(np.int64)
    width = max(1, max(int(s.neighbors.shape[1]) for s in slides))
    features = np.concatenate([np.asarray(s.features, dtype=np.float32) for s in slides], axis=0)
    neighbors = np.concatenate([shift_neighbors(np.asarray(s.neighbors, dtype=np.int64), int(start), width)
                                for s, start in zip(slides, offsets[:-1])], axis=0)
    entries = [PackedEntry.of(s, int(start)) for s, start in zip(slides, offsets[:-1])]
    return Pack(entries, np.ascontiguousarray(features), neighbors, offsets)


def split_outputs(pack: Pack, outputs: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Per-slide views of a pack's outputs: per-slide outputs indexed by b, per-row outputs sliced by offsets."""
    per_slide = []
    for b, e in enumerate(pack.entries):
        d: dict[str, Any] = {}
        for name, arr in outputs.items():
            if name in PER_SLIDE_OUTPUTS and arr.ndim >= 1 and arr.shape[0] == pack.n_slides:
                d[name] = arr[b]
            elif arr.ndim >= 1 and arr.shape[0] == pack.rows:
                d[name] = arr[e.offset:e.offset + e.n]
        per_slide.append(d)
    return per_slide


def check_output_shapes(outputs: dict[str, np.ndarray], pack: Pack, names: Sequence[str]) -> str | None:
    """The first contract violation of ``outputs`` for ``pack`` among ``names`` (None when all hold)."""
    sizes: dict[str | int, str | int] = {"B": pack.n_slides, "N": pack.rows}
    for name in names:
        arr = outputs.get(name)
        if arr is None:
            return f"the model returned no {name!r} output"
        shape = tuple(sizes.get(d, d) for d in OUTPUT_SHAPES[name])
        if tuple(arr.shape) != shape:
            return (f"the model's {name!r} output has shape {tuple(arr.shape)}, expected {shape} for "
                    f"{pack.n_slides} slides / {pack.rows} patches")
    return None
