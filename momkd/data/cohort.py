"""The cohort table (case, slide, label) and case-level stratified cross-validation splits.

Cohort CSV: ``case_id``, ``slide_id`` (a slide file name such as ``X.svs`` is reduced to its stem ``X``; it
names ``X.h5`` inside the features folder, so path separators, ``..`` and control characters are refused), and
a label column with exactly two values, one of which the user names as positive (case-insensitive). A case
may have several slides; every slide belongs to one case.

Splits are by case: the test sets are a stratified K-fold partition (every case is tested exactly once); the
validation set of each fold is a stratified share of the remaining cases (train:val = 7:1, so 7:1:2 overall
for 5 folds). Each fold is written as ``fold_K.csv`` (case_id, split, label) and can be read back.
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from momkd.errors import CohortError, MomkdError

SLIDE_EXTENSIONS = (".svs", ".ndpi", ".tif", ".tiff", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".czi", ".qptiff",
                    ".isyntax", ".dcm", ".h5")
SPLIT_NAMES = ("train", "val", "test")
_FOLD_FILE = re.compile(r"^fold_(\d+)\.csv$")


@dataclass(frozen=True)
class Problem:
    """One problem with the input data. ``str(p) == f"{where}: {message}"`` (one line)."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass(frozen=True)
class Table:
    """A delimited text table: header cells and data rows, both stripped, with their 1-based line numbers."""

    path: Path
    header: list[str]
    rows: list[tuple[int, list[str]]]


