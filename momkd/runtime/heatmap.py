"""Render one slide's attention (or patch score) as a heatmap PNG: numpy and matplotlib only.

The values are painted on the patch grid: each patch is one cell of a 2-D array placed by its level-0
coordinates (``cell = (coord - origin) // patch_size``) and drawn with one ``imshow`` call, so a slide takes a
fraction of a second whatever its patch count. Cells without a patch are transparent. With a slide
thumbnail the grid is laid over it in level-0 pixel units.

matplotlib is imported with this module: import it only when heatmaps are asked for (the ``plot`` extra).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from momkd.data.wsi import Thumbnail

MAX_GRID_SIDE = 2048       # cells per side of the painted grid; coarser cells (max of the values) beyond it
THUMBNAIL_SIDE = 1600      # pixels of the slide thumbnail behind the grid
COLORMAP = "inferno"


def patch_grid(coords: np.ndarray, values: np.ndarray, patch_size: int
               ) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """Paint ``values`` (N,) on the patch grid of ``coords`` (N, 2) level-0 top-left corners.

    Returns:
        grid (rows, cols) float64 with NaN where there is no patch (the larger value where patches share a
        cell), and its ``imshow`` extent (left, right, bottom, top) in level-0 pixels.
    """
    if patch_size < 1:
        raise ValueError(f"patch size must be >= 1, got {patch_size}")
    coords = np.asarray(coords, dtype=np.int64)
    origin = coords.min(axis=0)
    cell = int(patch_size)
    span = int(((coords - origin) // cell).max()) + 1
    cell *= max(1, math.ceil(span / MAX_GRID_SIDE))
    col, row = ((coords - origin) // cell).T
    grid = np.full((int(row.max()) + 1, int(col.max()) + 1), np.nan)
    np.fmax.at(grid, (row, col), np.asarray(values, dtype=np.float64))
    left, top = (float(v) for v in origin)
    return grid, (left, left + grid.shape[1] * cell, top + grid.shape[0] * cell, top)


def render_heatmap(path: Path, coords: np.ndarray, values: np.ndarray, *, patch_size: int, title: str,
                   value_label: str, thumbnail: Thumbnail | None = None, dpi: int = 110) -> Path:
    """Write the heatmap PNG of one slide to ``path`` (atomically: a temporary file, then a rename).

    Args:
        coords: (N, 2) level-0 top-left patch corners; values: (N,) finite values to paint.
        patch_size: level-0 patch side (TRIDENT ``patch_size_level0`` or :func:`infer_patch_size`).
        title: the figure title (slide id, probability, threshold, prediction); value_label: the colour bar's label.
        thumbnail: the slide image to draw under the grid (``None``: the grid alone).
    """
    grid, extent = patch_grid(coords, values, patch_size)
    fig = Figure(figsize=(7.5, 6.4), layout="constrained")
    ax = fig.add_subplot()
    if thumbnail is not None:
        ax.imshow(thumbnail.image, extent=(0, thumbnail.width, thumbnail.height, 0), interpolation="bilinear")
        painted = ax.imshow(np.ma.masked_invalid(grid), extent=extent, cmap=COLORMAP, alpha=0.55,
                            interpolation="nearest")
        ax.set_xlim(0, thumbnail.width)
        ax.set_ylim(thumbnail.height, 0)
    else:
        painted = ax.imshow(np.ma.masked_invalid(grid), extent=extent, cmap=COLORMAP, interpolation="nearest")
        ax.set_facecolor("#f2f2f2")
    ax.set_aspect("equal")
    ax.set_xlabel("x (level-0 pixels)", fontsize=8)
    ax.set_ylabel("y (level-0 pixels)", fontsize=8)
    ax.tick_params(labelsize=7)
    fig.colorbar(painted, ax=ax, shrink=0.8, label=value_label)
    ax.set_title(title, fontsize=10)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, dpi=dpi, format="png")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
