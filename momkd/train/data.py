"""Slides for training and evaluation: read once, neighbour table built once, kept in a bounded cache."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from momkd.data.slide import read_slide
from momkd.graph import neighbor_table


@dataclass(frozen=True)
class SlideGraph:
    """One slide ready for the model.

    Attributes:
        features: (N, D) float32 patch features.
        neighbors: (N, W) int64 neighbour table (-1 padded, self excluded).
        coords: (N, 2) int64 level-0 patch coordinates.
    """

    slide_id: str
    features: np.ndarray
    neighbors: np.ndarray
    coords: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.features.nbytes + self.neighbors.nbytes + self.coords.nbytes


class SlideStore:
    """Reads slides by id and caches them (least recently used first out) up to a byte budget.

    The neighbour table is built with the same function the runtime uses, so training and inference see
    the same graph.
    """

    def __init__(
        self,
        paths: dict[str, Path],
        k: int = 8,
        direction: str = "paper",
        expected_dim: int | None = None,
        cache_bytes: int = 4 << 30,
    ) -> None:
        self.paths = dict(paths)
        self.k = k
        self.direction = direction
        self.expected_dim = expected_dim
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[str, SlideGraph] = OrderedDict()
        self._cached_bytes = 0

    def get(self, slide_id: str) -> SlideGraph:
        graph = self._cache.get(slide_id)
        if graph is not None:
            self._cache.move_to_end(slide_id)
            return graph
        slide = read_slide(self.paths[slide_id], expected_dim=self.expected_dim)
        graph = SlideGraph(
            slide_id=slide_id,
            features=slide.features,
            neighbors=neighbor_table(slide.coords, k=self.k, direction=self.direction),
            coords=slide.coords,
        )
        if graph.nbytes <= self.cache_bytes:
            self._cache[slide_id] = graph
            self._cached_bytes += graph.nbytes
            while self._cached_bytes > self.cache_bytes:
                _, old = self._cache.popitem(last=False)
                self._cached_bytes -= old.nbytes
        return graph
