"""``momkd demo``: the whole job on the built-in synthetic cohort."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from momkd.cli.console import CliConsole, Quiet, log_lines, progress_console
from momkd.cli.errors import handle_errors
from momkd.errors import MomkdError

console = CliConsole(stderr=True)

# 3 folds, not 5: the ONNX export of the fold ensemble is the demo's largest cost and grows with the folds (5 folds
# took twice the CPU time of 3, measured); at 60 cases and 12 epochs MoMKD still clearly beats ABMIL on the external
# cohort, at 40 cases and 8 epochs neither learns.
DEMO_CASES, DEMO_EPOCHS, DEMO_FOLDS = 60, 12, 3


@handle_errors(missing="momkd demo needs the training and export extras (pip install 'momkd[train,export]')",
               interrupted="remove {out} and rerun the same command to start the demo again")
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for everything the demo writes (must not hold a finished demo).")] = Path("runs/demo"),
    cases: Annotated[int, typer.Option(help="Synthetic training cases.", min=20)] = DEMO_CASES,
    epochs: Annotated[int, typer.Option(help="Maximum epochs per fold.", min=1)] = DEMO_EPOCHS,
    folds: Annotated[int, typer.Option(help="Cross-validation folds (the exported ensemble has one model per fold).", min=2)] = DEMO_FOLDS,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    quiet: Quiet = False,
) -> None:
    """Synthetic cohort → validate → train MoMKD and ABMIL → evaluate on an external cohort → export → infer.

    The defaults are sized for a few minutes on a 2-core CPU; the time is mostly the ONNX export (a fixed cost
    that grows with --folds) and training (grows with --cases x --epochs x --folds).
    """
    from momkd.evaluate import evaluate_run
    from momkd.export import export_run
    from momkd.runtime.pipeline import run_inference
    from momkd.synth import make_synthetic_cohort
    from momkd.train.run import OmicsOptions, train_run
    from momkd.train.setup import build_configs, load_training_data

    progress = progress_console(console, quiet)
    progress.rule("1. synthetic cohorts")
    train_set = make_synthetic_cohort(out / "data", cases=cases, seed=seed)
    external = make_synthetic_cohort(out / "external", cases=max(20, cases // 2), seed=seed + 1000)
    progress.print(f"training cohort: {train_set.cohort_csv}\nexternal cohort: {external.cohort_csv}")

    progress.rule("2. validate")
    data = load_training_data(train_set.cohort_csv, train_set.features_dir, train_set.omics_path,
                              train_set.label_col, train_set.positive, folds=folds, console=progress)
    progress.print(f"{len(data.cohort.cases)} cases, {len(data.slide_paths)} slides, feature dim {data.feature_dim}: ok")

    summaries = {}
    for model in ("momkd", "abmil"):
        progress.rule(f"3. train {model} ({folds} folds)")
        model_cfg, loss_cfg, train_cfg = build_configs("paper", model=model, epochs=epochs, folds=folds, seed=seed,
                                                       device=device, patience=max(3, epochs // 3))
        summaries[model] = train_run(data, out / model, model_cfg, loss_cfg, train_cfg, OmicsOptions(n_genes=768),
                                     "paper", splits_dir=(out / "momkd" / "splits") if model == "abmil" else None,
                                     console=progress)

    progress.rule("4. evaluate on the external cohort (histology only)")
    ext = load_training_data(external.cohort_csv, external.features_dir, None, external.label_col,
                             external.positive, folds=1, console=progress)
    ext_metrics = {m: evaluate_run(out / m, ext, out / f"external_{m}", device=device, log=log_lines(progress))
                   for m in summaries}

    progress.rule("5. export the MoMKD fold ensemble to ONNX")
    export_run(out / "momkd", out / "model", "onnx", log=log_lines(progress))

    progress.rule("6. infer the external slide folder with the exported model (ONNX Runtime, no PyTorch)")
    inferred = run_inference(out / "model", external.features_dir, out / "infer", backend="onnxruntime")
    console.print(f"{inferred.n_ok} ok, {inferred.n_failed} failed in {inferred.elapsed_s:.1f} s "
                  f"({inferred.backend}, {inferred.device})")
    gap = _max_probability_gap(out / "external_momkd" / "predictions.csv", inferred.predictions_path)
    console.print(f"max |p(infer) - p(evaluate)| over {inferred.n_ok} slides: {gap:.2e}")

    table = Table(title=f"synthetic cohort, {folds}-fold CV (test, mean ± std) and external cohort (mean of fold models)")
    for col in ("model", "CV AUC", "CV ACC", "CV F1", "external AUC", "external ACC", "external F1"):
        table.add_column(col)
    for model, s in summaries.items():
        e = ext_metrics[model]["mean_model"]
        table.add_row(model, *(f"{s['mean'][k]:.3f} ± {s['std'][k]:.3f}" for k in ("auc", "acc", "f1")),
                      *(f"{e[k]:.3f}" for k in ("auc", "acc", "f1")))
    CliConsole().print(table)
    console.print(f"runs: {out / 'momkd'}, {out / 'abmil'}; external evaluation: {out / 'external_momkd'}; "
                  f"exported model: {out / 'model'}; inference: {out / 'infer' / 'predictions.csv'}")


def _max_probability_gap(evaluated_csv: Path, inferred_csv: Path) -> float:
    """Largest |probability| difference between ``momkd evaluate`` and ``momkd infer`` rows of the same slides."""
    import csv

    with open(evaluated_csv, newline="") as f:
        evaluated = {row["slide_id"]: float(row["probability"]) for row in csv.DictReader(f)}
    with open(inferred_csv, newline="") as f:
        inferred = {row["slide_id"]: float(row["probability"]) for row in csv.DictReader(f) if row["status"] == "ok"}
    if set(inferred) != set(evaluated):
        raise MomkdError(f"{inferred_csv}: slides differ from {evaluated_csv}")
    return max(abs(inferred[s] - evaluated[s]) for s in evaluated)
