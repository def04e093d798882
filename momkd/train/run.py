"""Cross-validated training run: splits, per-fold omics transform and training, the run folder."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

import momkd
from momkd.config import LossConfig, ModelConfig
from momkd.data.cohort import Cohort, SlideLabel, case_level, load_splits, make_splits, save_splits
from momkd.data.omics import OmicsTable, OmicsTransform
from momkd.errors import RunFolderError
from momkd.losses import MoMKDLoss
from momkd.metrics import best_threshold, case_and_slide_metrics, mean_std
from momkd.models import build_model
from momkd.tables import summary_markdown
from momkd.train.checkpoint import save_checkpoint
from momkd.train.config import TrainConfig
from momkd.train.data import SlideStore
from momkd.train.fit import FoldTrainer, resolve_device
from momkd.train.predict import predict_slides
from momkd.train.runfolder import (CONFIG, HISTORY, METRICS, SPLITS, SUMMARY, SUMMARY_MD, TEST_PREDICTIONS, fold_dir,
                                   write_json, write_rows, write_text)


@dataclass
class TrainingData:
    """A validated cohort ready for training."""

    cohort: Cohort
    slide_paths: dict[str, Path]
    omics: OmicsTable | None
    feature_dim: int
    encoder: str | None
    sources: dict[str, str]  # cohort / features / omics paths, label column, positive value (for config.json)

    def items(self, cases: Sequence[str]) -> list[SlideLabel]:
        """Every slide of ``cases`` with its case's label."""
        return [
            SlideLabel(slide_id, case, self.cohort.labels[case])
            for case in cases
            for slide_id in self.cohort.slides[case]
        ]


@dataclass
class OmicsOptions:
    """How raw omics become model input (fitted on each fold's training cases only)."""

    log2: bool = True
    n_genes: int = 768
    genes: list[str] | None = None
    raw: bool = False  # feed the stored vector as is (the authors' code): no log2, selection or z-score


