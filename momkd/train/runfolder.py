"""The run folder ``momkd train`` writes and everything else reads (no PyTorch): the one place that knows its
layout::

    RUN/config.json              the run's data sources, configs and omics options
    RUN/splits/fold_K.csv        case_id, split, label
    RUN/summary.json             written last: the run is finished; its ``folds`` are the run's folds
    RUN/summary.md               the CV table
    RUN/fold_K/model.safetensors, model.json     the fold's checkpoint (``momkd.train.checkpoint``)
    RUN/fold_K/metrics.json, history.csv, test_predictions.csv, omics_transform.json   (metrics.json last: the
                                 fold is finished)
    RUN/fold_K/resume.safetensors  the fold's state after its last complete epoch (``momkd.train.resume``), for
                                 ``momkd train --resume``; removed once the fold is finished

Every file is written atomically (a temporary file in the same folder, then ``os.replace``). Reading: a file that
is missing or malformed is one ``RunFolderError`` line naming the file; per-fold files that are absent are
``None`` (the report says which sections it skips). The folds of a run are exactly those of ``summary.json``
(:func:`fold_dirs`): a fold folder left by a killed run is never part of an export or an evaluation.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from momkd.data.cohort import SlideLabel, read_table
from momkd.atomic import write_text
from momkd.errors import RunFolderError

from momkd.tables import METRIC_KEYS

SUMMARY = "summary.json"
SUMMARY_MD = "summary.md"
CONFIG = "config.json"
SPLITS = "splits"
HISTORY = "history.csv"
METRICS = "metrics.json"
TEST_PREDICTIONS = "test_predictions.csv"
TEST_COLUMNS = ("slide_id", "case_id", "label", "probability")
WEIGHTS = "model.safetensors"
META = "model.json"
RESUME = "resume.safetensors"
OMICS_TRANSFORM = "omics_transform.json"


def fold_dir(run_dir: Path, fold: int) -> Path:
    """``RUN/fold_K``."""
    return Path(run_dir) / f"fold_{int(fold)}"


# --------------------------------------------------------------------------- writing
def write_json(path: Path, data: Any) -> None:
    """``data`` as indented JSON (numpy scalars as floats), atomically."""
    write_text(path, json.dumps(data, indent=2, default=float))


def write_rows(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Rows as CSV with the union of their keys as header (first-seen order), atomically."""
    fieldnames: list[str] = []
    for row in rows:
        fieldnames += [k for k in row if k not in fieldnames]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fieldnames, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())


# --------------------------------------------------------------------------- the run's folds
def mean_threshold(thresholds: Sequence[float]) -> float:
    """The decision threshold of the mean-of-folds model: the mean of the fold thresholds."""
    if not thresholds:
        raise ValueError("no fold thresholds")
    return float(sum(float(t) for t in thresholds) / len(thresholds))


def run_folds(run_dir: Path) -> list[int]:
    """The folds of a finished run, as ``summary.json`` lists them (``RunFolderError`` when unfinished)."""
    run = Path(run_dir)
    if not run.is_dir():
        raise RunFolderError(f"{run}: run folder does not exist")
    if not (run / CONFIG).is_file():
        raise RunFolderError(f"{run}: not a momkd run folder (no {CONFIG})")
    if not (run / SUMMARY).is_file():
        raise RunFolderError(f"{run}: unfinished run (no {SUMMARY}): let `momkd train` finish, or train again")
    summary = read_run_json(run / SUMMARY)
    try:
        return [int(r["fold"]) for r in summary["folds"]]
    except (KeyError, TypeError, ValueError):
        raise RunFolderError(f"{run / SUMMARY}: 'folds' is not a list of fold records") from None


def fold_dirs(run_dir: Path, fold: int | None = None) -> list[Path]:
    """The checkpoint folders of the run's folds (those of ``summary.json``), by fold; only ``fold`` when given."""
    run = Path(run_dir)
    folds = run_folds(run)
    if fold is not None:
        if fold not in folds:
            raise RunFolderError(f"{run}: has no trained fold {fold} (its folds: {', '.join(map(str, folds))})")
        folds = [fold]
    dirs = [fold_dir(run, k) for k in sorted(folds)]
    for d in dirs:
        if not (d / WEIGHTS).is_file():
            raise RunFolderError(f"{d / WEIGHTS}: missing checkpoint of a fold {SUMMARY} reports")
    return dirs


def read_fold_meta(fold_path: Path) -> dict[str, Any]:
    """A fold's ``model.json`` (what rebuilds its model, its threshold, class names, encoder)."""
    return read_run_json(Path(fold_path) / META)


@dataclass(frozen=True)
class HeldOutPredictions:
    """A fold's held-out slides: ``items`` (slide, case, label) and their (S,) probabilities."""

    items: list[SlideLabel]
    probabilities: np.ndarray


@dataclass(frozen=True)
class FoldRecord:
    fold: int
    path: Path                                   # RUN/fold_K
    history: dict[str, np.ndarray] | None        # column -> (epochs,) float64 (NaN where empty)
    test: HeldOutPredictions | None


