"""Whole-slide images behind the feature files, for heatmap backgrounds and patch crops (no PyTorch).

openslide is optional: :func:`open_slide_image` returns ``None`` when it is not installed (callers then draw the
patch grid alone and say so once, with :data:`OPENSLIDE_MISSING`). A slide's image is looked up by slide id in a
folder, with any extension openslide reads (``{slide_id}.svs``, ``.tif``, ...).
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from momkd.data.cohort import SLIDE_EXTENSIONS
from momkd.errors import MomkdError

IMAGE_EXTENSIONS = tuple(ext for ext in SLIDE_EXTENSIONS if ext != ".h5")   # whole-slide image files
OPENSLIDE_MISSING = ("openslide is not installed (pip install openslide-python openslide-bin): "
                     "drawing the patch grid without the slide image")


class SlideImageError(MomkdError):
    """A whole-slide image that openslide cannot open or read."""


@dataclass(frozen=True)
class Thumbnail:
    """An RGB thumbnail (h, w, 3) uint8 of a slide whose level 0 is ``width`` x ``height`` pixels."""

    image: np.ndarray
    width: int
    height: int


def openslide_module() -> ModuleType | None:
    """The ``openslide`` module, or ``None`` when it (or its C library) is not installed."""
    try:
        import openslide
    except (ImportError, OSError):   # OSError: the Python package is there but libopenslide is not
        return None
    return openslide


def find_slide_image(slides_dir: Path, slide_id: str) -> Path | None:
    """``slides_dir/{slide_id}{ext}`` for the first extension of :data:`IMAGE_EXTENSIONS` present (any case)."""
    by_name = {p.name.lower(): p for p in Path(slides_dir).glob(f"{glob.escape(slide_id)}.*") if p.is_file()}
    for ext in IMAGE_EXTENSIONS:
        found = by_name.get(f"{slide_id}{ext}".lower())
        if found is not None:
            return found
    return None


class SlideImage:
    """An open whole-slide image (a context manager): level-0 size, thumbnails and level-0 regions."""

    def __init__(self, openslide: ModuleType, path: Path) -> None:
        self.path = path
        try:
            self._slide: Any = openslide.OpenSlide(str(path))
        except Exception as e:  # noqa: BLE001 - openslide raises its own error types and OSError
            raise SlideImageError(f"{path}: openslide cannot open it ({' '.join(str(e).split())})") from None
        self.width, self.height = (int(v) for v in self._slide.dimensions)

    def __enter__(self) -> "SlideImage":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._slide.close()

    def thumbnail(self, max_side: int) -> Thumbnail:
        """The whole slide scaled to fit ``max_side`` x ``max_side`` pixels."""
        image = self._slide.get_thumbnail((max_side, max_side)).convert("RGB")
        return Thumbnail(np.asarray(image), self.width, self.height)

    def region(self, x: int, y: int, size: int, out_side: int) -> np.ndarray:
        """The level-0 square ``(x, y, size)`` as an RGB (out_side, out_side, 3) uint8 array, read from the
        coarsest level that still has ``out_side`` pixels across it."""
        level = int(self._slide.get_best_level_for_downsample(max(size / out_side, 1.0)))
        scale = float(self._slide.level_downsamples[level])
        side = max(1, int(round(size / scale)))
        image = self._slide.read_region((int(x), int(y)), level, (side, side)).convert("RGB")
        return np.asarray(image.resize((out_side, out_side)))


def open_slide_image(slides_dir: Path, slide_id: str) -> SlideImage | None:
    """The slide's image, or ``None`` when openslide is missing or the folder has no image for this slide.

    Raises ``SlideImageError`` when the image is there but openslide cannot open it.
    """
    openslide = openslide_module()
    if openslide is None:
        return None
    path = find_slide_image(slides_dir, slide_id)
    return None if path is None else SlideImage(openslide, path)
