"""Whole-cohort validation: every problem at once, one line each, and the validated data for reuse.

``validate_cohort`` checks the cohort table, reads every slide file fully (the same reader training and
inference use), checks feature dims and encoders agree, loads the omics and checks every case has them and that
the omics transform training will fit can be fitted on them (``OmicsTransform.check``, the check ``fit`` itself
applies), and checks each class has enough cases for the folds. Training refuses to start unless ``report.ok``;
it then reuses ``report.cohort``, ``report.slide_paths`` and ``report.omics`` without parsing anything again.
``report.warnings`` are worth a line but refuse nothing (genes constant across the cases).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from momkd.data.cohort import Cohort, Problem, load_cohort, min_cases_per_class
from momkd.data.omics import OmicsTable, OmicsTransform, load_omics
from momkd.data.slide import read_slide
from momkd.errors import OmicsError, SlideError

__all__ = ["CohortReport", "Problem", "validate_cohort"]


@dataclass
class CohortReport:
    """The outcome of ``validate_cohort``.

    Attributes:
        problems: every problem found (empty when the cohort is usable).
        summary: cases, slides, classes (cases per class), patches (min/median/max per slide), feature_dim,
            encoder, genes, omics_cases, unlisted_files (``.h5`` files no cohort row names).
        cohort: the parsed cohort (best effort when there are problems).
        slide_paths: slide id -> ``.h5`` path, for every slide that passed all checks.
        omics: the omics table, when given and loadable.
        warnings: usable but worth a line each (genes constant across the cohort's cases).
    """

    problems: list[Problem]
    summary: dict[str, Any]
    cohort: Cohort
    slide_paths: dict[str, Path] = field(default_factory=dict)
    omics: OmicsTable | None = None
    warnings: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def validate_cohort(
    cohort_csv: str | os.PathLike[str],
    features_dir: str | os.PathLike[str],
    omics_path: str | os.PathLike[str] | None,
    label_col: str,
    positive: str,
    folds: int = 5,
    expected_dim: int | None = None,
    require_omics: bool = True,
    progress: Callable[[int, int], None] | None = None,
    omics_transform: OmicsTransform | None = None,
) -> CohortReport:
    """Check a cohort end to end and collect every problem.

    Args:
        cohort_csv: the cohort table (see ``momkd.data.cohort``).
        features_dir: folder holding ``{slide_id}.h5`` for every slide.
        omics_path: ``.npy`` folder or CSV/TSV matrix, or ``None`` (histology only).
        label_col, positive: the label column and its positive value.
        folds: planned cross-validation folds; below 2 (evaluation) the class-size check is skipped.
        expected_dim: the feature dim a model needs; ``None``: the slides must agree among themselves.
        require_omics: with ``omics_path``, a case without omics is a problem.
        progress: called as ``progress(done, total)`` after each slide file.
        omics_transform: the (unfitted) transform training will fit, e.g. ``OmicsTransform(log2=False)`` for
            ``--no-log2``: its ``check`` over the cohort's cases with omics adds its problems and warnings.
            ``None``: only the checks every setting shares (genes constant across the cases).

    Returns:
        ``CohortReport``; never raises for bad data.
    """
    cohort_csv, features_dir = Path(cohort_csv), Path(features_dir)
    problems: list[Problem] = []
    cohort = load_cohort(cohort_csv, label_col, positive, problems)

    case_of = {slide_id: case for case in cohort.cases for slide_id in cohort.slides[case]}

    def where(slide_id: str) -> str:
        return f"{features_dir / slide_id}.h5 (case {case_of[slide_id]})"

    slide_paths: dict[str, Path] = {}
    dims: dict[str, int] = {}
    encoders: dict[str, str] = {}
    patches: list[int] = []
    unlisted = 0
    if not features_dir.is_dir():
        problems.append(Problem(str(features_dir), "features folder not found"))
    else:
        for done, slide_id in enumerate(case_of, start=1):
            path = features_dir / f"{slide_id}.h5"
            if not path.is_file():
                problems.append(Problem(where(slide_id), f"no feature file for slide {slide_id}"))
            else:
                try:
                    slide = read_slide(path, expected_dim=expected_dim)
                except SlideError as e:
                    problems.append(Problem(where(slide_id), e.message))
                else:
                    slide_paths[slide_id] = path
                    dims[slide_id] = slide.feature_dim
                    patches.append(slide.n_patches)
                    if slide.attrs.encoder:
                        encoders[slide_id] = slide.attrs.encoder
            if progress is not None:
                progress(done, len(case_of))
        unlisted = sum(1 for p in features_dir.glob("*.h5") if p.stem not in case_of)

    feature_dim = expected_dim
    for what, values in (("feature dim", dims), ("encoder", encoders)):
        majority, outliers = _majority(values)
        if what == "feature dim" and feature_dim is None:
            feature_dim = majority
        for slide_id, value in outliers.items():
            slide_paths.pop(slide_id, None)
            problems.append(Problem(where(slide_id), f"{what} {value} differs from the other "
                                    f"slides' {majority} ({sum(v == majority for v in values.values())} of "
                                    f"{len(values)} slides)"))

    omics: OmicsTable | None = None
    warnings: list[Problem] = []
    if omics_path is not None:
        try:
            omics = load_omics(omics_path)
        except OmicsError as e:
            problems.append(Problem("omics", str(e)))
        else:
            if require_omics:
                problems += [Problem(f"case {c}", f"no omics in {omics_path}") for c in cohort.cases if c not in omics]
            with_omics = [c for c in cohort.cases if c in omics]
            if with_omics:   # without the training settings, the identity transform checks what all settings share
                transform = omics_transform if omics_transform is not None else OmicsTransform(log2=False, raw=True)
                checked = transform.check(omics, with_omics)
                problems += [Problem("omics", p) for p in checked.problems]
                warnings += [Problem("omics", w) for w in checked.warnings]

    counts = cohort.class_counts()
    if folds >= 2 and cohort.cases and all(counts.values()):
        need = min_cases_per_class(folds)
        problems += [Problem(str(cohort_csv), f"class {name!r} has {n} case(s); {folds}-fold splits need at least "
                                              f"{need} per class") for name, n in counts.items() if n < need]

    encoder_names = sorted(set(encoders.values()))
    summary = {
        "cases": len(cohort.cases),
        "slides": len(cohort.slide_ids),
        "classes": counts,
        "patches": {"min": int(np.min(patches)), "median": float(np.median(patches)), "max": int(np.max(patches))}
        if patches else None,
        "feature_dim": feature_dim,
        "encoder": encoder_names[0] if len(encoder_names) == 1 else None,
        "genes": len(omics.genes) if omics is not None else None,
        "omics_cases": sum(c in omics for c in cohort.cases) if omics is not None else None,
        "unlisted_files": unlisted,
    }
    return CohortReport(problems=problems, summary=summary, cohort=cohort, slide_paths=slide_paths, omics=omics,
                        warnings=warnings)


def _majority(values: Mapping[str, Hashable]) -> tuple[Any, dict[str, Any]]:
    """(most common value, ties to the first seen; the entries that differ from it)."""
    if not values:
        return None, {}
    majority = Counter(values.values()).most_common(1)[0][0]
    return majority, {k: v for k, v in values.items() if v != majority}
