"""``momkd train`` and ``momkd evaluate``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from momkd.cli.choices import GatImpl, MemoryUpdate, ModelName, Preset
from momkd.cli.console import CliConsole, Quiet, log_lines, progress_console
from momkd.cli.errors import handle_errors

console = CliConsole(stderr=True)

CohortOpt = Annotated[Path, typer.Option("--cohort", help="Cohort CSV: case_id, slide_id, label column.", exists=True, dir_okay=False)]
FeaturesOpt = Annotated[Path, typer.Option("--features", help="Folder of per-slide .h5 feature files.", exists=True, file_okay=False)]
LabelOpt = Annotated[str, typer.Option("--label-col", help="Name of the label column in the cohort CSV.")]
PositiveOpt = Annotated[str, typer.Option("--positive", help="Label value that counts as positive (case-insensitive).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]


@handle_errors(missing="momkd train needs PyTorch (pip install 'momkd[train]')", interrupted="{out} has no finished run; rerun the same command with --resume to continue it")
def train(
    cohort: CohortOpt,
    features: FeaturesOpt,
    label_col: LabelOpt,
    positive: PositiveOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder to create.")],
    omics: Annotated[Optional[Path], typer.Option("--omics", help="Omics: folder of per-case .npy or a CSV/TSV matrix with case_id.", exists=True)] = None,
    folds: Annotated[int, typer.Option(help="Cross-validation folds (train/val/test 7:1:2 per fold for 5).", min=2)] = 5,
    epochs: Annotated[Optional[int], typer.Option(help="Maximum epochs per fold (default 50).", min=1)] = None,
    preset: Annotated[Preset, typer.Option(help="paper: the paper's settings; official: the authors' released code.")] = "paper",
    model: Annotated[ModelName, typer.Option(help="momkd, or the histology-only ABMIL baseline.")] = "momkd",
    seed: Annotated[int, typer.Option(help="Random seed (splits, initialisation, sampling).")] = 0,
    device: DeviceOpt = "auto",
    memory_size: Annotated[Optional[int], typer.Option(help="Codes per class memory bank (default 16).", min=1)] = None,
    memory_update: Annotated[Optional[MemoryUpdate], typer.Option(help="gradient (paper), ema (momentum m) or fixed.")] = None,
    ema_momentum: Annotated[Optional[float], typer.Option(help="Momentum m of the EMA memory update.", min=0.0, max=1.0)] = None,
    alpha_omics: Annotated[Optional[float], typer.Option(help="Weight of the omics alignment (0 = ablation).", min=0.0)] = None,
    alpha_wsi: Annotated[Optional[float], typer.Option(help="Weight of the WSI alignment (0 = ablation).", min=0.0)] = None,
    no_recon: Annotated[bool, typer.Option("--no-recon", help="Ablation: drop the omics reconstruction loss.")] = False,
    gat_impl: Annotated[Optional[GatImpl], typer.Option(help="dense (fast, exportable) or pyg (torch-geometric GATv2Conv).")] = None,
    n_genes: Annotated[int, typer.Option(help="Top-variance genes kept (fitted on each fold's training cases).", min=1)] = 768,
    genes: Annotated[Optional[Path], typer.Option(help="Text file with one gene per line, instead of top-variance selection.", exists=True, dir_okay=False)] = None,
    no_log2: Annotated[bool, typer.Option("--no-log2", help="Omics are already log-transformed.")] = False,
    omics_raw: Annotated[bool, typer.Option("--omics-raw", help="Feed each case's omics vector as stored (every gene, no log2, selection or z-score), as the authors' code feeds its .npy vectors.")] = False,
    splits: Annotated[Optional[Path], typer.Option(help="Reuse the splits folder of an earlier run.", exists=True, file_okay=False)] = None,
    patience: Annotated[Optional[int], typer.Option(help="Early-stopping patience in epochs (default 10).", min=1)] = None,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate (default 2e-4).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Empty --out first when it holds an earlier (or killed) momkd run.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted run in --out (same arguments): finished folds are kept, the interrupted fold continues after its last complete epoch.")] = False,
    quiet: Quiet = False,
) -> None:
    """Train MoMKD (or ABMIL) with cross-validation. Validates the whole cohort first and refuses bad data."""
    from momkd.metrics import auc_text
    from momkd.train.setup import build_configs, load_training_data
    from momkd.train.run import OmicsOptions, train_run

    model_cfg, loss_cfg, train_cfg = build_configs(
        preset, model=model, epochs=epochs, folds=folds, seed=seed, device=device, memory_size=memory_size,
        memory_update=memory_update, ema_momentum=ema_momentum, alpha_omics=alpha_omics, alpha_wsi=alpha_wsi,
        no_recon=no_recon, gat_impl=gat_impl, patience=patience, lr=lr,
    )
    gene_list = [g.strip() for g in genes.read_text().splitlines() if g.strip()] if genes else None
    omics_opts = OmicsOptions(log2=not (no_log2 or omics_raw), n_genes=n_genes, genes=gene_list, raw=omics_raw)
    data = load_training_data(cohort, features, omics if model == "momkd" else None, label_col, positive,
                              folds=folds, console=console, omics_opts=omics_opts)
    summary = train_run(data, out, model_cfg, loss_cfg, train_cfg, omics_opts,
                        preset, splits_dir=splits, console=progress_console(console, quiet), overwrite=overwrite,
                        resume=resume)
    m, s, ms, ss = summary["mean"], summary["std"], summary["mean_slide"], summary["std_slide"]
    console.print(f"[bold]{model}[/bold] test per case: AUC {auc_text(m['auc'], s['auc'])}, "
                  f"ACC {m['acc']:.3f} ± {s['acc']:.3f}, F1 {m['f1']:.3f} ± {s['f1']:.3f}, "
                  f"macro-F1 {m['f1_macro']:.3f} ± {s['f1_macro']:.3f}; per slide (paper Table 1): "
                  f"AUC {auc_text(ms['auc'], ss['auc'])}, ACC {ms['acc']:.3f} ± {ss['acc']:.3f}, "
                  f"macro-F1 {ms['f1_macro']:.3f} ± {ss['f1_macro']:.3f} → {out}/summary.md")


@handle_errors(missing="momkd evaluate needs PyTorch (pip install 'momkd[train]')")
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="A finished `momkd train` run folder.", exists=True, file_okay=False)],
    cohort: CohortOpt,
    features: FeaturesOpt,
    label_col: LabelOpt,
    positive: PositiveOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for predictions.csv and metrics.json.")],
    device: DeviceOpt = "auto",
    quiet: Quiet = False,
) -> None:
    """Evaluate a run on a cohort from histology alone: every fold model and their mean."""
    from momkd.evaluate import evaluate_run
    from momkd.metrics import auc_text
    from momkd.train.setup import load_training_data

    data = load_training_data(cohort, features, None, label_col, positive, folds=1, console=console)
    metrics = evaluate_run(run_dir, data, out, device=device, log=log_lines(console, quiet))
    mm = metrics["mean_model"]
    sl = mm["slide"]
    console.print(f"mean of {len(metrics['folds'])} fold models, per case: AUC {auc_text(mm['auc'])}, ACC {mm['acc']:.3f}, "
                  f"F1 {mm['f1']:.3f}, macro-F1 {mm['f1_macro']:.3f}; per slide (paper Table 1): AUC {auc_text(sl['auc'])}, "
                  f"ACC {sl['acc']:.3f}, macro-F1 {sl['f1_macro']:.3f} → {out}/predictions.csv")
