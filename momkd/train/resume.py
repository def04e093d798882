"""Per-epoch training state, so that ``momkd train --resume`` continues a killed fold from its last complete epoch
exactly where the uninterrupted run would be.

One file per fold, ``RUN/fold_K/resume.safetensors`` (``runfolder.RESUME``), rewritten atomically after every
epoch, so a kill at any moment leaves either the previous epoch's state or the new one, whole. Tensors (model and
best-so-far weights, the optimizer's moment buffers, the torch RNG states) are safetensors tensors; everything else
(epoch, stopping and scheduler state, history rows, the numpy and python RNG states) is JSON in the file's
metadata. No pickle. The fold's ``metrics.json`` marks the fold finished; the resume file is removed then.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from momkd.atomic import atomic_path
from momkd.errors import RunFolderError

FORMAT = 1
_META_KEY = "momkd_resume"


@dataclass
class RandomState:
    """Every random generator the next epoch draws from: the fold's numpy generator (data order), torch's CPU
    generator (dropout, initialisation), the CUDA generators when training on CUDA, and python's ``random``."""

    numpy: dict[str, Any]
    torch_cpu: torch.Tensor
    torch_cuda: list[torch.Tensor] = field(default_factory=list)
    python: Any = None

    @classmethod
    def capture(cls, rng: np.random.Generator, device: torch.device) -> RandomState:
        cuda = torch.cuda.get_rng_state_all() if device.type == "cuda" else []
        return cls(dict(rng.bit_generator.state), torch.get_rng_state(), list(cuda), random.getstate())

    def restore(self, rng: np.random.Generator, device: torch.device) -> None:
        rng.bit_generator.state = self.numpy
        torch.set_rng_state(self.torch_cpu)
        if device.type == "cuda" and self.torch_cuda:
            torch.cuda.set_rng_state_all(self.torch_cuda)
        if self.python is not None:
            version, internal, gauss = self.python
            random.setstate((version, tuple(internal), gauss))


@dataclass
class EpochState:
    """A fold's training after ``epoch`` complete epochs (``stopped``: early stopping ended it there)."""

    epoch: int
    stopped: bool
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any] | None
    stopping: dict[str, Any]
    best_state: dict[str, torch.Tensor]
    best_epoch: int
    history: list[dict[str, float]]
    random: RandomState


def save_epoch_state(path: Path, state: EpochState) -> None:
    """Write ``state`` to ``path`` atomically (the previous file stays whole until the new one is complete)."""
    tensors: dict[str, torch.Tensor] = {}
    for prefix, weights in (("model.", state.model), ("best.", state.best_state)):
        tensors.update({prefix + k: v.detach() for k, v in weights.items()})
    optim_scalars: dict[str, dict[str, Any]] = {}
    for param, entries in state.optimizer["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{param}.{name}"] = value.detach()
            else:
                optim_scalars.setdefault(str(param), {})[name] = value
    tensors["rng.torch_cpu"] = state.random.torch_cpu
    tensors.update({f"rng.torch_cuda.{i}": s for i, s in enumerate(state.random.torch_cuda)})
    meta = {
        "format": FORMAT, "epoch": state.epoch, "stopped": state.stopped, "best_epoch": state.best_epoch,
        "history": state.history, "stopping": state.stopping, "scheduler": state.scheduler,
        "optimizer": {"param_groups": state.optimizer["param_groups"], "scalars": optim_scalars,
                      "params": sorted(str(p) for p in state.optimizer["state"])},
        "rng": {"numpy": state.random.numpy, "python": state.random.python,
                "torch_cuda": len(state.random.torch_cuda)},
    }
    with atomic_path(path) as partial:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(partial),
                  metadata={_META_KEY: json.dumps(meta)})


def load_epoch_state(path: Path) -> EpochState | None:
    """The state ``save_epoch_state`` wrote, or ``None`` when ``path`` does not exist (no epoch completed)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[_META_KEY])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise RunFolderError(f"{path}: unreadable training state ({e}); delete it to restart this fold") from None
    if meta.get("format") != FORMAT:
        raise RunFolderError(f"{path}: training state format {meta.get('format')} (expected {FORMAT}); "
                             "delete it to restart this fold")

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    optim = meta["optimizer"]
    optim_state: dict[int, dict[str, Any]] = {}
    for param in optim["params"]:
        entries: dict[str, Any] = dict(part(f"optim.{param}."))
        entries.update(optim["scalars"].get(param, {}))
        optim_state[int(param)] = entries
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in optim["param_groups"]]
    rng = meta["rng"]
    return EpochState(
        epoch=int(meta["epoch"]), stopped=bool(meta["stopped"]), model=part("model."),
        optimizer={"state": optim_state, "param_groups": groups}, scheduler=meta["scheduler"],
        stopping=meta["stopping"], best_state=part("best."), best_epoch=int(meta["best_epoch"]),
        history=meta["history"],
        random=RandomState(rng["numpy"], tensors["rng.torch_cpu"],
                           [tensors[f"rng.torch_cuda.{i}"] for i in range(int(rng["torch_cuda"]))], rng["python"]),
    )
