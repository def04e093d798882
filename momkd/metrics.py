"""Binary classification metrics in numpy (no sklearn, no torch) and the decision threshold chosen on validation.

Labels are 0/1 (any numeric or bool dtype holding only 0 and 1); class 1 is the positive class. Scores are the
positive-class probabilities; a case (or slide) is predicted positive when ``score >= threshold``. Every function
returns plain Python numbers so results go straight into JSON.

Two F1 definitions are kept apart: ``f1`` is the F1 of the positive class (ours, per case), ``f1_macro`` the
unweighted mean of the per-class F1 (sklearn's ``average="macro"``), the definition of the authors' ``test.py``
and of the paper's Table 1 (which reports it per slide).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from momkd.data.cohort import SlideLabel, case_level

DEFAULT_THRESHOLD = 0.5
SUMMARY_KEYS = ("auc", "acc", "f1", "f1_macro")  # the scores of binary_metrics that runs average over folds
UNDEFINED_AUC = "undefined (one class)"  # how an AUC that ``roc_auc`` cannot define (NaN) is printed


def auc_text(auc: float, std: float | None = None) -> str:
    """An AUC for a progress line or a summary, 3 decimals (``' ± std'`` when given); ``UNDEFINED_AUC`` when it
    is NaN (only one class among the scored items; for a mean over folds: in at least one fold)."""
    if math.isnan(float(auc)):
        return UNDEFINED_AUC
    return f"{float(auc):.3f}" if std is None else f"{float(auc):.3f} ± {float(std):.3f}"


def _labels(y: np.ndarray | Sequence[int], name: str) -> np.ndarray:
    """(n,) int64 copy of a 1-D 0/1 label array; ValueError otherwise."""
    a = np.asarray(y)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if a.dtype.kind not in "biuf" or not np.isin(a, (0, 1)).all():
        raise ValueError(f"{name} must hold only 0 and 1")
    return a.astype(np.int64)


def _scores(scores: np.ndarray | Sequence[float], n: int) -> np.ndarray:
    """(n,) float64 copy of finite scores; ValueError on a length mismatch or NaN/inf."""
    s = np.asarray(scores, dtype=np.float64)
    if s.shape != (n,):
        raise ValueError(f"scores must have shape ({n},) like the labels, got {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values")
    return s


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """(n,) float64 ranks 1..n of ``x`` (n,), tied values sharing the mean of their ranks."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])      # first sorted position of each tie group
    ends = np.r_[starts[1:], len(x)]                              # one past its last
    group = np.cumsum(np.r_[True, xs[1:] != xs[:-1]]) - 1
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = ((starts + ends + 1) / 2.0)[group]
    return ranks