@dataclass(frozen=True)
class RunRecord:
    path: Path
    summary: dict[str, Any]
    config: dict[str, Any]
    folds: list[FoldRecord]

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def model(self) -> str:
        return str(self.summary["model"])

    @property
    def has_memory(self) -> bool:
        """MoMKD has the class memory; the ABMIL baseline does not."""
        return self.model == "momkd"

    @property
    def n_codes(self) -> int | None:
        value = self.config.get("model", {}).get("n_codes")
        return int(value) if value is not None else None

    @property
    def class_names(self) -> tuple[str, str]:
        names = self.config.get("class_names") or ["negative", "positive"]
        return str(names[0]), str(names[1])


def read_run_json(path: Path) -> dict[str, Any]:
    """A run folder's JSON object (config.json, summary.json, ...); ``RunFolderError`` (one line) otherwise."""
    if not path.is_file():
        raise RunFolderError(f"{path}: missing (is {path.parent} a finished momkd run folder?)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise RunFolderError(f"{path}: cannot be read ({e})") from None
    except json.JSONDecodeError as e:
        raise RunFolderError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(data, dict):
        raise RunFolderError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _check_summary(path: Path, summary: Mapping[str, Any]) -> None:
    """The fields the report reads: model, preset, folds[fold, threshold, test{auc, acc, f1}], mean, std."""
    for key in ("model", "preset", "folds", "mean", "std"):
        if key not in summary:
            raise RunFolderError(f"{path}: no {key!r} field (not a momkd training summary)")
    if not isinstance(summary["folds"], list) or not summary["folds"]:
        raise RunFolderError(f"{path}: 'folds' must be a non-empty list")
    for i, record in enumerate(summary["folds"]):
        try:
            int(record["fold"]), float(record["threshold"])
            [float(record["test"][k]) for k in METRIC_KEYS]
        except (KeyError, TypeError, ValueError):
            raise RunFolderError(f"{path}: folds[{i}] lacks fold, threshold or test {'/'.join(METRIC_KEYS)}") from None
    for part in ("mean", "std"):
        try:
            [float(summary[part][k]) for k in METRIC_KEYS]
        except (KeyError, TypeError, ValueError):
            raise RunFolderError(f"{path}: {part!r} lacks {'/'.join(METRIC_KEYS)}") from None


def _number(text: str) -> float:
    return float(text) if text.strip() else math.nan


def read_history(path: Path) -> dict[str, np.ndarray] | None:
    """``history.csv`` as column -> (epochs,) float64, or ``None`` when the fold has none."""
    if not path.is_file():
        return None
    table = read_table(path, RunFolderError)
    if "epoch" not in table.header:
        raise RunFolderError(f"{path}: no 'epoch' column (columns: {', '.join(table.header)})")
    try:
        columns = np.array([[_number(c) for c in cells] for _, cells in table.rows], dtype=np.float64)
    except ValueError as e:
        raise RunFolderError(f"{path}: a value is not a number ({e})") from None
    columns = columns.reshape(len(table.rows), len(table.header))
    return {name: columns[:, j] for j, name in enumerate(table.header)}


def read_test_predictions(path: Path) -> HeldOutPredictions | None:
    """``test_predictions.csv`` (slide_id, case_id, label 0/1, probability), or ``None`` when absent."""
    if not path.is_file():
        return None
    table = read_table(path, RunFolderError)
    missing = [c for c in TEST_COLUMNS if c not in table.header]
    if missing:
        raise RunFolderError(f"{path}: missing column(s) {', '.join(missing)}")
    i_slide, i_case, i_label, i_prob = (table.header.index(c) for c in TEST_COLUMNS)
    items, probs = [], []
    for line, cells in table.rows:
        try:
            label, prob = int(cells[i_label]), float(cells[i_prob])
        except ValueError:
            raise RunFolderError(f"{path}: line {line}: label or probability is not a number") from None
        if label not in (0, 1) or not 0.0 <= prob <= 1.0:
            raise RunFolderError(f"{path}: line {line}: label must be 0/1 and probability in [0, 1]")
        items.append(SlideLabel(cells[i_slide], cells[i_case], label))
        probs.append(prob)
    return HeldOutPredictions(items, np.array(probs, dtype=np.float64))


def load_run(run_dir: str | Path) -> RunRecord:
    """A finished run folder: its summary (checked), config and per-fold files (those present)."""
    path = Path(run_dir)
    if not path.is_dir():
        raise RunFolderError(f"{path}: run folder does not exist")
    summary = read_run_json(path / SUMMARY)
    _check_summary(path / SUMMARY, summary)
    config = read_run_json(path / CONFIG)
    folds = []
    for record in summary["folds"]:
        k = int(record["fold"])
        fold_dir = path / f"fold_{k}"
        folds.append(FoldRecord(k, fold_dir, read_history(fold_dir / HISTORY),
                                read_test_predictions(fold_dir / TEST_PREDICTIONS)))
    return RunRecord(path, summary, config, folds)
