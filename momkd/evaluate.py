"""Histology-only evaluation of a trained run on a cohort: each fold model and their mean (the paper's
external-cohort protocol). The mean of the fold probabilities is the model ``momkd export`` freezes."""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from momkd.metrics import case_and_slide_metrics
from momkd.train.checkpoint import load_checkpoint
from momkd.train.data import SlideStore
from momkd.train.fit import resolve_device
from momkd.train.predict import predict_slides
from momkd.train.run import TrainingData
from momkd.train.runfolder import fold_dirs, mean_threshold, write_json, write_text


def evaluate_run(run_dir: Path, data: TrainingData, out_dir: Path, device: str = "auto",
                 log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Predict every slide of ``data`` with every fold model; write ``predictions.csv`` and ``metrics.json``.

    Each fold model is scored at its own validation threshold, the fold mean at the mean of the fold thresholds
    (the threshold the exported model carries). ``metrics.json``: ``{"folds": [{"fold", **per case,
    "slide": per slide}], "mean_model": {**per case, "slide": per slide}}``, where per case is ``binary_metrics``
    of the mean slide probability per case (auc, acc, f1 = positive-class F1, f1_macro, threshold, n, n_pos) and
    per slide the same of every slide on its own (the unit of the authors' test.py and the paper's Table 1).
    Both files are written atomically (metrics.json first). ``log`` gets a line per fold model as it goes.
    """
    torch_device = resolve_device(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    folds = [load_checkpoint(d, torch_device) for d in fold_dirs(run_dir)]
    meta0 = folds[0][1]
    store = SlideStore(data.slide_paths, k=meta0["model_config"]["k"],
                       direction=meta0["model_config"]["graph_direction"], expected_dim=meta0["in_dim"])
    items = data.items(data.cohort.cases)
    slide_ids = [it.slide_id for it in items]
    say = log or (lambda message: None)
    say(f"evaluating {len(folds)} fold model(s) of {run_dir} on {len(slide_ids)} slides ({torch_device})")
    per_fold: dict[int, np.ndarray] = {}
    for model, meta in folds:
        t0 = time.perf_counter()
        per_fold[meta["fold"]] = predict_slides(model, store, slide_ids, torch_device)
        say(f"fold {meta['fold']} model: {len(slide_ids)} slides predicted ({time.perf_counter() - t0:.1f} s)")
    mean_probs = np.mean(np.stack(list(per_fold.values())), axis=0)

    metrics: dict[str, Any] = {"folds": []}
    for _, meta in folds:
        case, slide = case_and_slide_metrics(items, per_fold[meta["fold"]], meta["threshold"])
        metrics["folds"].append({"fold": meta["fold"], **case, "slide": slide})
    threshold = mean_threshold([meta["threshold"] for _, meta in folds])
    case, slide = case_and_slide_metrics(items, mean_probs, threshold)
    metrics["mean_model"] = {**case, "slide": slide}
    write_json(out_dir / "metrics.json", metrics)

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["slide_id", "case_id", "label", *[f"probability_fold_{k}" for k in per_fold], "probability",
                     "prediction"])
    class_names = meta0["class_names"]
    for i, it in enumerate(items):
        writer.writerow([it.slide_id, it.case_id, it.label, *[f"{per_fold[k][i]:.9g}" for k in per_fold],
                         f"{mean_probs[i]:.9g}", class_names[int(mean_probs[i] >= threshold)]])
    write_text(out_dir / "predictions.csv", buf.getvalue())
    return metrics