def read_table(path: str | os.PathLike[str], error: type[MomkdError] = CohortError) -> Table:
    """Read a CSV/TSV file: tab for ``.tsv``/``.tab``, comma for ``.csv``, otherwise sniffed from the header.

    Blank lines are skipped. Raises ``error`` (one line naming the file) when it cannot be read, is empty, or
    a row's field count differs from the header's.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not a UTF-8 text table (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise error(f"{path}: cannot read the file: {e.strerror or e}") from None
    lines = text.splitlines()
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".tab"):
        delimiter = "\t"
    elif suffix == ".csv":
        delimiter = ","
    else:
        first = next((line for line in lines if line.strip()), "")
        delimiter = max("\t,;", key=first.count)
    header: list[str] | None = None
    rows: list[tuple[int, list[str]]] = []
    for number, cells in enumerate(csv.reader(lines, delimiter=delimiter), start=1):
        if not any(c.strip() for c in cells):
            continue
        cells = [c.strip() for c in cells]
        if header is None:
            header = cells
        elif len(cells) != len(header):
            raise error(f"{path}: line {number} has {len(cells)} fields, the header has {len(header)}")
        else:
            rows.append((number, cells))
    if header is None:
        raise error(f"{path}: empty file")
    return Table(path, header, rows)


def slide_id_problem(slide_id: str) -> str | None:
    """Why ``slide_id`` cannot name a file inside the features folder (``None`` when it can): a path separator,
    ``.``/``..``, a drive or absolute path, or a control character (NUL included) would read another file."""
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in slide_id):
        return f"slide_id {slide_id!r} contains a control character"
    if "/" in slide_id or "\\" in slide_id or slide_id in (".", "..") or os.path.isabs(slide_id):
        return (f"slide_id {slide_id!r} is a path, not a file name (it must name {{slide_id}}.h5 inside the "
                "features folder: no '/', '\\' or '..')")
    return None


def slide_stem(slide_id: str) -> str:
    """``'TCGA-A1.svs'`` -> ``'TCGA-A1'``: drop one known slide/feature file extension (case-insensitive)."""
    name = slide_id.strip()
    lower = name.lower()
    for ext in SLIDE_EXTENSIONS:
        if lower.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)]
    return name


@dataclass(frozen=True)
class Cohort:
    """Cases, their binary labels and their slides.

    Attributes:
        cases: unique case ids in the order of first appearance.
        labels: case -> 1 (positive) or 0.
        slides: case -> slide ids (file stems), in table order.
        class_names: (negative value, positive value) as written in the table.
        label_col: the label column's name.
        positive: the positive value as the user gave it.
    """

    cases: list[str]
    labels: dict[str, int]
    slides: dict[str, list[str]]
    class_names: tuple[str, str]
    label_col: str
    positive: str

    @property
    def slide_ids(self) -> list[str]:
        """Every slide id, case by case."""
        return [s for case in self.cases for s in self.slides[case]]

    def class_counts(self) -> dict[str, int]:
        """Cases per class: {negative name: n, positive name: n}."""
        n_pos = sum(self.labels[c] for c in self.cases)
        return {self.class_names[0]: len(self.cases) - n_pos, self.class_names[1]: n_pos}


def load_cohort(
    csv_path: str | os.PathLike[str],
    label_col: str,
    positive: str,
    problems: list[Problem] | None = None,
) -> Cohort:
    """Read a cohort table.

    Args:
        csv_path: CSV/TSV with ``case_id``, ``slide_id`` and ``label_col``.
        label_col: the label column.
        positive: the label value of positive cases (matched case-insensitively, surrounding spaces ignored).
        problems: when given, every problem is appended to it and a best-effort cohort is returned (cases
            with conflicting labels left out); when ``None``, any problem raises.

    Raises:
        CohortError: (only when ``problems`` is None) one line with the number of problems and each of them.
    """
    path = Path(csv_path)
    found: list[Problem] = []
    cohort = _parse_cohort(path, label_col, positive, found)
    if problems is not None:
        problems.extend(found)
    elif found:
        raise CohortError(f"{len(found)} problem(s) in the cohort table: " + "; ".join(map(str, found)))
    return cohort


def _parse_cohort(path: Path, label_col: str, positive: str, problems: list[Problem]) -> Cohort:
    unnamed_negative = f"not {positive.strip()}"   # class name while the table names no negative value
    empty = Cohort([], {}, {}, (unnamed_negative, positive.strip()), label_col, positive)
    try:
        table = read_table(path, CohortError)
    except CohortError as e:
        problems.append(Problem(str(path), str(e).removeprefix(f"{path}: ")))
        return empty
    wanted = ("case_id", "slide_id", label_col)
    missing = [c for c in wanted if c not in table.header]
    if missing:
        problems.append(Problem(str(path), f"missing column(s) {', '.join(missing)} "
                                           f"(columns: {', '.join(table.header)})"))
        return empty
    i_case, i_slide, i_label = (table.header.index(c) for c in wanted)

    def where(line: int) -> str:
        return f"{path} line {line}"

    written: dict[str, str] = {}                 # normalised label value -> first spelling
    value_counts: Counter[str] = Counter()
    case_label: dict[str, tuple[str, int]] = {}  # case -> (normalised label, line)
    conflicted: set[str] = set()
    slides: dict[str, list[str]] = {}
    seen_pair: dict[tuple[str, str], int] = {}
    slide_owner: dict[str, tuple[str, int]] = {}
    for line, cells in table.rows:
        case, slide, value = cells[i_case], slide_stem(cells[i_slide]), cells[i_label]
        if not case or not slide or not value:
            empty_cols = [n for n, v in zip(wanted, (case, slide, value)) if not v]
            problems.append(Problem(where(line), f"empty {', '.join(empty_cols)}"))
            continue
        unsafe = slide_id_problem(slide)
        if unsafe is not None:
            problems.append(Problem(where(line), unsafe))
            continue
        key = value.casefold()
        written.setdefault(key, value)
        value_counts[key] += 1
        if case not in case_label:
            case_label[case] = (key, line)
        elif case_label[case][0] != key and case not in conflicted:
            conflicted.add(case)
            first_key, first_line = case_label[case]
            problems.append(Problem(where(line), f"case {case} has conflicting labels {written[first_key]!r} "
                                                 f"(line {first_line}) and {value!r}"))
        if (case, slide) in seen_pair:
            problems.append(Problem(where(line), f"duplicate row for case {case}, slide {slide} "
                                                 f"(first at line {seen_pair[(case, slide)]})"))
            continue
        seen_pair[(case, slide)] = line
        if slide in slide_owner:
            other, other_line = slide_owner[slide]
            problems.append(Problem(where(line), f"slide {slide} is listed under case {case} and under case "
                                                 f"{other} (line {other_line})"))
            continue
        slide_owner[slide] = (case, line)
        slides.setdefault(case, []).append(slide)
    if not table.rows:
        problems.append(Problem(str(path), "no data rows"))

    pos_key = positive.strip().casefold()
    values = ", ".join(f"{written[k]!r} ({n} rows)" for k, n in value_counts.items())
    negatives = [k for k in written if k != pos_key]
    if written and pos_key not in written:
        problems.append(Problem(str(path), f"positive value {positive.strip()!r} does not occur in column "
                                           f"{label_col} (values: {values})"))
    elif len(written) > 2:
        problems.append(Problem(str(path), f"unknown label value(s): column {label_col} has {len(written)} "
                                           f"distinct values ({values}); it must have exactly two, "
                                           f"the positive {positive.strip()!r} and one negative"))
    elif len(written) == 1:
        problems.append(Problem(str(path), f"column {label_col} has only the positive value {values}; "
                                           f"a negative class is needed"))
    class_names = (written[negatives[0]] if negatives else unnamed_negative,
                   written.get(pos_key, positive.strip()))
    cases = [c for c in case_label if c not in conflicted and c in slides]
    return Cohort(
        cases=cases,
        labels={c: int(case_label[c][0] == pos_key) for c in cases},
        slides={c: slides[c] for c in cases},
        class_names=class_names,
        label_col=label_col,
        positive=positive,
    )


@dataclass(frozen=True)
class Split:
    """One cross-validation fold: disjoint case lists, each in cohort order."""

    fold: int
    train: list[str] = field(default_factory=list)
    val: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)


def min_cases_per_class(folds: int) -> int:
    """Fewest cases a class needs so every fold's test, val and train sets hold at least one of it."""
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    n = folds
    while n - math.ceil(n / folds) < 2:
        n += 1
    return n


