"""``momkd bench MODEL_DIR``: latency of a model folder per backend x device x precision x slide size, with the
outputs checked against the PyTorch fp32 model (where PyTorch is installed)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from momkd.cli.console import CliConsole
from momkd.cli.errors import handle_errors
from momkd.errors import MomkdError

console = CliConsole(stderr=True)


def _num(value: float | None, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def _ms(value: float | None) -> str:
    return _num(value, ".2f" if value is not None and value < 10 else ".1f")


def results_table(records: list[Any]) -> Table:
    """The ultralytics-style table: one row per measurement, one per target that cannot run here."""
    table = Table(title="momkd bench", title_justify="left")
    columns: tuple[tuple[str, Literal["left", "right"]], ...] = (
        ("backend", "left"), ("device", "left"), ("precision", "left"), ("N", "right"), ("slides", "right"),
        ("median ms", "right"), ("p90 ms", "right"), ("slides/s", "right"), ("GFLOP/s", "right"),
        ("max |Δp|", "right"), ("status", "left"))
    for name, justify in columns:
        table.add_column(name, justify=justify, no_wrap=name != "status")
    for r in records:
        status = r.status if r.status == "ok" else f"{r.status}: {r.note}"
        style = {"ok": "", "failed": "red", "skipped": "dim"}[r.status]
        table.add_row(r.backend, r.device, r.precision, _num(r.n_patches, "d"), _num(r.slides_per_pack, "d"),
                      _ms(r.median_ms), _ms(r.p90_ms), _num(r.slides_per_s, ".1f"), _num(r.gflop_per_s, ".1f"),
                      _num(r.max_abs_dprob, ".1e"), escape(status), style=style)
    return table


@handle_errors()
def bench(
    model_dir: Annotated[Path, typer.Argument(help="Model folder written by `momkd export`.")],
    patches: Annotated[str, typer.Option("--patches", help="Patches per slide (N), comma-separated.")] = "1000,10000,50000",
    slides_per_pack: Annotated[str, typer.Option("--slides-per-pack", help="Slides packed into one call, comma-separated.")] = "1,8",
    backends: Annotated[str, typer.Option("--backends", help="Any of onnxruntime, torch, tensorrt (comma-separated).")] = "onnxruntime,torch,tensorrt",
    devices: Annotated[str, typer.Option("--devices", help="Any of cpu, cuda (comma-separated).")] = "cpu,cuda",
    precision: Annotated[str, typer.Option("--precision", help="Any of fp32, fp16, bf16, int8 (comma-separated; int8: the folder's model.int8.onnx on the CPU, from `momkd export --precision int8`).")] = "fp32,fp16,int8",
    repeat: Annotated[int, typer.Option("--repeat", help="Timed calls per measurement (median and p90 over them).", min=1)] = 10,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed calls first.", min=0)] = 2,
    max_rows: Annotated[int, typer.Option("--max-rows", help="Skip packs of more rows than this (memory guard).", min=1)] = 262_144,
    threads: Annotated[Optional[int], typer.Option("--threads", help="CPU threads (default: every usable core).", min=1)] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the records (a JSON list) to this file.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines.")] = False,
) -> None:
    """Time the model on synthetic slides for every backend x device x precision x N; check against PyTorch fp32.

    Exit code 0: every measurement ran; 1: some failed (see the status column); 2: usage or model error.
    """
    from momkd.runtime.bench import BACKEND_NAMES, DEVICES, PRECISIONS, parse_choices, parse_int_list, run_bench

    options: dict[str, Any] = dict(patches=parse_int_list(patches, "--patches"),
                   slides_per_pack=parse_int_list(slides_per_pack, "--slides-per-pack"),
                   backends=parse_choices(backends, "--backends", BACKEND_NAMES),
                   devices=parse_choices(devices, "--devices", DEVICES),
                   precisions=parse_choices(precision, "--precision", PRECISIONS))
    if json_out is not None and json_out.is_dir():
        raise MomkdError(f"--json {json_out}: is a folder (give a file name)")

    def log(message: str) -> None:
        if not quiet:
            console.print(message, style="dim", highlight=False, markup=False, soft_wrap=True)

    records = run_bench(model_dir, **options, repeat=repeat, warmup=warmup, max_rows=max_rows, threads=threads,
                        log=log)
    if json_out is not None:
        try:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps([r.to_dict() for r in records], indent=2) + "\n")
        except OSError as e:
            raise MomkdError(f"--json {json_out}: cannot be written ({e.strerror or e})") from None
    Console(width=max(160, Console().width)).print(results_table(records))
    machine = dict(records[0].machine) if records else {}
    roofline = machine.pop("cpu_fp32_matmul_gflop_per_s", None)
    if machine:
        typer.echo("machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()))
    if roofline is not None:
        typer.echo(f"fp32 matmul roofline of this CPU, measured now: {roofline} GFLOP/s (compare the CPU GFLOP/s)")
    if any(r.max_abs_dprob is not None for r in records):
        typer.echo("max |Δp|: against the folder's TorchScript model run by PyTorch on CPU in fp32")
    elif any(r.status == "ok" for r in records):
        typer.echo("max |Δp|: not checked (needs PyTorch and the folder's model.pt)")
    if json_out is not None:
        typer.echo(f"wrote {json_out}")
    sys.stdout.flush()
    raise typer.Exit(1 if any(r.status == "failed" for r in records) else 0)
