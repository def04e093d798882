"""momkd.metrics against sklearn (random inputs with heavy ties) and on the edge cases; torch/sklearn-free import."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from momkd.data.cohort import SlideLabel
from momkd.metrics import (accuracy, best_threshold, binary_metrics, case_and_slide_metrics, f1_score, macro_f1,
                           mean_std, roc_auc, roc_curve)

skm = pytest.importorskip("sklearn.metrics")


def random_case(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(n,) labels with both classes and (n,) scores, often rounded so that many tie (within and across classes)."""
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    rng.shuffle(y)
    s = rng.uniform(0, 1, n) + 0.3 * y
    decimals = int(rng.integers(0, 4))
    return y, np.round(s / 1.3, decimals) if decimals < 3 else s / 1.3


def test_roc_auc_and_curve_match_sklearn() -> None:
    rng = np.random.default_rng(0)
    for trial in range(200):
        y, s = random_case(rng, int(rng.integers(2, 120)))
        assert roc_auc(y, s) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12), trial
        fpr, tpr, thr = roc_curve(y, s)
        want = skm.roc_curve(y, s, drop_intermediate=False)
        for got, ref in zip((fpr, tpr, thr), want):
            np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12, err_msg=str(trial))


def test_roc_auc_edge_cases() -> None:
    assert math.isnan(roc_auc([1, 1, 1], [0.1, 0.5, 0.9]))
    assert math.isnan(roc_auc([0, 0], [0.1, 0.5]))
    assert math.isnan(roc_auc([], []))
    assert roc_auc([0, 1], [0.2, 0.8]) == 1.0
    assert roc_auc([0, 1], [0.8, 0.2]) == 0.0
    assert roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5          # all tied: half credit
    assert roc_auc(np.array([False, True, True]), [0.1, 0.4, 0.4]) == 1.0
    with pytest.raises(ValueError, match="0 and 1"):
        roc_auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        roc_auc([0, 1], [0.1, np.nan])
    with pytest.raises(ValueError, match="shape"):
        roc_auc([0, 1], [0.1])


def test_roc_curve_one_class_is_nan_like_sklearn() -> None:
    fpr, tpr, thr = roc_curve([1, 1, 1], [0.2, 0.2, 0.7])
    assert np.isnan(fpr).all() and tpr.tolist() == [0, 1 / 3, 1] and thr.tolist() == [np.inf, 0.7, 0.2]


def test_accuracy_and_f1_match_sklearn() -> None:
    rng = np.random.default_rng(1)
    for _ in range(200):
        n = int(rng.integers(1, 40))
        y, p = rng.integers(0, 2, n), (rng.uniform(size=n) < rng.uniform()).astype(int)
        assert accuracy(y, p) == pytest.approx(skm.accuracy_score(y, p), abs=1e-15)
        assert f1_score(y, p) == pytest.approx(skm.f1_score(y, p, zero_division=0), abs=1e-15)


def test_accuracy_and_f1_edge_cases() -> None:
    assert f1_score([0, 0, 0], [0, 0, 0]) == 0.0            # no true, no predicted positives: zero_division=0
    assert f1_score([1, 1], [0, 0]) == 0.0
    assert f1_score([0, 1], [1, 1]) == pytest.approx(2 / 3)
    assert accuracy([1, 0], [1, 1]) == 0.5
    assert math.isnan(accuracy([], []))
    with pytest.raises(ValueError, match="shape"):
        accuracy([0, 1], [0])
    with pytest.raises(ValueError, match="0 and 1"):
        f1_score([0, 1], [0.5, 1])


def test_macro_f1_matches_sklearn() -> None:
    rng = np.random.default_rng(3)
    for trial in range(300):
        n = int(rng.integers(1, 40))
        y = (rng.uniform(size=n) < rng.uniform()).astype(int)          # often one class only
        p = (rng.uniform(size=n) < rng.uniform()).astype(int)          # often one class predicted
        want = skm.f1_score(y, p, average="macro", zero_division=0)
        assert macro_f1(y, p) == pytest.approx(want, abs=1e-15), trial


