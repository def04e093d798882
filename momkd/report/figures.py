"""The report's figures (matplotlib, no pyplot state): ROC curves per fold, per-epoch loss curves, and the
memory dynamics of the paper's Fig. 3 (active-memory ratio and perplexity of each bank per epoch).

Each ``*_figure`` function writes one PNG and returns its path, or ``None`` when the run has nothing to draw (no
fold with the needed file or columns); the caller says so in the report.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from momkd.data.cohort import case_level
from momkd.metrics import roc_auc, roc_curve

from momkd.train.runfolder import RunRecord

DPI = 110
LOSS_TITLES = {  # history.csv loss_* column suffix -> panel title (the terms of eq. 9)
    "total": "total loss (eq. 9, weighted sum)",
    "ce": "classification (cross-entropy)",
    "mse": "omics reconstruction (MSE)",
    "align_wsi": "WSI alignment to the memory (eq. 5)",
    "align_omics": "omics alignment to the memory (eq. 5)",
    "mem": "memory loss (eq. 10)",
}
VALIDATION_OF = {"ce": "val_loss_ce"}  # loss term -> its history.csv validation column
BANKS = (("pos", "positive"), ("neg", "negative"))


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path


def roc_figure(run: RunRecord, path: Path) -> Path | None:
    """Case-level ROC of each fold's test split (mean slide probability per case, as the metrics use)."""
    curves = []
    for fold in run.folds:
        if fold.test is None:
            continue
        _, y, p = case_level(fold.test.items, fold.test.probabilities)
        if 0 < y.sum() < len(y):
            fpr, tpr, _ = roc_curve(y, p)
            curves.append((fold.fold, fpr, tpr, roc_auc(y, p)))
    if not curves:
        return None
    fig = Figure(figsize=(5.2, 5), layout="constrained")
    ax = fig.add_subplot()
    for k, fpr, tpr, auc in curves:
        ax.plot(fpr, tpr, lw=1.6, label=f"fold {k} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="false positive rate", ylabel="true positive rate",
           title=f"{run.name}: test ROC per fold (case level)")
    ax.set_aspect("equal")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def _histories(run: RunRecord) -> list[tuple[int, dict[str, np.ndarray]]]:
    return [(f.fold, f.history) for f in run.folds if f.history is not None and len(f.history["epoch"])]


def loss_curves(run: RunRecord) -> Figure | None:
    """The training curves: a panel per loss term the run recorded (``loss_*`` columns not all zero) and one of
    the AUC; a colour per fold, training solid, validation dashed (``val_loss_ce`` on the cross-entropy panel,
    ``val_auc`` on the AUC panel). ``None`` when no fold has a history."""
    histories = _histories(run)
    terms = [t for t in LOSS_TITLES
             if any(f"loss_{t}" in h and np.nanmax(np.abs(h[f"loss_{t}"]), initial=0.0) > 0 for _, h in histories)]
    if not terms:
        return None
    panels = [(f"loss_{t}", VALIDATION_OF.get(t), LOSS_TITLES[t], "loss") for t in terms]
    if any("train_auc" in h or "val_auc" in h for _, h in histories):
        panels.append(("train_auc", "val_auc", "AUC (training slides, validation cases)", "AUC"))
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4 * cols, 3 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (train_col, val_col, title, ylabel) in zip(axes, panels):
        for i, (k, h) in enumerate(histories):
            if train_col in h:
                ax.plot(h["epoch"], h[train_col], marker=".", lw=1.2, color=f"C{i}", label=f"fold {k} training")
            if val_col is not None and val_col in h:
                ax.plot(h["epoch"], h[val_col], marker=".", lw=1.2, ls="--", color=f"C{i}",
                        label=f"fold {k} validation")
        ax.set(title=title, xlabel="epoch", ylabel=ylabel)
        if val_col is not None:
            ax.legend(fontsize=7)
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    fig.suptitle(f"{run.name}: per epoch, training (solid; losses are the mean over the epoch's slides) and "
                 "validation (dashed)")
    return fig


def loss_figure(run: RunRecord, path: Path) -> Path | None:
    """:func:`loss_curves` as a PNG at ``path``."""
    fig = loss_curves(run)
    return None if fig is None else _save(fig, path)


def memory_figure(run: RunRecord, path: Path) -> Path | None:
    """Fig. 3: active-memory ratio (top) and perplexity (bottom) per epoch, a column per bank, a line per fold."""
    histories = [(k, h) for k, h in _histories(run) if all(f"{b}_active" in h for b, _ in BANKS)]
    if not histories:
        return None
    fig = Figure(figsize=(9, 6), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True)
    neg, pos = run.class_names
    for col, (prefix, bank) in enumerate(BANKS):
        label = pos if prefix == "pos" else neg
        for k, h in histories:
            axes[0, col].plot(h["epoch"], h[f"{prefix}_active"], marker=".", lw=1.2, label=f"fold {k}")
            axes[1, col].plot(h["epoch"], h[f"{prefix}_perplexity"], marker=".", lw=1.2, label=f"fold {k}")
        axes[0, col].set(title=f"{bank} bank ({label}): active-memory ratio", ylim=(-0.02, 1.05))
        axes[1, col].set(title=f"{bank} bank ({label}): perplexity", xlabel="epoch")
        if run.n_codes is not None:
            axes[1, col].axhline(run.n_codes, ls="--", c="grey", lw=0.8)
            axes[1, col].set_ylim(0, run.n_codes * 1.08)
    axes[0, 0].legend(fontsize=7)
    codes = f", {run.n_codes} codes per bank (dashed)" if run.n_codes is not None else ""
    fig.suptitle(f"{run.name}: memory dynamics during training{codes}")
    return _save(fig, path)
