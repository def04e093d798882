"""Tabulate a run_study.sh folder (markdown): mean ± std test metrics per model, paired per-fold differences, and
each MoMKD run's memory usage at the last epoch (history.csv: active ratio / perplexity per bank, per fold).

    python benchmarks/learning_study/summarize.py OUT_DIR
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

RUNS = {"abmil": "ABMIL", "paper": "MoMKD paper", "no_distill": "MoMKD paper, no distillation (alpha 0, 0)",
        "official": "MoMKD official"}
PAIRS = (("paper", "abmil"), ("paper", "no_distill"), ("official", "paper"), ("official", "abmil"))
METRICS = ("auc", "acc", "f1")


def main(out: Path) -> None:
    summaries = {run: json.loads((out / run / "summary.json").read_text())
                 for run in RUNS if (out / run / "summary.json").is_file()}
    walls = dict(line.split() for line in (out / "wall_times.txt").read_text().splitlines()) \
        if (out / "wall_times.txt").is_file() else {}
    cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True, text=True)
                .stdout.splitlines() if line.startswith("Model name")), "unknown")
    print(f"CPU: {cpu}\n")
    print("| model | test AUC | test ACC | test F1 | per-fold test AUC | epochs run (best) | wall |")
    print("|---|---|---|---|---|---|---|")
    for run, s in summaries.items():
        cells = [f"{s['mean'][m]:.3f} ± {s['std'][m]:.3f}" for m in METRICS]
        folds = " ".join(f"{f['test']['auc']:.3f}" for f in s["folds"])
        epochs = " ".join(f"{f['epochs_run']}({f['best_epoch']})" for f in s["folds"])
        wall = f"{int(walls[run]) / 60:.1f} min" if run in walls else "?"
        print(f"| {RUNS[run]} | {' | '.join(cells)} | {folds} | {epochs} | {wall} |")
    print("\nPaired per-fold differences of test AUC (same splits):\n")
    print("| difference | per fold | mean ± std | folds > 0 |")
    print("|---|---|---|---|")
    for a, b in PAIRS:
        if a in summaries and b in summaries:
            d = np.array([fa["test"]["auc"] - fb["test"]["auc"]
                          for fa, fb in zip(summaries[a]["folds"], summaries[b]["folds"], strict=True)])
            print(f"| {RUNS[a]} − {RUNS[b]} | {' '.join(f'{x:+.3f}' for x in d)} | "
                  f"{d.mean():+.3f} ± {d.std(ddof=1):.3f} | {(d > 0).sum()}/{len(d)} |")
    print("\nMemory usage at the last epoch (training patches of each bank's class), per fold:\n")
    print("| model | C+ active | C+ perplexity | C- active | C- perplexity |")
    print("|---|---|---|---|---|")
    for run, s in summaries.items():
        if s["model"] != "momkd":
            continue
        last = [list(csv.DictReader((out / run / f"fold_{f['fold']}" / "history.csv").open()))[-1] for f in s["folds"]]
        cells = [" ".join(f"{float(r[key]):.3f}" if "active" in key else f"{float(r[key]):.2f}" for r in last)
                 for key in ("pos_active", "pos_perplexity", "neg_active", "neg_perplexity")]
        print(f"| {RUNS[run]} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