@pytest.mark.parametrize(("y", "p"), [
    ([0, 1, 1, 0], [1, 1, 1, 1]),      # all predicted positive
    ([0, 1, 1, 0], [0, 0, 0, 0]),      # all predicted negative
    ([1, 1, 1], [1, 1, 1]),            # one class present, all right: F1 of that class only
    ([0, 0, 0], [0, 0, 0]),
    ([1, 1, 1], [0, 0, 0]),            # one class present, all wrong
    ([0, 0, 0], [0, 1, 0]),            # one class present, both predicted
    ([1, 1, 0], [0, 0, 0]),
    ([0, 1], [0, 1]),
])
def test_macro_f1_edge_cases(y: list[int], p: list[int]) -> None:
    assert macro_f1(y, p) == pytest.approx(skm.f1_score(y, p, average="macro", zero_division=0), abs=1e-15)


def test_macro_f1_is_the_mean_of_both_classes_f1() -> None:
    y, p = np.array([1, 1, 0, 0, 0, 1]), np.array([1, 0, 0, 1, 0, 1])
    assert macro_f1(y, p) == pytest.approx((f1_score(y, p) + f1_score(1 - y, 1 - p)) / 2)
    assert macro_f1([], []) == 0.0                                      # zero_division=0
    with pytest.raises(ValueError, match="shape"):
        macro_f1([0, 1], [0])


def brute_best_threshold(y: np.ndarray, s: np.ndarray) -> tuple[float, float]:
    """The best F1 over the distinct scores and 0.5, and the rule's pick among the maximisers."""
    cands = sorted(set(s.tolist()) | {0.5})
    f1 = [2 * np.sum(y & (s >= t)) / (np.sum(y) + np.sum(s >= t)) for t in cands]   # 2 TP / (P + predicted P)
    best = max(f1)
    winners = [t for t, f in zip(cands, f1) if math.isclose(f, best, rel_tol=0, abs_tol=1e-12)]
    return best, min(winners, key=lambda t: (abs(t - 0.5), t))


def test_best_threshold_maximises_f1() -> None:
    rng = np.random.default_rng(2)
    for trial in range(150):
        y, s = random_case(rng, int(rng.integers(2, 60)))
        t = best_threshold(y, s)
        best, pick = brute_best_threshold(y, s)
        assert skm.f1_score(y, (s >= t).astype(int)) == pytest.approx(best, abs=1e-12), trial
        assert t == pick, trial
        # no threshold at all (sklearn's precision-recall curve) beats it
        precision, recall, _ = skm.precision_recall_curve(y, s)
        with np.errstate(invalid="ignore"):
            pr_f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
        assert best == pytest.approx(pr_f1.max(), abs=1e-12)


def test_best_threshold_ties_and_edge_cases() -> None:
    assert best_threshold([1, 1, 1], [0.1, 0.2, 0.3]) == 0.5
    assert best_threshold([0, 0], [0.9, 0.8]) == 0.5
    assert best_threshold([], []) == 0.5
    # perfectly separated: every threshold in (0.3, 0.7] is optimal and 0.5 is one of them
    assert best_threshold([0, 0, 1, 1], [0.1, 0.3, 0.7, 0.9]) == 0.5
    # optimal only at 0.8 and 0.9 (both predict the same) -> the one closest to 0.5
    assert best_threshold([0, 0, 1, 1], [0.6, 0.7, 0.8, 0.9]) == 0.8
    # equal F1 at 0.25 and at 0.75 (same distance to 0.5, exact in binary) -> the smaller
    y, s = np.array([1, 0, 1, 0]), np.array([0.25, 0.375, 0.75, 0.625])
    f = {t: skm.f1_score(y, (s >= t).astype(int)) for t in (0.25, 0.375, 0.5, 0.625, 0.75)}
    assert f[0.25] == f[0.75] == max(f.values()) and best_threshold(y, s) == 0.25


