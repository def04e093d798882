"""Accuracy gates of a reduced-precision graph against the fp32 graph it was made from, at export.

Slides: every exported fold's validation and test slides (``RUN/splits/fold_K.csv`` + the cohort CSV and
features folder named in ``RUN/config.json``, the way ``momkd.export.verify`` finds them), each read once and run
through both graphs by ONNX Runtime on the CPU, one slide per call. Where the cohort data is gone, the export's
verification slides (synthetic) stand in, and no AUC can be computed (said so in the manifest).

Per group ("fold K val", "fold K test") and over all slides: max |p_reduced - p_fp32|, decision flips at the
model's threshold, and the slide-level AUC of both (where the group has both classes). A graph passes when
max |dp| <= ``max_abs_dp``, flips <= ``max_flips`` and every group's |dAUC| <= ``max_abs_dauc``
(defaults 0.02, 0, 0.005: issue 14).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from momkd.data.batch import GraphSlide, load_graph_slide
from momkd.errors import MomkdError, SlideError
from momkd.metrics import roc_auc


class GateError(MomkdError):
    """A reduced-precision graph failed its accuracy gates (and was not forced), or the gates cannot run."""


@dataclass(frozen=True)
class GateLimits:
    """The accuracy a reduced-precision graph must keep against fp32."""

    max_abs_dp: float = 0.02     # max |delta probability| over all gate slides
    max_flips: int = 0           # decisions that change at the model's threshold
    max_abs_dauc: float = 0.005  # |AUC_reduced - AUC_fp32| in every fold's val and test set

    def __post_init__(self) -> None:
        if self.max_abs_dp < 0 or self.max_flips < 0 or self.max_abs_dauc < 0:
            raise GateError(f"gate limits must be >= 0, got {asdict(self)}")


@dataclass
class GateSlide:
    """One slide of the gates: where it is, its label (None: unknown) and the groups it belongs to."""

    slide_id: str
    label: int | None
    groups: list[str] = field(default_factory=list)
    path: Path | None = None          # read when the gates run ...
    slide: GraphSlide | None = None   # ... or already in memory (the synthetic stand-ins)


def _features_dir(run_dir: Path, data: dict[str, Any]) -> Path | None:
    """The cohort's features folder named by config.json (relative names: as given, else under the run)."""
    if not data.get("features"):
        return None
    features = Path(data["features"])
    if not features.is_absolute() and not features.exists() and (run_dir / features).exists():
        features = run_dir / features
    return features if features.is_dir() else None


def fold_slides(run_dir: Path, config: dict[str, Any], folds: Sequence[int],
                splits: Sequence[str] = ("val", "test")) -> tuple[list[GateSlide], list[str]]:
    """Every exported fold's slides of the named ``splits`` (``"train"``, ``"val"``, ``"test"``) that exist on
    disk, with their labels; (slides, notes). Empty when the cohort, its splits or its features are gone."""
    from momkd.data.cohort import load_cohort, load_splits, slide_stem
    from momkd.train.runfolder import SPLITS

    notes: list[str] = []
    data = config.get("data") or {}
    features = _features_dir(run_dir, data)
    cohort_csv = Path(data["cohort"]) if data.get("cohort") else None
    if features is None or cohort_csv is None or not cohort_csv.is_file():
        notes.append("cohort CSV or features folder named in config.json is gone")
        return [], notes
    try:
        cohort = load_cohort(cohort_csv, str(data.get("label_col")), str(data.get("positive")))
        by_fold = {s.fold: s for s in load_splits(run_dir / SPLITS)}
    except (OSError, MomkdError) as e:
        notes.append(f"cannot read the cohort or splits ({e})")
        return [], notes
    by_id: dict[str, GateSlide] = {}
    for fold in folds:
        if fold not in by_fold:
            notes.append(f"{run_dir / SPLITS} has no fold {fold}")
            continue
        for split_name in splits:
            cases = getattr(by_fold[fold], split_name)
            for case in sorted(cases):
                for slide_id in cohort.slides.get(case, []):
                    stem = slide_stem(slide_id)
                    path = next((features / f"{stem}{ext}" for ext in (".h5", ".hdf5")
                                 if (features / f"{stem}{ext}").is_file()), None)
                    if path is None:
                        continue
                    item = by_id.setdefault(stem, GateSlide(stem, cohort.labels.get(case), path=path))
                    item.groups.append(f"fold {fold} {split_name}")
    return list(by_id.values()), notes


