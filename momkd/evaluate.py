"""Histology-only evaluation of a trained run on a cohort: each fold model and their mean (the paper's
external-cohort protocol). The mean of the fold probabilities is the model ``momkd export`` freezes."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from momkd.data.cohort import case_level
from momkd.metrics import binary_metrics
from momkd.train.checkpoint import fold_dirs, load_checkpoint
from momkd.train.data import SlideStore
from momkd.train.fit import resolve_device
from momkd.train.predict import predict_slides
from momkd.train.run import TrainingData


def evaluate_run(run_dir: Path, data: TrainingData, out_dir: Path, device: str = "auto") -> dict[str, Any]:
    """Predict every slide of ``data`` with every fold model; write ``predictions.csv`` and ``metrics.json``.

    Metrics are case-level (mean slide probability per case), each fold at its own validation threshold, the
    fold mean at the mean of the fold thresholds (the threshold the exported model carries).
    """
    torch_device = resolve_device(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    folds = [load_checkpoint(d, torch_device) for d in fold_dirs(run_dir)]
    meta0 = folds[0][1]
    store = SlideStore(data.slide_paths, k=meta0["model_config"]["k"], direction=meta0["model_config"]["graph_direction"],
                       expected_dim=meta0["in_dim"])
    items = data.items(data.cohort.cases)
    slide_ids = [it.slide_id for it in items]
    per_fold = {meta["fold"]: predict_slides(model, store, slide_ids, torch_device) for model, meta in folds}
    mean_probs = np.mean(np.stack(list(per_fold.values())), axis=0)

    metrics: dict[str, Any] = {"folds": []}
    for model, meta in folds:
        _, y, p = case_level(items, per_fold[meta["fold"]])
        metrics["folds"].append({"fold": meta["fold"], **binary_metrics(y, p, meta["threshold"])})
    threshold = float(np.mean([meta["threshold"] for _, meta in folds]))
    _, y, p = case_level(items, mean_probs)
    metrics["mean_model"] = binary_metrics(y, p, threshold)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))

    with (out_dir / "predictions.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["slide_id", "case_id", "label", *[f"probability_fold_{k}" for k in per_fold], "probability", "prediction"])
        class_names = meta0["class_names"]
        for i, it in enumerate(items):
            writer.writerow([it.slide_id, it.case_id, it.label, *[f"{per_fold[k][i]:.9g}" for k in per_fold],
                             f"{mean_probs[i]:.9g}", class_names[int(mean_probs[i] >= threshold)]])
    return metrics
