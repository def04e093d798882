"""``momkd report RUN_DIR --out DIR``: the report of a training run (tables, ROC, loss, memory figures)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from momkd.cli.console import CliConsole, Quiet, log_lines
from momkd.cli.errors import handle_errors

console = CliConsole(stderr=True)


@handle_errors(missing="momkd report needs matplotlib (pip install 'momkd[plot]')",
               interrupted="the report in {out} is unfinished; rerun the same command to write it again")
def report(
    run_dir: Annotated[Path, typer.Argument(help="A finished `momkd train` run folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Report folder: report.md, figures/, cv_table.csv, memory_codes.csv.")],
    compare: Annotated[Optional[list[Path]], typer.Option("--compare", help="Another run folder to put side by side in one table (repeat for more).")] = None,
    top_k: Annotated[int, typer.Option("--top-k", help="Test patches listed per memory code (paper Fig. 4).", min=1)] = 3,
    slides: Annotated[Optional[Path], typer.Option("--slides", help="Folder of whole-slide images ({slide_id}.svs, ...): crops of the codes' patches (needs openslide).")] = None,
    html: Annotated[bool, typer.Option("--html", help="Also write report.html with the figures embedded (one file).")] = False,
    device: Annotated[str, typer.Option("--device", help="Device for the memory-code pass: auto, cpu, cuda or cuda:N.")] = "auto",
    quiet: Quiet = False,
) -> None:
    """Write a report of a training run: CV table, ROC and loss curves, memory dynamics and memory-code patches."""
    from momkd.report.build import build_report  # imports matplotlib: only now

    path = build_report(run_dir, out, compare=compare or [], top_k=top_k, slides_dir=slides, device=device,
                        html=html, log=log_lines(console, quiet))
    console.print(f"report → {escape(str(path))}" + (f" and {escape(str(path.with_suffix('.html')))}" if html else ""),
                  highlight=False, soft_wrap=True)