def make_splits(
    cases: Cohort | Sequence[str],
    labels: Sequence[int] | Mapping[str, int] | None = None,
    *,
    folds: int = 5,
    seed: int = 0,
    ratios: tuple[float, float, float] = (7, 1, 2),
) -> list[Split]:
    """Case-level stratified K-fold splits.

    Args:
        cases: a ``Cohort``, or case ids (then ``labels`` is required: a sequence aligned with the cases or a
            mapping case -> 0/1).
        folds: K; every case is in exactly one fold's test set (a stratified partition).
        seed: the splits are a pure function of (cases, labels, folds, seed, ratios).
        ratios: train:val:test. The test share is 1/K by construction (the default matches 5 folds); the
            first two entries set the val share of the rest, stratified, at least one case per class.

    Raises:
        CohortError: a class has fewer cases than ``min_cases_per_class(folds)``.
    """
    if isinstance(cases, Cohort):
        labels = cases.labels
        cases = cases.cases
    if labels is None:
        raise ValueError("labels are required when cases is not a Cohort")
    ids = list(cases)
    y = np.array([labels[c] for c in ids] if isinstance(labels, Mapping) else list(labels), dtype=np.int64)
    if len(y) != len(ids) or len(set(ids)) != len(ids):
        raise ValueError("cases must be unique and aligned with labels")
    need = min_cases_per_class(folds)
    for cls, name in ((1, "positive"), (0, "negative")):
        have = int((y == cls).sum())
        if have < need:
            raise CohortError(f"the {name} class has {have} case(s); {folds}-fold splits need at least {need} "
                              f"per class (one in every fold's train, val and test set)")
    val_share = ratios[1] / (ratios[0] + ratios[1])

    rng = np.random.default_rng(seed)
    by_class = [rng.permutation(np.flatnonzero(y == cls)) for cls in (1, 0)]
    test_fold = np.empty(len(ids), dtype=np.int64)
    test_fold[np.concatenate(by_class)] = np.arange(len(ids)) % folds   # per class and overall balanced

    splits = []
    for k in range(folds):
        fold_rng = np.random.default_rng([seed, k])
        is_val = np.zeros(len(ids), dtype=bool)
        for cls in (1, 0):
            rest = fold_rng.permutation(np.flatnonzero((y == cls) & (test_fold != k)))
            n_val = min(max(1, round(len(rest) * val_share)), len(rest) - 1)
            is_val[rest[:n_val]] = True
        splits.append(Split(
            fold=k,
            train=[c for i, c in enumerate(ids) if test_fold[i] != k and not is_val[i]],
            val=[c for i, c in enumerate(ids) if is_val[i]],
            test=[c for i, c in enumerate(ids) if test_fold[i] == k],
        ))
    return splits


