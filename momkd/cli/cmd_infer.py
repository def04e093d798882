"""``momkd infer MODEL_DIR FOLDER --out OUT_DIR``: predict every ``.h5`` slide file of a folder (no PyTorch)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from momkd.cli.choices import BackendName, HeatmapValue, ReaderPool
from momkd.cli.console import CliConsole
from momkd.cli.errors import handle_errors
from momkd.runtime.heatmap_writer import HeatmapOptions

console = CliConsole(stderr=True)

ProgressCallback = Callable[[int, int, int, int], None]  # (done, total, ok, failed) slides


@handle_errors(interrupted="finished rows are in {out}/predictions.csv; rerun with --resume to finish")
def infer(
    model_dir: Annotated[Path, typer.Argument(help="Model folder written by `momkd export` (manifest.json, model.onnx, ...).")],
    folder: Annotated[Path, typer.Argument(help="Folder of per-slide .h5 feature files (TRIDENT or CLAM).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: predictions.csv, run.json, attention/ (never inside FOLDER).")],
    backend: Annotated[BackendName, typer.Option(help="auto picks TensorRT > onnxruntime-CUDA > onnxruntime-CPU. torch runs the folder's TorchScript model.pt, which is code: only when named, for folders you trust.")] = "auto",
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda or cuda:N (default: the best available).")] = None,
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="Also look for .h5 files in subfolders.")] = False,
    batch_patches: Annotated[Optional[int], typer.Option(help="Row budget of one model call; slides are packed up to it, a larger slide runs alone (default: 4096 on the CPU, 32768 on a GPU).", min=1)] = None,
    workers: Annotated[int, typer.Option(help="Readers (read, validate, neighbour table) working ahead of the model.", min=1)] = 2,
    reader: Annotated[ReaderPool, typer.Option(help="Reader pool: threads, processes (reads scale with cores), or auto (processes when the model runs on a GPU).")] = "auto",
    resume: Annotated[bool, typer.Option("--resume", help="Keep the ok rows of an earlier run in --out (same model, unchanged file); redo the rest.")] = False,
    save_attention: Annotated[bool, typer.Option("--save-attention", help="Write OUT/attention/{slide_id}.h5 (coords, attention, patch_score).")] = False,
    heatmaps: Annotated[bool, typer.Option("--heatmaps", help="Write OUT/heatmaps/{slide_id}.png for every ok slide (needs matplotlib: momkd[plot]).")] = False,
    heatmap_value: Annotated[HeatmapValue, typer.Option(help="What --heatmaps paints: the attention, or the patch score (memory affinity).")] = "attention",
    slides: Annotated[Optional[Path], typer.Option("--slides", help="Folder of whole-slide images ({slide_id}.svs, .tif, ...): --heatmaps draws on their thumbnails (needs openslide).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no per-slide error lines.")] = False,
    model_sha256: Annotated[Optional[str], typer.Option("--model-sha256", envvar="MOMKD_MODEL_SHA256", help="Refuse the model unless its manifest.json has this sha256 (what `momkd export` printed): 64 hex digits, @FILE or a .sha256 file kept outside the model folder.")] = None,
    server: Annotated[Optional[list[str]], typer.Option("--server", help="Send the slides to this `momkd serve` Triton server (http://HOST:PORT or grpc://HOST:PORT) instead of running the model here; repeat for several (round-robin, a failed request is retried on another). Needs momkd[serve].")] = None,
    max_inflight: Annotated[int, typer.Option("--max-inflight", help="With --server: requests in flight per server at most.", min=1)] = 4,
    slide_timeout: Annotated[float, typer.Option("--slide-timeout", help="Seconds a slide may take in the reader (read, checks, neighbour graph) and in the model, each; past it the slide gets a timeout row and the run goes on (0: no limit). A stuck reader process is killed and an onnxruntime call cancelled; a reader thread (--reader threads, the CPU default) cannot be stopped: its row is written on time, but momkd exits only once that read returns. TensorRT/torch calls run to their end.", min=0)] = 600.0,
    allow_encoder_mismatch: Annotated[bool, typer.Option("--allow-encoder-mismatch", help="Use slides whose encoder attribute names another encoder than the model's (compared ignoring case and punctuation); otherwise each is a failed row. Recorded in run.json.")] = False,
    precision: Annotated[str, typer.Option("--precision", help="auto, fp32, int8 or bf16. auto runs the folder's int8 graph (`momkd export --precision int8`) on CPUs with VNNI/AMX when its accuracy gates passed, else fp32; the choice and why are recorded in run.json.")] = "auto",
) -> None:
    """Predict every slide of FOLDER. Exit code 0: all ok; 1: some slides failed (see the error column); 2: usage or model error, or OUT full, read-only or in use; 130 (Ctrl-C) or 143 (SIGTERM): stopped, finish with --resume."""
    from momkd.manifest import resolve_pin
    from momkd.runtime.pipeline import UsageError, run_inference

    if slides is not None and not heatmaps:
        raise UsageError("--slides is only used with --heatmaps")
    heatmap_options = HeatmapOptions(value=heatmap_value, slides_dir=slides) if heatmaps else None
    pinned = resolve_pin(model_sha256) if model_sha256 else None

    def log(message: str) -> None:
        if not quiet:
            from rich.text import Text

            console.print(Text(message, style="yellow" if message.startswith(("failed:", "heatmap failed:")) else "dim"), soft_wrap=True)

    engine = None
    if server:
        from momkd.runtime.remote import remote_engine

        if backend != "auto" or device is not None:
            raise UsageError("--backend/--device choose the local engine; with --server the servers run the model")
        engine = remote_engine(server, max_inflight=max_inflight, log=log)

    with _progress_bar(not quiet and console.is_terminal) as progress:
        summary = run_inference(model_dir, folder, out, backend=backend, device=device, recursive=recursive,
                                batch_patches=batch_patches, workers=workers, resume=resume,
                                save_attention=save_attention, progress=progress, log=log, reader=reader,
                                heatmaps=heatmap_options, model_sha256=pinned, engine=engine,
                                slide_timeout=slide_timeout, allow_encoder_mismatch=allow_encoder_mismatch,
                                precision=precision)
    typer.echo(summary.line())
    sys.stdout.flush()
    raise typer.Exit(summary.exit_code)


@contextmanager
def _progress_bar(show: bool) -> Iterator[ProgressCallback | None]:
    """A live bar of the slides done while the block runs (``None``: no bar); gone before any error is printed."""
    if not show:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(TextColumn("[bold]infer"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True) as bar:
        task = bar.add_task("infer", total=None, status="")

        def progress(done: int, total: int, ok: int, failed: int) -> None:
            bar.update(task, completed=done, total=total, status=f"[green]{ok} ok[/] [red]{failed} failed[/]")

        yield progress
