"""Fold checkpoints: weights in safetensors (no pickle), everything needed to rebuild the model in JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from momkd.config import ModelConfig
from momkd.errors import RunFolderError
from momkd.models import build_model

WEIGHTS = "model.safetensors"
META = "model.json"


def save_checkpoint(fold_dir: Path, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write ``fold_dir/model.safetensors`` and ``fold_dir/model.json``.

    ``meta`` must hold ``model_config`` (ModelConfig.to_dict()), ``in_dim`` and ``omics_dim``; it also carries
    the class names, feature encoder, graph settings and decision threshold for export.
    """
    fold_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(fold_dir / WEIGHTS))
    (fold_dir / META).write_text(json.dumps(meta, indent=2))


def load_checkpoint(fold_dir: Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a fold's model from its checkpoint, in eval mode on ``device``."""
    weights, meta_path = fold_dir / WEIGHTS, fold_dir / META
    for path in (weights, meta_path):
        if not path.is_file():
            raise RunFolderError(f"{path}: missing checkpoint file (is {fold_dir.parent} a finished momkd run?)")
    meta = json.loads(meta_path.read_text())
    model = build_model(ModelConfig.from_dict(meta["model_config"]), meta["in_dim"], meta["omics_dim"])
    model.load_state_dict(load_file(str(weights), device="cpu"))
    return model.to(device).eval(), meta


def fold_dirs(run_dir: Path, fold: int | None = None) -> list[Path]:
    """The run's ``fold_K`` folders holding a checkpoint, by K; only fold ``fold`` when given."""
    if not (run_dir / "config.json").is_file():
        raise RunFolderError(f"{run_dir}: not a momkd run folder (no config.json)")
    found = sorted(
        (p for p in run_dir.glob("fold_*") if (p / WEIGHTS).is_file() and p.name[5:].isdigit()),
        key=lambda p: int(p.name[5:]),
    )
    if fold is not None:
        found = [p for p in found if int(p.name[5:]) == fold]
        if not found:
            raise RunFolderError(f"{run_dir}: has no trained fold {fold}")
    if not found:
        raise RunFolderError(f"{run_dir}: has no trained folds (fold_K/{WEIGHTS})")
    return found
