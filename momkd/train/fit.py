"""Training of one fold: memory initialisation, epochs, validation, early stopping."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
from torch import nn

from momkd.data.cohort import SlideLabel, case_level
from momkd.metrics import roc_auc
from momkd.models.memory import MemoryUsage
from momkd.train.config import TrainConfig
from momkd.train.data import SlideStore
from momkd.train.predict import predict_slides, slide_tensors
from momkd.train.resume import EpochState, RandomState
from momkd.train.sampler import balanced_epoch
from momkd.train.stopping import make_stopping

if TYPE_CHECKING:
    from momkd.models.momkd import MoMKD

LOSS_TERMS = ("total", "ce", "mse", "align_wsi", "align_omics", "mem")


@dataclass
class FitResult:
    """What one fold's training produced."""

    best_state: dict[str, torch.Tensor]
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; otherwise the named device (checked)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but PyTorch sees no CUDA device")
    return device


class FoldTrainer:
    """Trains one model on one fold's training slides and selects the best epoch on validation AUC.

    Args:
        model: a ``MoMKD`` or ``ABMIL`` (same ``forward`` / ``forward_wsi`` contract).
        loss_fn: ``MoMKDLoss``; called as ``loss_fn(out, label, omics, memory)``.
        store: the slide cache.
        omics_by_case: transformed omics vector (G,) per case id (empty for ABMIL).
        cfg: optimisation settings.
        device: where to train.
        on_step: called after every optimisation step (progress bars).
        on_epoch: called with the epoch number when an epoch starts.
        on_epoch_end: called with the epoch's history row once it is validated (plain progress lines).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        store: SlideStore,
        omics_by_case: dict[str, np.ndarray],
        cfg: TrainConfig,
        device: torch.device,
        on_step: Callable[[], None] | None = None,
        on_epoch: Callable[[int], None] | None = None,
        on_epoch_end: Callable[[dict[str, float]], None] | None = None,
    ) -> None:
        self.model = model.to(device)
        self.loss_fn = loss_fn
        self.store = store
        self.omics_by_case = omics_by_case
        self.cfg = cfg
        self.device = device
        self.on_step = on_step
        self.on_epoch = on_epoch
        self.on_epoch_end = on_epoch_end
        self.memory = getattr(model, "memory", None)

    # ------------------------------------------------------------------ memory initialisation
    @torch.no_grad()
    def init_memory(self, items: Sequence[SlideLabel], rng: np.random.Generator) -> None:
        """Spherical k-means of untrained-encoder (eval mode) patch projections of each class's training slides.

        ``paper`` protocol: slides of the class in random order, an equal random quota of patches from each, up
        to ``kmeans_patches`` per class. ``official`` (the authors' ``bootstrap_codebooks``): whole slides in the
        order of one class-balanced sampler epoch until both classes hold at least ``kmeans_patches`` patches (or
        the epoch ends), every patch of every drawn slide kept (a slide drawn twice counts twice).
        """
        if self.memory is None:
            return
        self.model.eval()
        if self.cfg.protocol == "official":
            per_class = self._bootstrap_points(items, rng)
        else:
            per_class = [self._quota_points([it for it in items if it.label == label], rng) for label in (0, 1)]
        self.memory.init_kmeans(per_class[0], per_class[1], iters=self.cfg.kmeans_iters,
                                seed=int(rng.integers(2**31)), form=self.cfg.protocol)

    def _projections(self, slide_id: str) -> torch.Tensor:
        features, neighbors = slide_tensors(self.store.get(slide_id), self.device)
        return cast("MoMKD", self.model).patch_projections(features, neighbors)   # a memory means a MoMKD model

    def _quota_points(self, slides: Sequence[SlideLabel], rng: np.random.Generator) -> torch.Tensor:
        """Up to ``kmeans_patches`` projections: an equal random share from each slide, slides in random order."""
        quota = max(1, math.ceil(self.cfg.kmeans_patches / max(len(slides), 1)))
        chunks, total = [], 0
        for i in rng.permutation(len(slides)):
            proj = self._projections(slides[i].slide_id)
            take = torch.from_numpy(rng.permutation(proj.shape[0])[:quota]).to(self.device)
            chunks.append(proj[take])
            total += chunks[-1].shape[0]
            if total >= self.cfg.kmeans_patches:
                break
        return torch.cat(chunks)[: self.cfg.kmeans_patches]

    def _bootstrap_points(self, items: Sequence[SlideLabel], rng: np.random.Generator) -> list[torch.Tensor]:
        """[negative, positive] projections of whole slides from one balanced sampler epoch (authors' rule)."""
        chunks: list[list[torch.Tensor]] = [[], []]
        totals = [0, 0]
        for i in balanced_epoch(np.array([it.label for it in items]), rng):
            proj = self._projections(items[i].slide_id)
            chunks[items[i].label].append(proj)
            totals[items[i].label] += proj.shape[0]
            if min(totals) >= self.cfg.kmeans_patches:
                break
        for label in (0, 1):   # a class the epoch never drew: fall back to all of its slides
            if not chunks[label]:
                chunks[label] = [self._projections(it.slide_id) for it in items if it.label == label]
        return [torch.cat(c) for c in chunks]

    # ------------------------------------------------------------------ one epoch
    def train_epoch(self, items: Sequence[SlideLabel], optimizer: torch.optim.Optimizer,
                    rng: np.random.Generator) -> dict[str, float]:
        """One class-balanced pass, one slide per step. Returns mean loss terms, train AUC, memory usage."""
        self.model.train()
        sums = dict.fromkeys(LOSS_TERMS, 0.0)
        usage = MemoryUsage(self.memory.n_codes) if self.memory is not None else None
        labels, probs = [], []
        order = balanced_epoch(np.array([it.label for it in items]), rng)
        for i in order:
            item = items[i]
            features, neighbors = slide_tensors(self.store.get(item.slide_id), self.device)
            label = torch.tensor([item.label], device=self.device)
            omics = self._omics(item.case_id)
            out = self.model(features, neighbors, omics, label)
            losses = self.loss_fn(out, label, omics, self.memory)
            optimizer.zero_grad(set_to_none=True)
            losses["total"].backward()
            if self.cfg.grad_clip:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            optimizer.step()
            with torch.no_grad():
                if self.memory is not None:
                    if self.memory.update == "ema":
                        self.memory.ema_update(out.patch_proj.detach(), item.label)
                    if usage is not None:   # always, with a memory
                        usage.update(out.patch_proj.detach(), item.label, self.memory)
                probs.append(torch.softmax(out.logits.detach(), dim=-1)[0, 1].item())
            labels.append(item.label)
            for key in LOSS_TERMS:
                sums[key] += float(losses[key].detach())
            if self.on_step is not None:
                self.on_step()
        row = {f"loss_{k}": v / len(order) for k, v in sums.items()}
        row["train_auc"] = roc_auc(np.array(labels), np.array(probs))
        if usage is not None:
            row.update(usage.summary())
        return row

    def _omics(self, case_id: str) -> torch.Tensor | None:
        vector = self.omics_by_case.get(case_id)
        if vector is None:
            return None
        return torch.from_numpy(vector).to(self.device).unsqueeze(0)

    # ------------------------------------------------------------------ validation
    def validate(self, items: Sequence[SlideLabel]) -> tuple[float, float]:
        """Validation AUC (per case; per slide under the ``official`` protocol, as the authors) and mean slide
        cross-entropy (the ``paper`` tie-breaker)."""
        probs = predict_slides(self.model, self.store, [it.slide_id for it in items], self.device)
        p = np.clip(probs, 1e-7, 1 - 1e-7)
        y = np.array([it.label for it in items])
        ce = float(np.mean(-(y * np.log(p) + (1 - y) * np.log(1 - p))))
        if self.cfg.protocol == "official":
            return roc_auc(y, probs), ce
        _, case_y, case_p = case_level(items, probs)
        return roc_auc(case_y, case_p), ce

    # ------------------------------------------------------------------ the whole fit
    def fit(self, train: Sequence[SlideLabel], val: Sequence[SlideLabel], rng: np.random.Generator,
            resume: EpochState | None = None, on_checkpoint: Callable[[EpochState], None] | None = None
            ) -> FitResult:
        """Initialise the memory, train with early stopping on validation AUC, keep the selected weights.

        ``on_checkpoint`` receives the complete state after every epoch (``momkd.train.resume``); ``resume``, a
        state it received, continues from there (no memory initialisation, every generator restored), so the
        epochs after it are those the uninterrupted fit would run.
        """
        if resume is None:
            self.init_memory(train, rng)
        optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad], lr=self.cfg.lr, weight_decay=self.cfg.weight_decay
        )
        scheduler = (
            torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.2, patience=5)
            if self.cfg.lr_plateau else None
        )
        stopping = make_stopping(self.cfg.protocol, self.cfg.patience, self.cfg.min_epochs)
        result = FitResult(best_state={}, best_epoch=0)
        first, stopped = 1, False
        if resume is not None:
            self.model.load_state_dict(resume.model)
            optimizer.load_state_dict(resume.optimizer)
            if scheduler is not None and resume.scheduler is not None:
                scheduler.load_state_dict(resume.scheduler)
            stopping.load_state_dict(resume.stopping)
            resume.random.restore(rng, self.device)
            result = FitResult(best_state=resume.best_state, best_epoch=resume.best_epoch,
                               history=list(resume.history))
            first, stopped = resume.epoch + 1, resume.stopped
        for epoch in range(first, self.cfg.epochs + 1):
            if stopped:
                break
            if self.on_epoch is not None:
                self.on_epoch(epoch)
            row = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"]}
            row.update(self.train_epoch(train, optimizer, rng))
            val_auc, val_ce = self.validate(val)
            row.update(val_auc=val_auc, val_loss_ce=val_ce)
            result.history.append(row)
            if self.on_epoch_end is not None:
                self.on_epoch_end(row)
            decision = stopping.update(epoch, val_auc, val_ce)
            if decision.keep:
                result.best_epoch = epoch
                result.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            if scheduler is not None:
                undefined = 0.5 if self.cfg.protocol == "official" else -val_ce
                scheduler.step(val_auc if not math.isnan(val_auc) else undefined)
            stopped = decision.stop
            if on_checkpoint is not None:
                on_checkpoint(EpochState(
                    epoch=epoch, stopped=stopped, model=self.model.state_dict(), optimizer=optimizer.state_dict(),
                    scheduler=scheduler.state_dict() if scheduler is not None else None,
                    stopping=stopping.state_dict(), best_state=result.best_state, best_epoch=result.best_epoch,
                    history=result.history, random=RandomState.capture(rng, self.device)))
        self.model.load_state_dict(result.best_state)
        return result