def stand_in_slides(slides: Sequence[GraphSlide]) -> list[GateSlide]:
    """The export's verification slides as unlabelled gate slides (when the cohort data is gone)."""
    return [GateSlide(s.slide_id, None, ["verification slides"], slide=s) for s in slides]


Runner = Callable[[np.ndarray, np.ndarray, np.ndarray], dict[str, np.ndarray]]


def slide_probabilities(items: Sequence[GateSlide], runners: Sequence[Runner], k: int, direction: str,
                        feature_dim: int, log: Callable[[str], None] | None = None
                        ) -> tuple[list[GateSlide], np.ndarray, list[str]]:
    """Read each slide once and run it through every runner; (slides that ran, (n_slides, n_runners)
    probabilities, notes on slides that could not be read)."""
    say = log or (lambda _m: None)
    ran, rows, notes = [], [], []
    for i, item in enumerate(items):
        slide = item.slide
        if slide is None and item.path is not None:
            try:
                slide = load_graph_slide(item.path, k, direction, slide_id=item.slide_id, expected_dim=feature_dim,
                                         keep_coords=False)
            except SlideError as e:
                notes.append(f"skipped {e}")
                continue
        if slide is None or slide.features is None:
            continue
        offsets = np.array([0, slide.n], np.int64)
        rows.append([float(run(slide.features, slide.neighbors, offsets)["probability"][0]) for run in runners])
        ran.append(item)
        if (i + 1) % 50 == 0:
            say(f"  gates: {i + 1} of {len(items)} slides")
    return ran, np.asarray(rows, np.float64).reshape(len(ran), len(runners)), notes


def _auc(labels: list[int | None], p: np.ndarray) -> float | None:
    if any(y is None for y in labels) or len(set(labels)) < 2:
        return None
    return float(roc_auc(np.asarray(labels, np.int64), p))


def gate_report(items: Sequence[GateSlide], p_fp32: np.ndarray, p_reduced: np.ndarray, threshold: float,
                limits: GateLimits) -> dict[str, Any]:
    """The manifest's gates section: per group and overall max |dp|, flips, AUCs; ``passed`` and, where it did
    not pass, ``failed`` (one reason per broken limit)."""
    dp = np.abs(p_reduced - p_fp32)
    flipped = (p_fp32 >= threshold) != (p_reduced >= threshold)
    groups: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(g for item in items for g in item.groups):
        idx = [i for i, item in enumerate(items) if name in item.groups]
        labels = [items[i].label for i in idx]
        auc32, auc_r = _auc(labels, p_fp32[idx]), _auc(labels, p_reduced[idx])
        groups[name] = {"n_slides": len(idx), "max_abs_dp": float(dp[idx].max()),
                        "decision_flips": int(flipped[idx].sum()), "auc_fp32": auc32, "auc_reduced": auc_r,
                        "abs_dauc": None if auc32 is None or auc_r is None else abs(auc_r - auc32)}
    daucs = [g["abs_dauc"] for g in groups.values() if g["abs_dauc"] is not None]
    report: dict[str, Any] = {
        "limits": asdict(limits), "threshold": float(threshold), "n_slides": len(items),
        "max_abs_dp": float(dp.max()) if len(dp) else 0.0, "decision_flips": int(flipped.sum()),
        "max_abs_dauc": max(daucs) if daucs else None, "groups": groups}
    failed = []
    if not len(items):
        failed.append("no slide could be run")
    if report["max_abs_dp"] > limits.max_abs_dp:
        failed.append(f"max |dp| {report['max_abs_dp']:.3g} > {limits.max_abs_dp:g}")
    if report["decision_flips"] > limits.max_flips:
        failed.append(f"{report['decision_flips']} decision flip(s) at threshold {threshold:.3f} > {limits.max_flips}")
    if daucs and max(daucs) > limits.max_abs_dauc:
        worst = max(groups, key=lambda g: groups[g]["abs_dauc"] or 0.0)
        failed.append(f"|dAUC| {max(daucs):.3g} > {limits.max_abs_dauc:g} ({worst})")
    report["passed"] = not failed
    if failed:
        report["failed"] = failed
    return report
