"""Fold checkpoints: weights in safetensors (no pickle), everything needed to rebuild the model in JSON (both
written atomically; the file names and the run's fold list are ``momkd.train.runfolder``'s)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from momkd.atomic import atomic_path
from momkd.config import ModelConfig
from momkd.errors import RunFolderError
from momkd.models import build_model
from momkd.train.runfolder import META, WEIGHTS, read_fold_meta, write_json


def save_checkpoint(fold_dir: Path, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write ``fold_dir/model.safetensors`` and ``fold_dir/model.json``.

    ``meta`` must hold ``model_config`` (ModelConfig.to_dict()), ``in_dim`` and ``omics_dim``; it also carries
    the class names, feature encoder, graph settings and decision threshold for export.
    """
    fold_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(fold_dir / WEIGHTS) as partial:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(partial))
    write_json(fold_dir / META, meta)


def load_checkpoint(fold_dir: Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a fold's model from its checkpoint, in eval mode on ``device``."""
    weights, meta_path = fold_dir / WEIGHTS, fold_dir / META
    for path in (weights, meta_path):
        if not path.is_file():
            raise RunFolderError(f"{path}: missing checkpoint file (is {fold_dir.parent} a finished momkd run?)")
    meta = read_fold_meta(fold_dir)
    model = build_model(ModelConfig.from_dict(meta["model_config"]), meta["in_dim"], meta["omics_dim"])
    model.load_state_dict(load_file(str(weights), device="cpu"))
    return model.to(device).eval(), meta