def save_splits(splits: Sequence[Split], out_dir: str | os.PathLike[str], labels: Mapping[str, int]) -> None:
    """Write ``out_dir/fold_K.csv`` (case_id, split, label) for every split."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for split in splits:
        with (out / f"fold_{split.fold}.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["case_id", "split", "label"])
            for name in SPLIT_NAMES:
                writer.writerows([case, name, labels[case]] for case in getattr(split, name))


def load_splits(splits_dir: str | os.PathLike[str], cases: Iterable[str] | None = None) -> list[Split]:
    """Read the splits written by ``save_splits``.

    Args:
        splits_dir: folder with ``fold_0.csv`` .. ``fold_{K-1}.csv``.
        cases: when given, the splits must cover exactly these cases (every fold).

    Raises:
        CohortError: missing/extra fold files, a malformed file, a case twice in a fold, or (with ``cases``)
            cases the splits do not match.
    """
    folder = Path(splits_dir)
    if not folder.is_dir():
        raise CohortError(f"{folder}: splits folder not found")
    numbered = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _FOLD_FILE.match(p.name)))
    if not numbered:
        raise CohortError(f"{folder}: no fold_K.csv files")
    if [k for k, _ in numbered] != list(range(len(numbered))):
        raise CohortError(f"{folder}: fold files must be numbered 0..K-1, found {[k for k, _ in numbered]}")
    wanted = set(cases) if cases is not None else None
    splits = []
    for k, path in numbered:
        table = read_table(path, CohortError)
        if "case_id" not in table.header or "split" not in table.header:
            raise CohortError(f"{path}: needs columns case_id and split (columns: {', '.join(table.header)})")
        i_case, i_split = table.header.index("case_id"), table.header.index("split")
        parts: dict[str, list[str]] = {name: [] for name in SPLIT_NAMES}
        seen: set[str] = set()
        for line, cells in table.rows:
            case, name = cells[i_case], cells[i_split]
            if name not in parts:
                raise CohortError(f"{path}: line {line}: split {name!r} is not one of {', '.join(SPLIT_NAMES)}")
            if case in seen:
                raise CohortError(f"{path}: line {line}: case {case} appears twice")
            seen.add(case)
            parts[name].append(case)
        if wanted is not None and seen != wanted:
            unknown, absent = sorted(seen - wanted), sorted(wanted - seen)
            raise CohortError(f"{path}: splits do not match the cohort ({len(unknown)} unknown case(s) "
                              f"[{preview(unknown)}], {len(absent)} cohort case(s) missing [{preview(absent)}])")
        splits.append(Split(fold=k, **parts))
    return splits


def preview(items: Sequence[str], limit: int = 5) -> str:
    """``'a, b, c, ...'``: the first ``limit`` items for a one-line message."""
    return ", ".join(items[:limit]) + (", ..." if len(items) > limit else "")


class SlideLabel(NamedTuple):
    """A labelled slide: the unit of training; metrics are computed per case."""

    slide_id: str
    case_id: str
    label: int


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