def test_binary_metrics() -> None:
    y = np.array([0, 1, 1, 0, 1])
    s = np.array([0.2, 0.9, 0.4, 0.6, 0.7])
    m = binary_metrics(y, s, 0.5)
    assert set(m) == {"auc", "acc", "f1", "f1_macro", "threshold", "n", "n_pos"}
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, s))
    assert m["acc"] == pytest.approx(0.6) and m["f1"] == pytest.approx(skm.f1_score(y, s >= 0.5))
    assert m["f1_macro"] == pytest.approx(skm.f1_score(y, s >= 0.5, average="macro", zero_division=0))
    assert (m["threshold"], m["n"], m["n_pos"]) == (0.5, 5, 3)
    assert binary_metrics(y, s, 0.4)["acc"] == pytest.approx(0.8)      # score >= threshold is positive
    json.dumps(m)
    assert all(type(m[k]) is float for k in ("auc", "acc", "f1", "f1_macro", "threshold"))
    assert all(type(m[k]) is int for k in ("n", "n_pos"))


def test_case_and_slide_metrics() -> None:
    items = [SlideLabel("a1", "a", 1), SlideLabel("a2", "a", 1), SlideLabel("b1", "b", 0), SlideLabel("c1", "c", 0),
             SlideLabel("c2", "c", 0), SlideLabel("d1", "d", 1)]
    probs = np.array([0.9, 0.2, 0.3, 0.7, 0.1, 0.6])
    case, slide = case_and_slide_metrics(items, probs, 0.5)
    assert case == binary_metrics([1, 0, 0, 1], [0.55, 0.3, 0.4, 0.6], 0.5)   # mean slide probability per case
    assert slide == binary_metrics([1, 1, 0, 0, 0, 1], probs, 0.5)
    assert (case["n"], slide["n"]) == (4, 6)


def test_mean_std() -> None:
    folds = [{"auc": 0.8, "acc": 0.7, "f1": 0.6, "f1_macro": 0.65, "n": 10},
             {"auc": 0.9, "acc": 0.75, "f1": 0.5, "f1_macro": 0.6},
             {"auc": 0.85, "acc": 0.8, "f1": 0.7, "f1_macro": 0.7}]
    mean, std = mean_std(folds)
    for key in ("auc", "acc", "f1", "f1_macro"):
        values = [f[key] for f in folds]
        assert mean[key] == pytest.approx(np.mean(values))
        assert std[key] == pytest.approx(np.std(values, ddof=1))       # sample std
    assert list(mean) == ["auc", "acc", "f1", "f1_macro"]
    mean, std = mean_std(folds, keys=("f1",))
    assert set(mean) == set(std) == {"f1"}
    mean, std = mean_std(folds[:1])
    assert mean["auc"] == 0.8 and math.isnan(std["auc"])               # one fold: spread undefined
    mean, std = mean_std([{"auc": float("nan"), "acc": 1.0, "f1": 1.0, "f1_macro": 1.0}, folds[0]])
    assert math.isnan(mean["auc"]) and mean["acc"] == pytest.approx(0.85)
    with pytest.raises(ValueError, match="at least one"):
        mean_std([])
    with pytest.raises(KeyError):
        mean_std([{"auc": 1.0}])


def test_imports_without_torch_or_sklearn() -> None:
    code = ("import sys; sys.modules['torch'] = None; sys.modules['sklearn'] = None\n"
            "import momkd.metrics as m\n"
            "assert m.roc_auc([0, 1, 1], [0.1, 0.5, 0.5]) == 1.0\n"
            "assert m.best_threshold([0, 1], [0.2, 0.8]) == 0.5\n"
            "assert m.macro_f1([0, 1], [0, 1]) == 1.0\n")
    subprocess.run([sys.executable, "-c", code], check=True)
