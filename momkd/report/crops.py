"""Image crops of the memory codes' top patches (the pictures of the paper's Fig. 4): one montage per fold and
bank, a row per code and a column per rank, cut from the whole-slide images with openslide."""

from __future__ import annotations

from collections.abc import Callable
from itertools import groupby
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from momkd.data.slide import level0_patch_size
from momkd.errors import SlideError
from momkd.data.wsi import SlideImage, SlideImageError, open_slide_image, openslide_module

from .memory_codes import CodeHit

CROP_SIDE = 96   # pixels of one crop in the montage


def _patch_size(features_dir: Path, slide_id: str) -> int:
    """The slide's level-0 patch side: TRIDENT's attribute, else the coordinate spacing."""
    return level0_patch_size(features_dir / f"{slide_id}.h5")


class _Crops:
    """Crops cut from each slide's image, opening every image once (``None`` where a slide has no image)."""

    def __init__(self, slides_dir: Path, features_dir: Path, notes: list[str]) -> None:
        self.slides_dir, self.features_dir, self.notes = slides_dir, features_dir, notes
        self.images: dict[str, tuple[SlideImage, int] | None] = {}

    def crop(self, hit: CodeHit) -> np.ndarray | None:
        if hit.slide_id not in self.images:
            try:
                image = open_slide_image(self.slides_dir, hit.slide_id)
                self.images[hit.slide_id] = (image, _patch_size(self.features_dir, hit.slide_id)) if image else None
                if image is None:
                    self.notes.append(f"{hit.slide_id}: no whole-slide image in {self.slides_dir}; crops left blank")
            except (SlideImageError, SlideError) as e:
                self.images[hit.slide_id] = None
                self.notes.append(f"{e}; crops left blank")
        entry = self.images[hit.slide_id]
        return None if entry is None else entry[0].region(hit.x, hit.y, entry[1], CROP_SIDE)

    def close(self) -> None:
        for entry in self.images.values():
            if entry is not None:
                entry[0].close()


def crop_montages(hits: list[CodeHit], slides_dir: Path, features_dir: Path, out_dir: Path,
                  class_names: tuple[str, str], log: Callable[[str], None]) -> tuple[list[tuple[str, Path]], list[str]]:
    """Write ``out_dir/codes_fold{K}_{bank}.png`` per fold and bank that has at least one crop; returns
    ((caption, path) list, notes). Without openslide nothing is drawn and the note says so."""
    if openslide_module() is None:
        return [], ["openslide is not installed (pip install openslide-python openslide-bin): no patch crops"]
    notes: list[str] = []
    crops = _Crops(slides_dir, features_dir, notes)
    written = []
    try:
        key = lambda h: (h.fold, h.bank)  # noqa: E731
        for (fold, bank), fold_bank in groupby(sorted(hits, key=key), key=key):
            group = sorted(fold_bank, key=lambda h: (h.code, h.rank))
            n_codes, k = max(h.code for h in group) + 1, max(h.rank for h in group)
            log(f"crops: fold {fold}, {bank} bank")
            fig = Figure(figsize=(max(4.8, 1.25 * k + 0.6), 1.35 * n_codes + 0.5), layout="constrained")
            axes = fig.subplots(n_codes, k, squeeze=False)
            for ax in axes.ravel():
                ax.set_axis_off()
            drawn = 0
            for hit in group:
                ax = axes[hit.code, hit.rank - 1]
                image = crops.crop(hit)
                if image is not None:
                    ax.imshow(image)
                    drawn += 1
                ax.set_title(f"{hit.slide_id}\n{hit.similarity:.3f}", fontsize=6)
                if hit.rank == 1:
                    ax.text(-0.08, 0.5, f"code {hit.code}", transform=ax.transAxes, rotation=90, fontsize=7,
                            ha="right", va="center")
            if not drawn:   # no slide image for any of these patches (noted): no empty montage
                continue
            label = class_names[1] if bank == "positive" else class_names[0]
            fig.suptitle(f"fold {fold}: {bank} bank ({label}), top {k} test patches per code", fontsize=9)
            path = out_dir / f"codes_fold{fold}_{bank}.png"
            fig.savefig(path, dpi=110, format="png")
            written.append((f"Fold {fold}, {bank} bank ({label}): top {k} test patches of each code, with their "
                            "cosine similarity", path))
    finally:
        crops.close()
    return written, notes
