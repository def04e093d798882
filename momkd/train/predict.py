"""Histology-only prediction with a trained model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
from torch import nn

from momkd.data.batch import GraphSlide
from momkd.train.data import SlideStore

if TYPE_CHECKING:
    from momkd.models.abmil import ABMIL
    from momkd.models.momkd import MoMKD


def slide_tensors(graph: GraphSlide, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) float32 features and (N, W) int64 neighbours of one slide, on ``device``."""
    return (
        torch.from_numpy(graph.features).to(device, non_blocking=True),
        torch.from_numpy(graph.neighbors).to(device, non_blocking=True),
    )


@torch.no_grad()
def predict_slides(model: nn.Module, store: SlideStore, slide_ids: Sequence[str], device: torch.device) -> np.ndarray:
    """Positive-class probability of each slide, histology only, model in eval mode.

    Returns:
        (len(slide_ids),) float64 probabilities.
    """
    model.eval()
    net = cast("MoMKD | ABMIL", model)   # the models train builds; nn.Module types its methods loosely
    out = np.empty(len(slide_ids), dtype=np.float64)
    for i, slide_id in enumerate(slide_ids):
        features, neighbors = slide_tensors(store.get(slide_id), device)
        offsets = torch.tensor([0, features.shape[0]], device=device)
        logits = net.forward_wsi(features, neighbors, offsets).logits
        out[i] = torch.softmax(logits.double(), dim=-1)[0, 1].item()
    return out
