"""The cross-validation table (the paper's Table 1 layout) and the side-by-side comparison of runs.

Every number comes from a run's ``summary.json`` as training wrote it (test metrics per fold, their mean and
std); nothing is recomputed here, only formatted (percent, one decimal, as the paper prints them). Two levels are
shown side by side (``COLUMNS``): per case (ours: ``test``, ``mean``, ``std``) and per slide (``test_slide``,
``mean_slide``, ``std_slide``: the unit of the authors' test.py and of the paper's Table 1). A summary written
before a metric existed lacks it: its cells read ``n/a`` (its CSV cells are empty).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from momkd.metrics import SUMMARY_KEYS


@dataclass(frozen=True)
class Table:
    """Header cells, body rows and an optional footer row (drawn bold: e.g. the mean ± std)."""

    header: tuple[str, ...]
    rows: list[tuple[str, ...]]
    footer: tuple[str, ...] | None = None


def md_cell(text: str) -> str:
    """A Markdown table cell (``|`` escaped)."""
    return text.replace("|", "\\|")


def table_markdown(table: Table) -> str:
    """A GitHub-flavoured Markdown table; the footer's non-empty cells in bold."""
    lines = ["| " + " | ".join(md_cell(c) for c in table.header) + " |",
             "|" + "---|" * len(table.header)]
    lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in table.rows]
    if table.footer is not None:
        lines.append("| " + " | ".join(f"**{md_cell(c)}**" if c else "" for c in table.footer) + " |")
    return "\n".join(lines)


METRIC_KEYS = ("auc", "acc", "f1")  # the per-case test metrics every summary.json holds (the report requires them)
METRIC_NAMES = {"auc": "AUC", "acc": "ACC", "f1": "F1", "f1_macro": "macro F1"}
# level -> (key of the fold record's metrics, key of their mean over folds, key of their std)
LEVELS = {"case": ("test", "mean", "std"), "slide": ("test_slide", "mean_slide", "std_slide")}
# the (level, metric) columns of the Markdown tables: ours per case, then the paper's definitions per slide
COLUMNS = (("case", "auc"), ("case", "acc"), ("case", "f1"), ("case", "f1_macro"),
           ("slide", "auc"), ("slide", "acc"), ("slide", "f1_macro"))
LEGEND = ("case = per case (a case's probability is the mean of its slides'; ours), slide = per slide; "
          "F1 = F1 of the positive class, macro F1 = mean of both classes' F1; per slide, macro F1 is the "
          "definition of the authors' test.py and the paper's Table 1. Every column uses the fold's threshold "
          "chosen on validation (max per-case F1). An AUC reads 'undefined' where the split (for mean ± std, "
          "some fold's split) held only one class.")
UNDEFINED = "undefined"  # the cell of an AUC that the split cannot define (one class only)


def percent(value: float) -> str:
    """``0.8734 -> '87.3'``; NaN (e.g. the std of one fold, or a metric the summary lacks) -> ``'n/a'``."""
    return "n/a" if math.isnan(float(value)) else f"{100 * float(value):.1f}"


def _value(metrics: Mapping[str, Any] | None, key: str) -> float:
    """``metrics[key]`` as a float; NaN when the summary (or that part of it) predates the metric."""
    return float(metrics[key]) if metrics and key in metrics else math.nan


def _cell(metrics: Mapping[str, Any] | None, key: str) -> str:
    """``percent`` of ``metrics[key]``; ``UNDEFINED`` for a NaN AUC (one class), ``'n/a'`` where it is absent."""
    value = _value(metrics, key)
    if key == "auc" and metrics and key in metrics and math.isnan(value):
        return UNDEFINED
    return percent(value)


def _header(level: str, key: str) -> str:
    return f"{level} {METRIC_NAMES[key]} (%)"


def mean_std_cell(summary: Mapping[str, Any], level: str, key: str) -> str:
    """``'mean ± std'`` (%) over folds of one metric at one level of a summary; ``'n/a'`` where it lacks it."""
    _, mean_key, std_key = LEVELS[level]
    mean = summary.get(mean_key) or {}
    if key not in mean:
        return "n/a"
    if _cell(mean, key) == UNDEFINED:
        return UNDEFINED
    return f"{percent(mean[key])} ± {percent(_value(summary.get(std_key), key))}"


def cv_table(summary: Mapping[str, Any]) -> Table:
    """Test metrics (%, ``COLUMNS``) per fold with its validation-chosen threshold, and mean ± std as the footer."""
    header = ("fold", "threshold", *(_header(level, k) for level, k in COLUMNS))
    rows = [(str(r["fold"]), f"{r['threshold']:.3f}",
             *(_cell(r.get(LEVELS[level][0]), k) for level, k in COLUMNS)) for r in summary["folds"]]
    footer = ("mean ± std", "", *(mean_std_cell(summary, level, k) for level, k in COLUMNS))
    return Table(header, rows, footer)


def cv_table_csv(summary: Mapping[str, Any]) -> str:
    """The same table at full precision (the values of summary.json verbatim): fold rows, then mean and std.

    Columns: fold, threshold, then every ``SUMMARY_KEYS`` metric per case (``auc``, ``acc``, ``f1``,
    ``f1_macro``) and per slide (``slide_auc``, ...); a metric the summary lacks is an empty cell.
    """
    def cells(metrics: Mapping[str, Any] | None) -> list[str]:
        return [repr(float(metrics[k])) if metrics and k in metrics else "" for k in SUMMARY_KEYS]

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["fold", "threshold", *SUMMARY_KEYS, *(f"slide_{k}" for k in SUMMARY_KEYS)])
    (case_fold, *case_parts), (slide_fold, *slide_parts) = LEVELS["case"], LEVELS["slide"]
    for r in summary["folds"]:
        writer.writerow([r["fold"], repr(float(r["threshold"])), *cells(r.get(case_fold)), *cells(r.get(slide_fold))])
    for name, case_part, slide_part in zip(("mean", "std"), case_parts, slide_parts):
        writer.writerow([name, "", *cells(summary.get(case_part)), *cells(summary.get(slide_part))])
    return buf.getvalue()


def summary_markdown(summary: Mapping[str, Any]) -> str:
    """A run's ``summary.md``: the CV table under a title naming the model and preset, and the legend."""
    title = f"# {summary['model']} ({summary['preset']} preset): test metrics, threshold chosen on validation"
    return f"{title}\n\n{LEGEND}\n\n{table_markdown(cv_table(summary))}\n"


def compare_table(runs: Sequence[tuple[str, Mapping[str, Any]]]) -> Table:
    """One row per (name, summary): model, preset, folds and mean ± std of each ``COLUMNS`` metric (%)."""
    header = ("run", "model", "preset", "folds", *(_header(level, k) for level, k in COLUMNS))
    rows = [(name, str(s["model"]), str(s["preset"]), str(len(s["folds"])),
             *(mean_std_cell(s, level, k) for level, k in COLUMNS)) for name, s in runs]
    return Table(header, rows)
