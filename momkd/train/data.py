"""Slides for training and evaluation: read once, neighbour table built once, kept in a bounded cache."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

from momkd.data.batch import GraphSlide, load_graph_slide


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
        self._cache: OrderedDict[str, GraphSlide] = OrderedDict()
        self._cached_bytes = 0

    def get(self, slide_id: str) -> GraphSlide:
        """The slide's unit (``momkd.data.batch.load_graph_slide``), read once while it stays cached."""
        graph = self._cache.get(slide_id)
        if graph is not None:
            self._cache.move_to_end(slide_id)
            return graph
        graph = load_graph_slide(self.paths[slide_id], self.k, self.direction, slide_id=slide_id,
                                 expected_dim=self.expected_dim)
        if graph.nbytes <= self.cache_bytes:
            self._cache[slide_id] = graph
            self._cached_bytes += graph.nbytes
            while self._cached_bytes > self.cache_bytes:
                _, old = self._cache.popitem(last=False)
                self._cached_bytes -= old.nbytes
        return graph
