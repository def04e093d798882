"""``momkd export``: freeze a finished training run into a deployable, self-verified model folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from momkd.cli.choices import ExportFormat
from momkd.cli.console import CliConsole, Quiet, log_lines
from momkd.cli.errors import handle_errors
from momkd.export.folder import export_run  # imports torch only when it runs
from momkd.manifest import MANIFEST_NAME, PIN_NAME, load_manifest

console = CliConsole(stderr=True)


@handle_errors(missing="momkd export needs the training and export extras (pip install 'momkd[train,export]')")
def export(
    run_dir: Annotated[Path, typer.Argument(help="A finished `momkd train` run folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Model folder to create (model.onnx, model.pt, manifest.json).")],
    format: Annotated[ExportFormat, typer.Option("--format", help="onnx, or trt to also build a TensorRT engine "
                                                                   "(needs tensorrt and a CUDA GPU), or triton: "
                                                                   "--out is a Triton model repository (RUN_DIR "
                                                                   "may then also be a model folder).")] = "onnx",
    fold: Annotated[str, typer.Option("--fold", help="'all': the mean of the fold models' probabilities (what "
                                                     "`momkd evaluate` reports); K: fold K alone.")] = "all",
    fp16: Annotated[bool, typer.Option("--fp16", help="Run the linear layers in fp16 (I/O stays fp32); the "
                                                      "deviation and decision flips are recorded.")] = False,
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset (18 or newer).")] = 18,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --out folder.")] = False,
    precision: Annotated[list[str], typer.Option("--precision", help="Also write a reduced-precision CPU graph: "
                                                 "int8 (model.int8.onnx, gated against fp32 on the folds' "
                                                 "validation and test slides). Repeatable.")] = ["fp32"],  # noqa: B006
    gate_max_dp: Annotated[float, typer.Option("--gate-max-dp", help="int8 gate: max |Δp| vs fp32.", min=0)] = 0.02,
    gate_max_flips: Annotated[int, typer.Option("--gate-max-flips", help="int8 gate: decision flips allowed at the "
                                                "model's threshold.", min=0)] = 0,
    gate_max_dauc: Annotated[float, typer.Option("--gate-max-dauc", help="int8 gate: max |ΔAUC| in any fold's "
                                                 "validation or test set.", min=0)] = 0.005,
    force_precision: Annotated[bool, typer.Option("--force-precision", help="Write a reduced-precision graph that "
                                                  "fails its gates (recorded in the manifest; `--precision auto` "
                                                  "never picks it).")] = False,
    quiet: Quiet = False,
) -> None:
    """Export a trained run to ONNX (and TensorRT): one inference graph, verified on held-out slides."""
    from momkd.export.gates import GateLimits

    if format == "triton":
        from momkd.export.triton_repo import export_triton

        export_triton(run_dir, out, overwrite=overwrite, log=log_lines(console, quiet), fold=fold, fp16=fp16,
                      opset=opset, precisions=precision, force_precision=force_precision,
                      gate_limits=GateLimits(gate_max_dp, gate_max_flips, gate_max_dauc))
        return
    manifest = export_run(run_dir, out, fmt=format, fold=fold, fp16=fp16, opset=opset, overwrite=overwrite,
                          log=log_lines(console, quiet), precisions=precision, force_precision=force_precision,
                          gate_limits=GateLimits(gate_max_dp, gate_max_flips, gate_max_dauc))
    m = manifest["model"]
    console.print(f"[bold]exported[/bold] folds {m['folds']} ({manifest['onnx']['precision']}, threshold "
                  f"{m['threshold']:.3f}) → {escape(str(out))}", highlight=False, soft_wrap=True)
    pin = load_manifest(out, verify_checksums=False).sha256
    if not quiet:
        console.print(f"manifest sha256 (stdout, sha256sum format; also in {escape(str(out / PIN_NAME))}): keep a "
                      "copy outside the folder and pin the approved model with `momkd infer --model-sha256 FILE`",
                      highlight=False, soft_wrap=True)
    typer.echo(f"{pin}  {out / MANIFEST_NAME}")
