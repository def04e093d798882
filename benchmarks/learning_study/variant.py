"""Train a MoMKD variant (the paper preset with config fields overridden) on some folds of a study cohort.

    python benchmarks/learning_study/variant.py OUT_DIR --cohort COHORT_DIR [--splits SPLITS_DIR] \\
        [--folds 0 1] [--epochs 20] [--set model.tau=0.05] [--set loss.lambda_mem=0]

The run folder is the same as ``momkd train`` writes (history.csv, checkpoints, summary.json over the folds run).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from momkd.train.run import OmicsOptions, train_run
from momkd.train.setup import build_configs, load_training_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--cohort", type=Path, required=True, help="a `momkd synth` folder")
    parser.add_argument("--splits", type=Path, help="the splits folder of an earlier run (default: new 5-fold splits)")
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=JSON",
                        help="SECTION is model or loss, e.g. model.tau=0.05")
    args = parser.parse_args()

    model_cfg, loss_cfg, train_cfg = build_configs("paper", epochs=args.epochs, device="cpu")
    changes: dict[str, dict] = {"model": {}, "loss": {}}
    for item in args.set:
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        changes[section][name] = json.loads(value)
    model_cfg, loss_cfg = model_cfg.replace(**changes["model"]), loss_cfg.replace(**changes["loss"])
    data = load_training_data(args.cohort / "cohort.csv", args.cohort / "features", args.cohort / "omics.csv",
                              "her2_status", "Positive")
    summary = train_run(data, args.out, model_cfg, loss_cfg, train_cfg, OmicsOptions(), "paper",
                        splits_dir=args.splits, only_folds=args.folds)
    print(" ".join(f"fold {f['fold']}: test AUC {f['test']['auc']:.3f}" for f in summary["folds"]))


if __name__ == "__main__":
    main()
