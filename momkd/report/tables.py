"""The cross-validation table (the paper's Table 1 layout) and the side-by-side comparison of runs.

Every number comes from a run's ``summary.json`` as training wrote it (test metrics per fold, their mean and
std); nothing is recomputed here, only formatted (percent, one decimal, as the paper prints them).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

from .document import Table, table_markdown

METRIC_KEYS = ("auc", "acc", "f1")
METRIC_NAMES = {"auc": "AUC", "acc": "ACC", "f1": "F1"}


def percent(value: float) -> str:
    """``0.8734 -> '87.3'``; NaN (e.g. the std of one fold) -> ``'n/a'``."""
    return "n/a" if math.isnan(float(value)) else f"{100 * float(value):.1f}"


def mean_std_cell(mean: Mapping[str, float], std: Mapping[str, float], key: str) -> str:
    return f"{percent(mean[key])} ± {percent(std[key])}"


def cv_table(summary: Mapping[str, Any]) -> Table:
    """Test AUC/ACC/F1 (%) per fold with its validation-chosen threshold, and mean ± std as the footer."""
    header = ("fold", "threshold", *(f"{METRIC_NAMES[k]} (%)" for k in METRIC_KEYS))
    rows = [(str(r["fold"]), f"{r['threshold']:.3f}", *(percent(r["test"][k]) for k in METRIC_KEYS))
            for r in summary["folds"]]
    footer = ("mean ± std", "", *(mean_std_cell(summary["mean"], summary["std"], k) for k in METRIC_KEYS))
    return Table(header, rows, footer)


def cv_table_csv(summary: Mapping[str, Any]) -> str:
    """The same table at full precision (the values of summary.json verbatim): fold rows, then mean and std."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["fold", "threshold", *METRIC_KEYS])
    for r in summary["folds"]:
        writer.writerow([r["fold"], repr(float(r["threshold"])), *(repr(float(r["test"][k])) for k in METRIC_KEYS)])
    for name in ("mean", "std"):
        writer.writerow([name, "", *(repr(float(summary[name][k])) for k in METRIC_KEYS)])
    return buf.getvalue()


def summary_markdown(summary: Mapping[str, Any]) -> str:
    """A run's ``summary.md``: the CV table under a title naming the model and preset."""
    title = f"# {summary['model']} ({summary['preset']} preset): test metrics, threshold chosen on validation"
    return f"{title}\n\n{table_markdown(cv_table(summary))}\n"


def compare_table(runs: Sequence[tuple[str, Mapping[str, Any]]]) -> Table:
    """One row per (name, summary): model, preset, folds and mean ± std of each metric (%)."""
    header = ("run", "model", "preset", "folds", *(f"{METRIC_NAMES[k]} (%)" for k in METRIC_KEYS))
    rows = [(name, str(s["model"]), str(s["preset"]), str(len(s["folds"])),
             *(mean_std_cell(s["mean"], s["std"], k) for k in METRIC_KEYS)) for name, s in runs]
    return Table(header, rows)
