"""Histology-only prediction with a trained model, and case-level aggregation of slide predictions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from momkd.train.data import SlideGraph, SlideStore


class SlideLabel(NamedTuple):
    """A labelled slide: the unit of training; metrics are computed per case."""

    slide_id: str
    case_id: str
    label: int


def slide_tensors(graph: SlideGraph, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
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
    out = np.empty(len(slide_ids), dtype=np.float64)
    for i, slide_id in enumerate(slide_ids):
        features, neighbors = slide_tensors(store.get(slide_id), device)
        offsets = torch.tensor([0, features.shape[0]], device=device)
        logits = model.forward_wsi(features, neighbors, offsets).logits
        out[i] = torch.softmax(logits.double(), dim=-1)[0, 1].item()
    return out


def case_level(items: Sequence[SlideLabel], probs: np.ndarray) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Mean slide probability per case (the unit the splits and the paper's metrics use).

    Returns:
        case ids in first-seen order, (C,) labels, (C,) mean probabilities.
    """
    order: dict[str, list[int]] = {}
    labels: dict[str, int] = {}
    for i, item in enumerate(items):
        order.setdefault(item.case_id, []).append(i)
        labels[item.case_id] = item.label
    cases = list(order)
    return (
        cases,
        np.array([labels[c] for c in cases], dtype=np.int64),
        np.array([float(np.mean(probs[order[c]])) for c in cases], dtype=np.float64),
    )