def train_run(
    data: TrainingData,
    out_dir: Path,
    model_cfg: ModelConfig,
    loss_cfg: LossConfig,
    train_cfg: TrainConfig,
    omics_opts: OmicsOptions,
    preset: str,
    splits_dir: Path | None = None,
    only_folds: Sequence[int] | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Train every fold and write the run folder (layout in docs/ARCHITECTURE.md). Returns the summary.

    Each fold record (``summary["folds"][i]`` and ``fold_K/metrics.json``) holds ``binary_metrics`` (auc, acc,
    f1 = positive-class F1, f1_macro, threshold, n, n_pos) at the fold's threshold (max F1 per case on
    validation): ``val`` / ``test`` per case (mean slide probability per case), ``val_slide`` / ``test_slide``
    per slide (the unit of the authors' test.py and the paper's Table 1). ``mean`` / ``std`` summarise ``test``
    over folds, ``mean_slide`` / ``std_slide`` summarise ``test_slide`` (keys ``SUMMARY_KEYS``).
    """
    console = console or Console(stderr=True)
    if (out_dir / SUMMARY).exists():
        raise RunFolderError(f"{out_dir}: already holds a finished run; choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    uses_omics = model_cfg.model == "momkd"
    if uses_omics and data.omics is None:
        raise RunFolderError("MoMKD needs paired omics for training: pass --omics (or use --model abmil)")

    cases = list(data.cohort.cases)
    labels = [data.cohort.labels[c] for c in cases]
    splits = load_splits(splits_dir) if splits_dir else make_splits(cases, labels, folds=train_cfg.folds, seed=train_cfg.seed)
    save_splits(splits, out_dir / SPLITS, data.cohort.labels)
    write_json(out_dir / CONFIG, {
        "momkd_version": momkd.__version__,
        "preset": preset,
        "data": data.sources,
        "class_names": list(data.cohort.class_names),
        "feature_dim": data.feature_dim,
        "encoder": data.encoder,
        "model": model_cfg.to_dict(),
        "loss": loss_cfg.to_dict(),
        "train": train_cfg.to_dict(),
        "omics_transform": {"log2": omics_opts.log2, "n_genes": omics_opts.n_genes, "genes": omics_opts.genes,
                            "raw": omics_opts.raw},
    })

    device = resolve_device(train_cfg.device)
    store = SlideStore(data.slide_paths, k=model_cfg.k, direction=model_cfg.graph_direction,
                       expected_dim=data.feature_dim, cache_bytes=int(train_cfg.cache_gb * (1 << 30)))
    fold_ids = list(only_folds) if only_folds is not None else list(range(len(splits)))
    fold_records = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("epoch {task.fields[epoch]}"),
                  TimeElapsedColumn(), console=console, transient=False, disable=not console.is_terminal) as progress:
        for fold in fold_ids:
            split = splits[fold]
            train_items, val_items, test_items = data.items(split.train), data.items(split.val), data.items(split.test)
            fold_path = fold_dir(out_dir, fold)
            fold_path.mkdir(exist_ok=True)
            omics_by_case: dict[str, np.ndarray] = {}
            omics_dim = 0
            if uses_omics:
                transform = OmicsTransform(log2=omics_opts.log2, n_genes=omics_opts.n_genes, genes=omics_opts.genes,
                                           raw=omics_opts.raw)
                transform.fit(data.omics, list(split.train))
                transform.save(fold_path / "omics_transform.json")
                vectors = transform.transform(data.omics, list(split.train))
                omics_by_case = dict(zip(split.train, vectors))
                omics_dim = vectors.shape[1]

            torch.manual_seed(train_cfg.seed * 1000 + fold)
            rng = np.random.default_rng([train_cfg.seed, fold])
            model = build_model(model_cfg, data.feature_dim, omics_dim)
            task = progress.add_task(f"fold {fold}", total=train_cfg.epochs * len(train_items), epoch=0)
            trainer = FoldTrainer(model, MoMKDLoss(loss_cfg), store, omics_by_case, train_cfg, device,
                                  on_step=lambda t=task: progress.update(t, advance=1),
                                  on_epoch=lambda e, t=task: progress.update(t, epoch=e))
            fit = trainer.fit(train_items, val_items, rng)
            progress.update(task, completed=train_cfg.epochs * len(train_items))

            val_probs = predict_slides(trainer.model, store, [it.slide_id for it in val_items], device)
            test_probs = predict_slides(trainer.model, store, [it.slide_id for it in test_items], device)
            _, val_y, val_p = case_level(val_items, val_probs)
            threshold = best_threshold(val_y, val_p)
            val_case, val_slide = case_and_slide_metrics(val_items, val_probs, threshold)
            test_case, test_slide = case_and_slide_metrics(test_items, test_probs, threshold)
            record = {
                "fold": fold,
                "threshold": threshold,
                "best_epoch": fit.best_epoch,
                "epochs_run": len(fit.history),
                "val": val_case,
                "test": test_case,
                "val_slide": val_slide,
                "test_slide": test_slide,
            }
            fold_records.append(record)
            save_checkpoint(fold_path, fit.best_state, {
                "momkd_version": momkd.__version__,
                "fold": fold,
                "preset": preset,
                "model_config": model_cfg.to_dict(),
                "in_dim": data.feature_dim,
                "omics_dim": omics_dim,
                "class_names": list(data.cohort.class_names),
                "encoder": data.encoder,
                "threshold": threshold,
            })
            write_json(fold_path / METRICS, record)
            write_rows(fold_path / HISTORY, fit.history)
            write_rows(fold_path / TEST_PREDICTIONS, [
                {"slide_id": it.slide_id, "case_id": it.case_id, "label": it.label, "probability": p}
                for it, p in zip(test_items, test_probs)
            ])
            console.print(
                f"fold {fold}: best epoch {fit.best_epoch}/{len(fit.history)}, "
                f"val AUC {record['val']['auc']:.3f}, test AUC {record['test']['auc']:.3f} "
                f"ACC {record['test']['acc']:.3f} F1 {record['test']['f1']:.3f} ({test_case['n']} test cases)"
            )

    mean, std = mean_std([r["test"] for r in fold_records])
    mean_slide, std_slide = mean_std([r["test_slide"] for r in fold_records])
    summary = {"model": model_cfg.model, "preset": preset, "folds": fold_records, "mean": mean, "std": std,
               "mean_slide": mean_slide, "std_slide": std_slide}
    write_text(out_dir / SUMMARY_MD, summary_markdown(summary))
    write_json(out_dir / SUMMARY, summary)   # last: its presence marks the run finished
    return summary
