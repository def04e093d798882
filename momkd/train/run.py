"""Cross-validated training run: splits, per-fold omics transform and training, the run folder."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

import momkd
from momkd.config import LossConfig, ModelConfig
from momkd.data.cohort import Cohort, SlideLabel, Split, case_level, load_splits, make_splits, save_splits
from momkd.data.omics import OmicsTable, OmicsTransform
from momkd.atomic import current_umask
from momkd.errors import RunFolderError
from momkd.losses import MoMKDLoss
from momkd.metrics import auc_text, best_threshold, case_and_slide_metrics, mean_std
from momkd.models import build_model
from momkd.tables import summary_markdown
from momkd.train.checkpoint import save_checkpoint
from momkd.train.config import TrainConfig
from momkd.train.data import SlideStore
from momkd.train.fit import FitResult, FoldTrainer, resolve_device
from momkd.train.predict import predict_slides
from momkd.train.resume import EpochState, load_epoch_state, save_epoch_state
from momkd.train.runfolder import (CONFIG, HISTORY, METRICS, OMICS_TRANSFORM, RESUME, SPLITS, SUMMARY, SUMMARY_MD,
                                   TEST_PREDICTIONS, fold_dir, read_run_json, write_json, write_rows, write_text)

# settings that cannot change a run's results: a resumed run may differ in them from the recorded one
RESULT_NEUTRAL = ("train.cache_gb",)


@dataclass
class TrainingData:
    """A validated cohort ready for training."""

    cohort: Cohort
    slide_paths: dict[str, Path]
    omics: OmicsTable | None
    feature_dim: int
    encoder: str | None
    sources: dict[str, str | None]  # cohort / features / omics paths, label column, positive value (for config.json)

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

    def transform(self) -> OmicsTransform:
        """The unfitted transform these options describe (validation checks the cohort with it; each fold fits
        its own)."""
        return OmicsTransform(log2=self.log2, n_genes=self.n_genes, genes=self.genes, raw=self.raw)


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
    overwrite: bool = False,
    resume: bool = False,
) -> dict[str, Any]:
    """Train every fold and write the run folder (layout in docs/ARCHITECTURE.md). Returns the summary.

    Each fold record (``summary["folds"][i]`` and ``fold_K/metrics.json``) holds ``binary_metrics`` (auc, acc,
    f1 = positive-class F1, f1_macro, threshold, n, n_pos) at the fold's threshold (max F1 per case on
    validation): ``val`` / ``test`` per case (mean slide probability per case), ``val_slide`` / ``test_slide``
    per slide (the unit of the authors' test.py and the paper's Table 1). ``mean`` / ``std`` summarise ``test``
    over folds, ``mean_slide`` / ``std_slide`` summarise ``test_slide`` (keys ``SUMMARY_KEYS``).

    Every fold saves its complete training state after each epoch (``momkd.train.resume``). ``resume`` continues
    the run recorded in ``out_dir`` (refused when its config, cohort or splits differ from these): finished folds
    are kept as they are, an interrupted fold continues after its last complete epoch, and the run folder ends up
    as the uninterrupted run would have written it (bit for bit on CPU).
    """
    console = console or Console(stderr=True)
    if resume and overwrite:
        raise RunFolderError("--resume continues the run in --out and --overwrite empties it: pass only one")
    if model_cfg.model == "momkd" and data.omics is None:
        raise RunFolderError("MoMKD needs paired omics for training: pass --omics (or use --model abmil)")
    config = _run_config(data, model_cfg, loss_cfg, train_cfg, omics_opts, preset)
    cases = list(data.cohort.cases)
    splits = (load_splits(splits_dir) if splits_dir
              else make_splits(cases, [data.cohort.labels[c] for c in cases], folds=train_cfg.folds,
                               seed=train_cfg.seed))
    resuming = resume and _resumable(out_dir)
    if resuming:
        remove_partial_files(out_dir)
        _check_resume(out_dir, config, splits, data.cohort.labels)
        if (out_dir / SUMMARY).is_file():
            console.print(f"{out_dir}: the run finished earlier; nothing left to train", highlight=False)
            return read_run_json(out_dir / SUMMARY)
    else:
        _claim_out(out_dir, overwrite)
        _start_run(out_dir, config, splits, data.cohort.labels)
    run = _FoldRun(data, out_dir, model_cfg, loss_cfg, train_cfg, omics_opts, preset, console,
                   SlideStore(data.slide_paths, k=model_cfg.k, direction=model_cfg.graph_direction,
                              expected_dim=data.feature_dim, cache_bytes=int(train_cfg.cache_gb * (1 << 30))),
                   resolve_device(train_cfg.device))
    fold_ids = list(only_folds) if only_folds is not None else list(range(len(splits)))
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("epoch {task.fields[epoch]}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False, disable=not console.is_terminal) as progress:
        fold_records = [run.train_fold(splits[fold], progress, resuming) for fold in fold_ids]
    return _finish_run(out_dir, model_cfg, preset, fold_records)


def _claim_out(out_dir: Path, overwrite: bool) -> None:
    """A fresh run needs an empty (or new) ``out_dir``: the folds of an earlier or killed run are never mixed into
    it. ``overwrite`` empties a momkd run folder first (never a folder that is not one)."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise RunFolderError(f"{out_dir}: exists and is not a folder; choose another --out")
    if not any(out_dir.iterdir()):
        return
    if not overwrite:
        if (out_dir / SUMMARY).exists():
            raise RunFolderError(f"{out_dir}: already holds a finished run; choose another --out or pass --overwrite")
        raise RunFolderError(f"{out_dir}: already holds files (an unfinished or other run?); pass --resume to "
                             "continue it, --overwrite to start again, or choose another --out")
    if not (out_dir / CONFIG).is_file():
        raise RunFolderError(f"{out_dir}: not empty and not a momkd run folder (no {CONFIG}); will not delete it")
    shutil.rmtree(out_dir)


