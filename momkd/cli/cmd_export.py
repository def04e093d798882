"""``momkd export``: freeze a finished training run into a deployable, self-verified model folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from momkd.cli.choices import ExportFormat
from momkd.cli.errors import handle_errors
from momkd.export.folder import export_run  # imports torch only when it runs

console = Console(stderr=True)


@handle_errors(missing="momkd export needs the training and export extras (pip install momkd[train,export])")
def export(
    run_dir: Annotated[Path, typer.Argument(help="A finished `momkd train` run folder.")],
    out: Annotated[Path, typer.Option("--out", help="Model folder to create (model.onnx, model.pt, manifest.json).")],
    format: Annotated[ExportFormat, typer.Option("--format", help="onnx, or trt to also build a TensorRT engine "
                                                                   "(needs tensorrt and a CUDA GPU).")] = "onnx",
    fold: Annotated[str, typer.Option("--fold", help="'all': the mean of the fold models' probabilities (what "
                                                     "`momkd evaluate` reports); K: fold K alone.")] = "all",
    fp16: Annotated[bool, typer.Option("--fp16", help="Run the linear layers in fp16 (I/O stays fp32); the "
                                                      "deviation and decision flips are recorded.")] = False,
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset (18 or newer).")] = 18,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --out folder.")] = False,
) -> None:
    """Export a trained run to ONNX (and TensorRT): one inference graph, verified on held-out slides."""
    manifest = export_run(run_dir, out, fmt=format, fold=fold, fp16=fp16, opset=opset, overwrite=overwrite,
                          log=lambda msg: console.print(msg, highlight=False, markup=False, soft_wrap=True))
    m = manifest["model"]
    console.print(f"[bold]exported[/bold] folds {m['folds']} ({manifest['onnx']['precision']}, threshold "
                  f"{m['threshold']:.3f}) → {escape(str(out))}", highlight=False, soft_wrap=True)
