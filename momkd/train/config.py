"""Training hyper-parameters (no torch import)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

PROTOCOLS = ("paper", "official")


@dataclass
class TrainConfig:
    """Optimisation and cross-validation settings.

    Defaults follow the paper and the authors' released training script: AdamW, lr 2e-4, weight decay
    1e-4, one slide per step, class-balanced sampling, early stopping on validation AUC.
    """

    epochs: int = 50
    lr: float = 2e-4
    weight_decay: float = 1e-4
    patience: int = 10  # epochs without a better validation AUC before stopping (the authors use 1)
    min_epochs: int = 5  # never stop before this many epochs (``paper`` protocol only)
    # "paper": our choices (per-case validation AUC, best (AUC, -CE) key, min_epochs; k-means on at most
    # kmeans_patches random patches per class). "official": the authors' training loop (per-slide validation AUC,
    # their EarlyStopping with ties kept, stop_epoch 1; k-means on whole slides drawn by the class-weighted
    # sampler until both classes have >= kmeans_patches patches, empty clusters kept). See momkd/train/stopping.py.
    protocol: str = "paper"
    grad_clip: float | None = None  # max grad-norm; the authors' "--gc 16"
    lr_plateau: bool = False  # ReduceLROnPlateau on validation AUC (factor 0.2, patience 5), as the authors
    folds: int = 5
    seed: int = 0
    kmeans_patches: int = 10000  # patches per class for the memory's spherical k-means initialisation
    kmeans_iters: int = 20
    device: str = "auto"
    cache_gb: float = 4.0  # slides kept in memory between epochs

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)} (got {self.protocol!r})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