def _resumable(out_dir: Path) -> bool:
    """Whether ``--resume`` has a recorded run to continue in ``out_dir`` (``False``: missing or empty, the run
    starts from the beginning); a non-empty folder without ``config.json`` is refused."""
    if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
        return False
    if not (out_dir / CONFIG).is_file():
        raise RunFolderError(f"{out_dir}: nothing to resume (no {CONFIG}: not a momkd run folder); "
                             "choose another --out")
    return True


def _run_config(data: TrainingData, model_cfg: ModelConfig, loss_cfg: LossConfig, train_cfg: TrainConfig,
                omics_opts: OmicsOptions, preset: str) -> dict[str, Any]:
    """``config.json``: the data sources and their fingerprints, every config and the omics options."""
    return {
        "momkd_version": momkd.__version__,
        "preset": preset,
        "data": data.sources,
        "fingerprint": data_fingerprint(data),
        "class_names": list(data.cohort.class_names),
        "feature_dim": data.feature_dim,
        "encoder": data.encoder,
        "model": model_cfg.to_dict(),
        "loss": loss_cfg.to_dict(),
        "train": train_cfg.to_dict(),
        "omics_transform": {"log2": omics_opts.log2, "n_genes": omics_opts.n_genes, "genes": omics_opts.genes,
                            "raw": omics_opts.raw},
    }


def data_fingerprint(data: TrainingData) -> dict[str, str | None]:
    """SHA-256 digests of what a run learns from: ``cohort`` (cases, labels, slides and the size of each slide's
    feature file) and ``omics`` (case ids, genes and values; ``None`` without omics)."""
    cohort = hashlib.sha256()
    for case in data.cohort.cases:
        slides = [[s, os.path.getsize(data.slide_paths[s])] for s in data.cohort.slides[case]]
        cohort.update(json.dumps([case, data.cohort.labels[case], slides]).encode())
    omics = None
    if data.omics is not None:
        digest = hashlib.sha256(json.dumps([data.omics.case_ids, data.omics.genes]).encode())
        digest.update(str(data.omics.values.dtype).encode())
        digest.update(data.omics.values.tobytes())
        omics = digest.hexdigest()
    return {"cohort": cohort.hexdigest(), "omics": omics}


def config_differences(recorded: Any, current: Any, prefix: str = "") -> list[str]:
    """``"key: recorded -> current"`` for every leaf that differs between two ``config.json`` dicts (dotted
    keys; ``RESULT_NEUTRAL`` keys ignored)."""
    if isinstance(recorded, dict) and isinstance(current, dict):
        out: list[str] = []
        for key in sorted(set(recorded) | set(current), key=str):
            name = f"{prefix}{key}"
            if name in RESULT_NEUTRAL:
                continue
            out += config_differences(recorded.get(key, "<absent>"), current.get(key, "<absent>"), name + ".")
        return out
    if recorded == current:
        return []
    return [f"{prefix.rstrip('.')}: {_short(recorded)} -> {_short(current)}"]


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:16] + "..." + text[-8:]


