"""What the served model does with a batch of requests, without Triton: check each slide, build its neighbour
table, pack the slides into ragged packs up to the row budget and run them on the runtime's backend.

The Triton Python model (:mod:`momkd.serve.triton_model`) is a thin adapter around :class:`SlideService`;
tests and benchmarks use the service directly too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from momkd.data.batch import GraphSlide, graph_slide
from momkd.data.slide import nonfinite_rows
from momkd.manifest import Manifest, load_manifest
from momkd.runtime.backends import Backend, select_backend
from momkd.runtime.packing import Packer
from momkd.runtime.pipeline import DEFAULT_BATCH_PATCHES, check_graph_library, run_pack
from momkd.runtime.reader import SlideFailure


def check_request(features: np.ndarray, coords: np.ndarray, feature_dim: int) -> str | None:
    """The problem with one slide's ``features`` (N, D) and ``coords`` (N, 2) for a model of ``feature_dim``, or
    None: shapes, D, N = 0, matching N, finite features (the checks ``read_slide`` makes on a file)."""
    if features.ndim != 2:
        return f"features must be (N, D), got shape {tuple(features.shape)}"
    if features.shape[1] != feature_dim:
        return f"features have D = {features.shape[1]}, the model expects D = {feature_dim}"
    n = int(features.shape[0])
    if n == 0:
        return "N = 0: the slide has no patches"
    if coords.ndim != 2 or coords.shape[1] != 2:
        return f"coords must be (N, 2), got shape {tuple(coords.shape)}"
    if coords.shape[0] != n:
        return f"coords have {coords.shape[0]} rows, features have {n}: N must match"
    bad = nonfinite_rows(features)
    if bad.size:
        return f"features contain NaN or Inf in {bad.size} of {n} rows (first at row {bad[0]})"
    return None


@dataclass
class SlideResult:
    """One slide's outputs: probability, predicted class index, attention (n,) and patch_score (n,)."""

    probability: float
    prediction: int
    attention: np.ndarray
    patch_score: np.ndarray


class SlideService:
    """The model folder ``model_dir`` (manifest and checksums verified, ``pinned_sha256`` enforced) on a runtime
    backend (``backend``/``device`` as ``momkd infer`` takes them); ``max_rows`` is the row budget of one pack."""

    def __init__(self, model_dir: str | Path, *, pinned_sha256: str | None = None,
                 max_rows: int = DEFAULT_BATCH_PATCHES, backend: str = "auto", device: str | None = None,
                 threads: int | None = None, log: Any = None) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        say = log or (lambda _m: None)
        self.manifest: Manifest = load_manifest(model_dir, verify_checksums=True, pinned_sha256=pinned_sha256)
        check_graph_library(self.manifest, say)
        self.backend: Backend = select_backend(backend, device, self.manifest, log=say, threads=threads)
        self.max_rows = min(max_rows, self.backend.max_rows) if self.backend.max_rows else max_rows

    def check(self, features: np.ndarray, coords: np.ndarray) -> str | None:
        """The problem with one request's ``features`` (N, D) and ``coords`` (N, 2), or None when it can run."""
        problem = check_request(features, coords, self.manifest.model.feature_dim)
        n, limit = int(features.shape[0]), self.backend.max_rows
        if problem is None and limit and n > limit:
            problem = f"slide has {n} patches, more than the {self.backend.name} engine's maximum of {limit}"
        return problem

    def slide(self, features: np.ndarray, coords: np.ndarray, index: int) -> GraphSlide:
        """A checked request as the model's unit (neighbour table built as ``momkd infer`` builds it)."""
        model = self.manifest.model
        return graph_slide(f"request_{index}", features, np.asarray(coords, dtype=np.int64), model.k,
                           model.graph_direction, keep_coords=False, index=index)

    def run(self, slides: Sequence[GraphSlide]) -> dict[int, SlideResult | str]:
        """Every slide (packed up to ``max_rows``, in order) -> its result or an error message, by slide index."""
        model = self.manifest.model
        packer = Packer(self.max_rows)
        packs = [p for s in slides for p in packer.add(s)]
        last = packer.finish()
        if last is not None:
            packs.append(last)
        out: dict[int, SlideResult | str] = {}
        for pack in packs:
            for entry, result in run_pack(self.backend, pack):
                if isinstance(result, SlideFailure):
                    out[entry.index] = result.message
                    continue
                p = float(result["probability"])
                out[entry.index] = SlideResult(p, int(p >= model.threshold),
                                               np.asarray(result["attention"], dtype=np.float32),
                                               np.asarray(result["patch_score"], dtype=np.float32))
            pack.release()
        return out

    def close(self) -> None:
        self.backend.close()
