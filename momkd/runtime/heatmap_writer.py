"""``momkd infer --heatmaps``: render each good slide's heatmap in a background thread while inference goes on.

``OUT_DIR/heatmaps/{slide_id}.png`` for every slide predicted ok, none for a failed slide (an older run's PNG
for it is removed), and ``OUT_DIR/heatmaps/heatmaps.csv`` with one row per slide of this run: ``ok``,
``kept`` (``--resume``: PNG of an earlier run) or ``error`` with the problem. A heatmap that cannot be drawn
is recorded there and the run goes on; the prediction of that slide stands. heatmaps.csv is written as
predictions.csv is (``results.csv_text``: fields with line breaks quoted, formula-leading cells marked).

The patch size comes from the feature file's TRIDENT ``patch_size_level0`` attribute when present, else from
the coordinate spacing. With ``--slides DIR`` the grid is laid over the slide's thumbnail when openslide is
installed and ``DIR`` holds the slide's image.
"""

from __future__ import annotations

import contextlib
import errno
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from momkd.errors import MomkdError

from .reader import one_line
from .results import atomic_write_text, csv_text

HEATMAP_DIR = "heatmaps"
INDEX = "heatmaps.csv"
INDEX_COLUMNS = ("slide_id", "status", "background", "error")
# --heatmap-value -> (pipeline output, colour bar label)
VALUES = {"attention": ("attention", "attention (softmax within the slide)"),
          "score": ("patch_score", "patch score (memory affinity, eq. 6)")}


class HeatmapError(MomkdError):
    """Heatmaps cannot be drawn at all (matplotlib missing, bad option): a usage error, before any slide."""


@dataclass(frozen=True)
class HeatmapOptions:
    """What to paint (``attention`` or ``score``) and where the whole-slide images are (optional)."""

    value: str = "attention"
    slides_dir: Path | None = None


@dataclass
class HeatmapReport:
    """What ``--heatmaps`` produced: PNGs written or kept, and the slides whose heatmap failed (with why)."""

    folder: Path
    n_ok: int = 0
    n_kept: int = 0
    failures: dict[str, str] = field(default_factory=dict)

    def line(self) -> str:
        failed = f" ({len(self.failures)} failed, see {self.folder / INDEX})" if self.failures else ""
        return f"{self.n_ok + self.n_kept} heatmaps{failed} -> {self.folder}"


def heatmap_path(out_dir: Path, slide_id: str) -> Path:
    return Path(out_dir) / HEATMAP_DIR / f"{slide_id}.png"


class HeatmapWriter:
    """Renders heatmaps one at a time on a background thread (``submit``), records the outcome per slide, and
    writes the index on ``close``. ``log`` gets one-line notes (called from the pipeline's threads)."""

    def __init__(self, out_dir: Path, options: HeatmapOptions, positive_class: str, threshold: float,
                 log: Callable[[str], None]) -> None:
        if options.value not in VALUES:
            raise HeatmapError(f"--heatmap-value must be one of {', '.join(VALUES)}, got {options.value!r}")
        if options.slides_dir is not None and not Path(options.slides_dir).is_dir():
            raise HeatmapError(f"{options.slides_dir}: --slides folder does not exist")
        try:
            from . import heatmap
        except ImportError as e:
            raise HeatmapError(f"--heatmaps needs matplotlib (pip install momkd[plot]): {e}") from None
        from momkd.data.wsi import OPENSLIDE_MISSING, openslide_module

        self._heatmap = heatmap
        self.out_dir = Path(out_dir)
        self.options = options
        self.positive_class = positive_class
        self.threshold = threshold
        self.log = log
        self.use_images = options.slides_dir is not None and openslide_module() is not None
        if options.slides_dir is not None and not self.use_images:
            log(f"note: {OPENSLIDE_MISSING}")
        self._rows: dict[str, tuple[str, str, str]] = {}   # slide id -> (status, background, error)
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="momkd-heatmap")

    @property
    def folder(self) -> Path:
        return self.out_dir / HEATMAP_DIR

    def start(self) -> None:
        """Create the heatmap folder (once the run is known to go ahead)."""
        self.folder.mkdir(parents=True, exist_ok=True)

    def keep(self, slide_id: str) -> None:
        """A slide whose ok row (and PNG) an earlier run left (``--resume``)."""
        with self._lock:
            self._rows[slide_id] = ("kept", "", "")

    def discard(self, slide_id: str) -> None:
        """A slide that failed: no heatmap, and none left from an earlier run (a name too long to exist is not
        there)."""
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
            try:
                heatmap_path(self.out_dir, slide_id).unlink()
            except OSError as e:
                if e.errno != errno.ENAMETOOLONG:
                    raise

    def submit(self, slide_id: str, source: Path, coords: np.ndarray, outputs: dict[str, np.ndarray],
               probability: float, prediction: str) -> None:
        """Queue one slide (the arrays are copied: the caller's buffers may be reused)."""
        values = np.array(outputs[VALUES[self.options.value][0]], dtype=np.float32)
        self._executor.submit(self._render, slide_id, source, np.array(coords), values, probability, prediction)

    def _render(self, slide_id: str, source: Path, coords: np.ndarray, values: np.ndarray, probability: float,
                prediction: str) -> None:
        from momkd.data.slide import level0_patch_size
        from momkd.data.wsi import SlideImageError, open_slide_image

        path = heatmap_path(self.out_dir, slide_id)
        try:
            patch_size = level0_patch_size(source, coords)
            thumbnail, background = None, "patch grid"
            slides_dir = self.options.slides_dir
            if self.use_images and slides_dir is not None:   # use_images implies a slides folder
                try:
                    image = open_slide_image(slides_dir, slide_id)
                except SlideImageError as e:
                    image, background = None, f"patch grid ({e})"
                    self.log(f"note: heatmap of {slide_id}: {e}; drawing the patch grid alone")
                if image is not None:
                    with image:
                        thumbnail = image.thumbnail(self._heatmap.THUMBNAIL_SIDE)
                    background = f"slide image {image.path.name}"
                elif background == "patch grid":
                    background = "patch grid (no slide image found)"
            title = (f"{slide_id}\nP({self.positive_class}) = {probability:.3f}, threshold {self.threshold:.3f}: "
                     f"{prediction}")
            self._heatmap.render_heatmap(path, coords, values, patch_size=patch_size, title=title,
                                         value_label=VALUES[self.options.value][1], thumbnail=thumbnail)
            row = ("ok", background, "")
        except Exception as e:  # noqa: BLE001 - one slide's heatmap never stops the run
            path.unlink(missing_ok=True)
            message = one_line(f"{type(e).__name__}: {e}", 300)
            self.log(f"heatmap failed: {slide_id}: {message}")
            row = ("error", "", message)
        with self._lock:
            self._rows[slide_id] = row

    def close(self, cancel: bool = False) -> HeatmapReport:
        """Wait for the queued heatmaps (or drop those not started, ``cancel``), write the index, report."""
        self._executor.shutdown(wait=True, cancel_futures=cancel)
        report = HeatmapReport(self.folder)
        records: list[tuple[str, ...]] = [INDEX_COLUMNS]
        with self._lock:
            for slide_id, (status, background, error) in sorted(self._rows.items()):
                records.append((slide_id, status, background, error))
                if status == "ok":
                    report.n_ok += 1
                elif status == "kept":
                    report.n_kept += 1
                else:
                    report.failures[slide_id] = error
        if self.folder.is_dir():
            atomic_write_text(self.folder / INDEX, csv_text(records))
        return report
