"""Models (PyTorch): the graph encoder, class memory, memory-guided attention head, MoMKD and ABMIL."""

from __future__ import annotations

from typing import TYPE_CHECKING

from momkd.config import ModelConfig

if TYPE_CHECKING:
    from torch import nn

__all__ = ["build_model"]


def build_model(cfg: ModelConfig, in_dim: int, omics_dim: int = 0) -> "nn.Module":
    """A fresh ``MoMKD`` (``cfg.model == "momkd"``) or ``ABMIL`` (``"abmil"``; ``omics_dim`` ignored)."""
    if cfg.model == "abmil":
        from momkd.models.abmil import ABMIL

        return ABMIL(in_dim, cfg.dim, cfg.dropout)
    from momkd.models.momkd import MoMKD

    return MoMKD(cfg, in_dim, omics_dim)