def _check_resume(out_dir: Path, config: dict[str, Any], splits: list[Split], labels: dict[str, int]) -> None:
    """Refuse (one line) to resume ``out_dir`` with other settings, data or splits than those it recorded."""
    recorded = read_run_json(out_dir / CONFIG)
    differences = config_differences(recorded, json.loads(json.dumps(config)))
    if (out_dir / SPLITS).is_dir():
        if [(s.fold, s.train, s.val, s.test) for s in load_splits(out_dir / SPLITS)] != \
                [(s.fold, s.train, s.val, s.test) for s in splits]:
            differences.append(f"splits differ from {out_dir / SPLITS}")
    if differences:
        raise RunFolderError(f"{out_dir / CONFIG}: cannot resume, the recorded run differs: {'; '.join(differences)} "
                             "(rerun with the original arguments, or start a new --out)")
    if not (out_dir / SPLITS).is_dir():
        _save_splits(out_dir, splits, labels)     # killed between config.json and splits/


def _start_run(out_dir: Path, config: dict[str, Any], splits: list[Split], labels: dict[str, int]) -> None:
    """Write ``config.json`` (first: it marks the folder as this run's), then ``splits/``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / CONFIG, config)
    _save_splits(out_dir, splits, labels)


def _save_splits(out_dir: Path, splits: list[Split], labels: dict[str, int]) -> None:
    """``splits/`` written whole or not at all: assembled in a temporary sibling folder, then renamed."""
    work = Path(tempfile.mkdtemp(prefix=f".{SPLITS}.", dir=out_dir))
    try:
        save_splits(splits, work, labels)
        os.chmod(work, 0o777 & ~current_umask())
        work.rename(out_dir / SPLITS)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def remove_partial_files(folder: Path) -> None:
    """Delete what a killed writer left in ``folder``: ``momkd.atomic`` temporaries (``.NAME.*.tmp``) and
    half-assembled ``.splits.*`` folders. Finished files are never touched."""
    if not folder.is_dir():
        return
    for path in folder.glob(".*.tmp"):
        if path.is_file():
            path.unlink(missing_ok=True)
    for path in folder.glob(f".{SPLITS}.*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def _finish_run(out_dir: Path, model_cfg: ModelConfig, preset: str, fold_records: list[dict[str, Any]]
                ) -> dict[str, Any]:
    """Mean ± std over folds; ``summary.md``, then ``summary.json`` (its presence marks the run finished)."""
    mean, std = mean_std([r["test"] for r in fold_records])
    mean_slide, std_slide = mean_std([r["test_slide"] for r in fold_records])
    summary = {"model": model_cfg.model, "preset": preset, "folds": fold_records, "mean": mean, "std": std,
               "mean_slide": mean_slide, "std_slide": std_slide}
    write_text(out_dir / SUMMARY_MD, summary_markdown(summary))
    write_json(out_dir / SUMMARY, summary)
    return summary


@dataclass
class _FoldRun:
    """What every fold of one run shares; ``train_fold`` trains one and writes its folder."""

    data: TrainingData
    out_dir: Path
    model_cfg: ModelConfig
    loss_cfg: LossConfig
    train_cfg: TrainConfig
    omics_opts: OmicsOptions
    preset: str
    console: Console
    store: SlideStore
    device: torch.device

    def omics_inputs(self, split: Split, fold_path: Path) -> tuple[dict[str, np.ndarray], int]:
        """The fold's omics transform (fitted on its training cases, saved) and the training cases' vectors."""
        if self.model_cfg.model != "momkd" or self.data.omics is None:
            return {}, 0
        transform = self.omics_opts.transform()
        transform.fit(self.data.omics, list(split.train))
        write_json(fold_path / OMICS_TRANSFORM, transform.to_dict())
        vectors = transform.transform(self.data.omics, list(split.train))
        return dict(zip(split.train, vectors)), int(vectors.shape[1])

    def train_fold(self, split: Split, progress: Progress, resuming: bool = False) -> dict[str, Any]:
        """Train fold ``split.fold``, choose its threshold on validation, write its folder; returns its record.

        ``resuming``: a fold whose ``metrics.json`` exists finished earlier and is kept as it is; otherwise the
        fold continues from its ``resume.safetensors`` (after its last complete epoch) when there is one.
        """
        fold, cfg = split.fold, self.train_cfg
        train_items = self.data.items(split.train)
        fold_path = fold_dir(self.out_dir, fold)
        if resuming:
            remove_partial_files(fold_path)
            if (fold_path / METRICS).is_file():
                (fold_path / RESUME).unlink(missing_ok=True)
                record = read_run_json(fold_path / METRICS)
                self.console.print(f"fold {fold}: finished earlier, kept as it is", highlight=False)
                return record
        fold_path.mkdir(exist_ok=True)
        state = load_epoch_state(fold_path / RESUME) if resuming else None
        omics_by_case, omics_dim = self.omics_inputs(split, fold_path)
        torch.manual_seed(cfg.seed * 1000 + fold)
        rng = np.random.default_rng([cfg.seed, fold])
        model = build_model(self.model_cfg, self.data.feature_dim, omics_dim)
        done = state.epoch if state is not None else 0
        task = progress.add_task(f"fold {fold}", total=cfg.epochs * len(train_items),
                                 completed=done * len(train_items), epoch=done)
        if state is not None:
            self.console.print(f"fold {fold}: resuming after epoch {state.epoch}", highlight=False)

        def step() -> None:
            progress.update(task, advance=1)

        def epoch_start(epoch: int) -> None:
            progress.update(task, epoch=epoch)

        def checkpoint(epoch_state: EpochState) -> None:
            save_epoch_state(fold_path / RESUME, epoch_state)

        trainer = FoldTrainer(model, MoMKDLoss(self.loss_cfg), self.store, omics_by_case, cfg, self.device,
                              on_step=step, on_epoch=epoch_start,
                              on_epoch_end=None if self.console.is_terminal else self.epoch_line(fold))
        fit = trainer.fit(train_items, self.data.items(split.val), rng, resume=state, on_checkpoint=checkpoint)
        progress.update(task, completed=cfg.epochs * len(train_items))
        record, test_probs = self.evaluate_fold(trainer.model, split, fit)
        self.write_fold(fold_path, fit, record, omics_dim, test_probs, split)
        (fold_path / RESUME).unlink(missing_ok=True)
        test = record["test"]
        self.console.print(
            f"fold {fold}: best epoch {fit.best_epoch}/{len(fit.history)}, "
            f"val AUC {auc_text(record['val']['auc'])}, test AUC {auc_text(test['auc'])} "
            f"ACC {test['acc']:.3f} F1 {test['f1']:.3f} ({test['n']} test cases)", highlight=False
        )
        return record

    def epoch_line(self, fold: int) -> Callable[[dict[str, float]], None]:
        """One plain line per epoch, for logs (a progress bar only draws on a terminal)."""
        start = time.perf_counter()

        def say(row: dict[str, float]) -> None:
            self.console.print(
                f"fold {fold} epoch {int(row['epoch'])}/{self.train_cfg.epochs}: train loss {row['loss_total']:.4f}, "
                f"train AUC {auc_text(row['train_auc'])}, val AUC {auc_text(row['val_auc'])} "
                f"({time.perf_counter() - start:.0f} s)", markup=False, highlight=False, soft_wrap=True)

        return say

    def evaluate_fold(self, model: torch.nn.Module, split: Split, fit: FitResult
                      ) -> tuple[dict[str, Any], np.ndarray]:
        """The fold record (threshold = max per-case F1 on validation; metrics per case and per slide) and the
        test slides' probabilities."""
        val_items, test_items = self.data.items(split.val), self.data.items(split.test)
        val_probs = predict_slides(model, self.store, [it.slide_id for it in val_items], self.device)
        test_probs = predict_slides(model, self.store, [it.slide_id for it in test_items], self.device)
        _, val_y, val_p = case_level(val_items, val_probs)
        threshold = best_threshold(val_y, val_p)
        val_case, val_slide = case_and_slide_metrics(val_items, val_probs, threshold)
        test_case, test_slide = case_and_slide_metrics(test_items, test_probs, threshold)
        record = {"fold": split.fold, "threshold": threshold, "best_epoch": fit.best_epoch,
                  "epochs_run": len(fit.history), "val": val_case, "test": test_case, "val_slide": val_slide,
                  "test_slide": test_slide}
        return record, test_probs

    def write_fold(self, fold_path: Path, fit: FitResult, record: dict[str, Any], omics_dim: int,
                   test_probs: np.ndarray, split: Split) -> None:
        """Checkpoint (best epoch), history.csv, test_predictions.csv and, last, metrics.json of one fold."""
        save_checkpoint(fold_path, fit.best_state, {
            "momkd_version": momkd.__version__,
            "fold": split.fold,
            "preset": self.preset,
            "model_config": self.model_cfg.to_dict(),
            "in_dim": self.data.feature_dim,
            "omics_dim": omics_dim,
            "class_names": list(self.data.cohort.class_names),
            "encoder": self.data.encoder,
            "threshold": record["threshold"],
        })
        write_rows(fold_path / HISTORY, fit.history)
        write_rows(fold_path / TEST_PREDICTIONS, [
            {"slide_id": it.slide_id, "case_id": it.case_id, "label": it.label, "probability": p}
            for it, p in zip(self.data.items(split.test), test_probs)
        ])
        write_json(fold_path / METRICS, record)   # last: its presence marks the fold finished
