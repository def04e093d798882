"""What each memory code responds to (the data of the paper's Fig. 4): for every fold, bank and code, the
``k`` test patches whose projection is most similar to the code, over all the fold's test slides.

The fold's own checkpoint is loaded and run (histology only) with the model's modules: the patch projections
F_P-wsi come from ``forward_wsi`` and the codes from ``memory.normalized()``, so the similarity is exactly the
cosine the attention head uses (eq. 6). Needs PyTorch (the ``train`` extra) and the run's slide features.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import torch

from momkd.errors import SlideError
from momkd.train.checkpoint import load_checkpoint
from momkd.train.data import SlideStore
from momkd.train.fit import resolve_device
from momkd.train.predict import slide_tensors

from momkd.train.runfolder import FoldRecord, HeldOutPredictions, RunRecord

if TYPE_CHECKING:
    from momkd.models.momkd import MoMKD


@dataclass(frozen=True)
class CodeHit:
    """One of a code's top patches: where it is and how similar its projection is to the code (cosine)."""

    fold: int
    bank: str          # "positive" | "negative"
    code: int
    rank: int          # 1 = most similar
    slide_id: str
    label: int         # the slide's case label
    x: int             # level-0 top-left corner
    y: int
    similarity: float


@dataclass
class CodeScan:
    hits: list[CodeHit]
    notes: list[str]   # one line per fold or slide that could not be used


def features_folder(run: RunRecord) -> Path | None:
    """The slide features folder the run was trained on (``config.json``), if it still exists."""
    folder = (run.config.get("data") or {}).get("features")
    return Path(folder) if folder and Path(folder).is_dir() else None


@torch.no_grad()
def _scan_fold(fold: FoldRecord, test: HeldOutPredictions, features_dir: Path, top_k: int, device: torch.device,
               notes: list[str]) -> list[CodeHit]:
    module, meta = load_checkpoint(fold.path, device)
    model = cast("MoMKD", module)   # a run with memory codes is a MoMKD run
    codes_neg, codes_pos = model.memory.normalized()
    cfg = meta["model_config"]
    items = test.items
    paths = {it.slide_id: features_dir / f"{it.slide_id}.h5" for it in items}
    store = SlideStore(paths, k=cfg["k"], direction=cfg["graph_direction"], expected_dim=meta["in_dim"], cache_bytes=0)
    banks = {"positive": codes_pos, "negative": codes_neg}
    values: dict[str, list[torch.Tensor]] = {b: [] for b in banks}   # per slide (k_s, n) similarities
    where: dict[str, list[np.ndarray]] = {b: [] for b in banks}      # per slide (k_s, n, 3): item, x, y
    for i, item in enumerate(items):
        try:
            graph = store.get(item.slide_id)
        except SlideError as e:
            notes.append(f"fold {fold.fold}: {e}; slide left out")
            continue
        features, neighbors = slide_tensors(graph, device)
        offsets = torch.tensor([0, features.shape[0]], device=device)
        proj = model.forward_wsi(features, neighbors, offsets).patch_proj
        assert proj is not None and graph.coords is not None   # MoMKD projects patches; the store keeps coords
        for bank, codes in banks.items():
            top, top_rows = (proj @ codes.t()).topk(min(top_k, proj.shape[0]), dim=0)   # (k_s, n) each
            rows = top_rows.cpu().numpy()
            xy = graph.coords[rows]                                               # (k_s, n, 2)
            values[bank].append(top.cpu())
            where[bank].append(np.concatenate([np.full(rows.shape + (1,), i), xy], axis=-1))
    hits = []
    for bank in banks:
        if not values[bank]:
            continue
        sims, loc = torch.cat(values[bank]), np.concatenate(where[bank])        # (M, n), (M, n, 3)
        best, order = sims.topk(min(top_k, sims.shape[0]), dim=0)               # (k, n)
        for code in range(sims.shape[1]):
            for rank in range(best.shape[0]):
                i, x, y = (int(v) for v in loc[order[rank, code], code])
                hits.append(CodeHit(fold.fold, bank, code, rank + 1, items[i].slide_id, items[i].label, x, y,
                                    float(best[rank, code])))
    return hits


def top_patches(run: RunRecord, top_k: int, device: str = "auto",
                log: Callable[[str], None] = lambda _m: None) -> CodeScan:
    """The top-``top_k`` test patches of every memory code of every fold (folds without test predictions,
    and slides that cannot be read, are noted and left out)."""
    notes: list[str] = []
    features_dir = features_folder(run)
    if features_dir is None:
        where = (run.config.get("data") or {}).get("features")
        return CodeScan([], [f"the run's slide features ({where}) are not available: no memory-code patches"])
    torch_device = resolve_device(device)
    hits: list[CodeHit] = []
    for fold in run.folds:
        if fold.test is None:
            notes.append(f"fold {fold.fold}: no test_predictions.csv; left out")
            continue
        log(f"memory codes: fold {fold.fold} ({len(fold.test.items)} test slides)")
        hits += _scan_fold(fold, fold.test, features_dir, top_k, torch_device, notes)
    return CodeScan(hits, notes)


def hits_csv(hits: list[CodeHit]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([f.name for f in fields(CodeHit)])
    writer.writerows(astuple(h) for h in hits)
    return buf.getvalue()
