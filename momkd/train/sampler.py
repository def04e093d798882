"""Class-balanced sampling of training items (numpy only)."""

from __future__ import annotations

import numpy as np


def balanced_epoch(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw one epoch of item indices, with replacement, each class equally likely.

    Args:
        labels: (M,) int array of 0/1 labels of the training items.
        rng: the run's random generator (advanced in place).

    Returns:
        (M,) int64 indices into ``labels``; a class's items are drawn with probability 1 / (2 * count).
    """
    labels = np.asarray(labels)
    counts = np.bincount(labels, minlength=2).astype(np.float64)
    present = counts > 0
    weights = np.where(present[labels], 1.0 / np.maximum(counts[labels], 1.0), 0.0)
    weights /= weights.sum()
    return rng.choice(len(labels), size=len(labels), replace=True, p=weights).astype(np.int64)