def roc_auc(y_true: np.ndarray | Sequence[int], scores: np.ndarray | Sequence[float]) -> float:
    """Area under the ROC curve (Mann-Whitney U / (n_pos * n_neg), ties counted half via average ranks).

    Args:
        y_true: (n,) 0/1 labels.
        scores: (n,) positive-class scores.

    Returns:
        The AUC in [0, 1]; NaN when only one class is present (or n = 0).
    """
    y = _labels(y_true, "y_true")
    s = _scores(scores, len(y))
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    rank_sum = _average_ranks(s)[y == 1].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _cumulative_counts(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every distinct score t, descending: (thresholds (T,), true positives (T,), false positives (T,)) of the
    rule ``score >= t``."""
    order = np.argsort(-s, kind="stable")
    ys, ss = y[order], s[order]
    last = np.ones(len(ss), dtype=bool)          # last sorted position of each distinct score
    last[:-1] = ss[1:] != ss[:-1]
    tp = np.cumsum(ys)[last]
    return ss[last], tp, np.flatnonzero(last) + 1 - tp


def roc_curve(y_true: np.ndarray | Sequence[int],
              scores: np.ndarray | Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every point of the ROC curve (as sklearn's ``roc_curve(..., drop_intermediate=False)``).

    Args:
        y_true: (n,) 0/1 labels.
        scores: (n,) positive-class scores.

    Returns:
        fpr (T + 1,), tpr (T + 1,), thresholds (T + 1,) float64: thresholds[0] = inf (nothing positive), then the
        T distinct scores descending; point i is the rule ``score >= thresholds[i]``. A rate whose class is absent
        is NaN throughout.
    """
    y = _labels(y_true, "y_true")
    s = _scores(scores, len(y))
    thresholds, tp, fp = _cumulative_counts(y, s)
    n_pos = int(y.sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = np.r_[0, tp] / np.float64(n_pos)
        fpr = np.r_[0, fp] / np.float64(len(y) - n_pos)
    return fpr, tpr, np.r_[np.inf, thresholds]


def accuracy(y_true: np.ndarray | Sequence[int], y_pred: np.ndarray | Sequence[int]) -> float:
    """Fraction of (n,) predictions equal to the (n,) labels; NaN when n = 0."""
    y = _labels(y_true, "y_true")
    p = _labels(y_pred, "y_pred")
    if p.shape != y.shape:
        raise ValueError(f"y_pred must have shape {y.shape} like y_true, got {p.shape}")
    return float(np.mean(y == p)) if len(y) else float("nan")


def _f1(tp: np.ndarray | int, fp: np.ndarray | int, n_pos: int) -> np.ndarray:
    """F1 = 2 TP / (2 TP + FP + FN) with FN = n_pos - TP; 0 where the denominator is 0."""
    denom = np.asarray(tp + fp + n_pos, dtype=np.float64)
    return np.where(denom > 0, 2.0 * np.asarray(tp) / np.maximum(denom, 1.0), 0.0)


def f1_score(y_true: np.ndarray | Sequence[int], y_pred: np.ndarray | Sequence[int]) -> float:
    """F1 of class 1 from (n,) labels and (n,) 0/1 predictions; 0.0 when there are neither true nor predicted
    positives (sklearn's ``zero_division=0``)."""
    y = _labels(y_true, "y_true")
    p = _labels(y_pred, "y_pred")
    if p.shape != y.shape:
        raise ValueError(f"y_pred must have shape {y.shape} like y_true, got {p.shape}")
    tp = int(np.sum((y == 1) & (p == 1)))
    return float(_f1(tp, int(np.sum((y == 0) & (p == 1))), int(y.sum())))


def macro_f1(y_true: np.ndarray | Sequence[int], y_pred: np.ndarray | Sequence[int]) -> float:
    """Macro F1 from (n,) labels and (n,) 0/1 predictions: the unweighted mean of the F1 of class 1 and the F1 of
    class 0 (class 0 taken as the positive one), as sklearn's ``f1_score(average="macro", zero_division=0)``.

    Like sklearn, the mean runs over the classes that occur in ``y_true`` or ``y_pred``: when both are one and the
    same class (every case of that class, all predicted right) the result is that class's F1, 1.0. A class that
    occurs only in one of them has F1 0 (no true positives). With n = 0 the result is 0.0 (``zero_division=0``).
    """
    y = _labels(y_true, "y_true")
    p = _labels(y_pred, "y_pred")
    if p.shape != y.shape:
        raise ValueError(f"y_pred must have shape {y.shape} like y_true, got {p.shape}")
    present = [c for c in (0, 1) if np.any(y == c) or np.any(p == c)]
    if not present:
        return 0.0
    return float(np.mean([f1_score(y == c, p == c) for c in present]))


def best_threshold(y_true: np.ndarray | Sequence[int], scores: np.ndarray | Sequence[float]) -> float:
    """The decision threshold that maximises F1 on a validation split.

    The candidates are every distinct validation score (where the rule ``score >= t`` changes) and 0.5; among
    the candidates with the highest F1 the one closest to 0.5 wins, then the smaller one. With one class (or no
    cases) in ``y_true`` F1 says nothing and 0.5 is returned.

    Args:
        y_true: (n,) 0/1 validation labels.
        scores: (n,) validation positive-class scores.

    Returns:
        The threshold (a validation score or 0.5).
    """
    y = _labels(y_true, "y_true")
    s = _scores(scores, len(y))
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == len(y):
        return DEFAULT_THRESHOLD
    thresholds, tp, fp = _cumulative_counts(y, s)
    at_default = s >= DEFAULT_THRESHOLD
    candidates = np.r_[thresholds, DEFAULT_THRESHOLD]
    f1 = np.r_[_f1(tp, fp, n_pos), _f1(int(y[at_default].sum()), int((1 - y[at_default]).sum()), n_pos)]
    best = candidates[f1 == f1.max()]
    return float(best[np.lexsort((best, np.abs(best - DEFAULT_THRESHOLD)))[0]])


def binary_metrics(y_true: np.ndarray | Sequence[int], scores: np.ndarray | Sequence[float],
                   threshold: float) -> dict[str, float | int]:
    """AUC, and accuracy and the two F1 of the rule ``score >= threshold``.

    Args:
        y_true: (n,) 0/1 labels.
        scores: (n,) positive-class scores.
        threshold: the decision threshold.

    Returns:
        floats "auc" (``roc_auc``), "acc" (``accuracy``), "f1" (positive-class F1, ``f1_score``), "f1_macro"
        (``macro_f1``) and "threshold"; ints "n" (cases or slides) and "n_pos" (positives among them).
    """
    y = _labels(y_true, "y_true")
    s = _scores(scores, len(y))
    pred = (s >= threshold).astype(np.int64)
    return {"auc": roc_auc(y, s), "acc": accuracy(y, pred), "f1": f1_score(y, pred), "f1_macro": macro_f1(y, pred),
            "threshold": float(threshold), "n": int(len(y)), "n_pos": int(y.sum())}


def case_and_slide_metrics(items: Sequence[SlideLabel], probs: np.ndarray | Sequence[float],
                           threshold: float) -> tuple[dict[str, float | int], dict[str, float | int]]:
    """``binary_metrics`` of held-out slides at one threshold, per case and per slide.

    Args:
        items: (S,) slides with their case and the case's label.
        probs: (S,) positive-class probabilities of those slides.
        threshold: the decision threshold (chosen per case on validation), used at both levels.

    Returns:
        (per case: a case's score is the mean probability of its slides, ``case_level``; per slide: every slide
        scored on its own, the unit of the authors' ``test.py``).
    """
    _, case_y, case_p = case_level(items, np.asarray(probs, dtype=np.float64))
    slide_y = [it.label for it in items]
    return binary_metrics(case_y, case_p, threshold), binary_metrics(slide_y, probs, threshold)


def mean_std(records: Iterable[Mapping[str, float]],
             keys: Sequence[str] = SUMMARY_KEYS) -> tuple[dict[str, float], dict[str, float]]:
    """Mean and spread of per-fold metrics, as the paper's "mean ± std".

    The spread is the sample standard deviation (ddof = 1); with a single fold it is undefined and reported as
    NaN. A NaN metric in any fold (e.g. the AUC of a one-class split) makes that key's mean and std NaN rather
    than silently averaging fewer folds.

    Args:
        records: per-fold metric dicts (at least one), each holding every key.
        keys: the metrics to summarise.

    Returns:
        ({key: mean}, {key: std}).
    """
    values = np.array([[float(r[k]) for k in keys] for r in records], dtype=np.float64).reshape(-1, len(keys))
    if len(values) == 0:
        raise ValueError("mean_std needs at least one record")
    mean = values.mean(axis=0)
    std = values.std(axis=0, ddof=1) if len(values) > 1 else np.full(len(keys), np.nan)
    return dict(zip(keys, mean.tolist())), dict(zip(keys, std.tolist()))
