"""From command-line choices to configs and a validated cohort: the shared front half of train/evaluate/demo."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from rich.console import Console

from momkd.config import LossConfig, ModelConfig, preset as preset_configs
from momkd.data.validate import validate_cohort
from momkd.errors import MomkdError
from momkd.train.config import TrainConfig
from momkd.train.run import OmicsOptions, TrainingData


class DataRefusedError(MomkdError):
    """The cohort has problems; they were all printed and nothing was trained."""


def build_configs(
    preset: str,
    *,
    model: str = "momkd",
    epochs: int | None = None,
    folds: int = 5,
    seed: int = 0,
    device: str = "auto",
    memory_size: int | None = None,
    memory_update: str | None = None,
    ema_momentum: float | None = None,
    alpha_omics: float | None = None,
    alpha_wsi: float | None = None,
    no_recon: bool = False,
    gat_impl: str | None = None,
    patience: int | None = None,
    lr: float | None = None,
) -> tuple[ModelConfig, LossConfig, TrainConfig]:
    """The preset's configs with the user's overrides applied (``None`` keeps the preset's value)."""
    model_cfg, loss_cfg = preset_configs(preset)
    model_over: dict[str, Any] = {"model": model, "n_codes": memory_size, "memory_update": memory_update,
                  "ema_momentum": ema_momentum, "gat_impl": gat_impl}
    loss_over: dict[str, Any] = {"alpha_omics": alpha_omics, "alpha_wsi": alpha_wsi}
    if no_recon:
        loss_over["reconstruction"] = False
    model_cfg = dataclasses.replace(model_cfg, **{k: v for k, v in model_over.items() if v is not None})
    loss_cfg = dataclasses.replace(loss_cfg, **{k: v for k, v in loss_over.items() if v is not None})
    train_cfg = TrainConfig(folds=folds, seed=seed, device=device)
    if preset == "official":  # the released training script's choices
        train_cfg = dataclasses.replace(train_cfg, grad_clip=16.0, lr_plateau=True, patience=1,
                                        kmeans_patches=model_cfg.kmeans_patches, epochs=100, protocol="official")
    else:
        train_cfg = dataclasses.replace(train_cfg, kmeans_patches=model_cfg.kmeans_patches)
    train_over: dict[str, Any] = {"epochs": epochs, "patience": patience, "lr": lr}
    train_cfg = dataclasses.replace(train_cfg, **{k: v for k, v in train_over.items() if v is not None})
    return model_cfg, loss_cfg, train_cfg


def load_training_data(
    cohort_csv: Path,
    features_dir: Path,
    omics_path: Path | None,
    label_col: str,
    positive: str,
    folds: int = 5,
    console: Console | None = None,
    omics_opts: OmicsOptions | None = None,
) -> TrainingData:
    """Validate the whole cohort (omics with the checks training's ``omics_opts`` will apply); print every
    warning and every problem, and raise ``DataRefusedError`` if there is any problem."""
    report = validate_cohort(cohort_csv, features_dir, omics_path, label_col, positive, folds=folds,
                             require_omics=omics_path is not None,
                             omics_transform=(omics_opts or OmicsOptions()).transform() if omics_path else None)
    if console is not None:
        for warning in report.warnings:
            console.print(f"warning: {warning}", highlight=False, markup=False, soft_wrap=True)
    if not report.ok:
        if console is not None:
            for problem in report.problems:
                console.print(str(problem), highlight=False, markup=False, soft_wrap=True)
        raise DataRefusedError(f"{len(report.problems)} problem(s) in the cohort; nothing was run")
    return TrainingData(
        cohort=report.cohort,
        slide_paths=report.slide_paths,
        omics=report.omics,
        feature_dim=report.summary["feature_dim"],
        encoder=report.summary.get("encoder"),
        sources={"cohort": str(Path(cohort_csv).resolve()), "features": str(Path(features_dir).resolve()),
                 "omics": str(Path(omics_path).resolve()) if omics_path else None, "label_col": label_col,
                 "positive": positive},
    )
