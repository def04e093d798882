"""``momkd report RUN_DIR --out DIR``: the report of a training run (tables, ROC, loss, memory figures)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from momkd.errors import MomkdError

console = Console(stderr=True)


def report(
    run_dir: Annotated[Path, typer.Argument(help="A finished `momkd train` run folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Report folder: report.md, figures/, cv_table.csv, memory_codes.csv.")],
    compare: Annotated[Optional[list[Path]], typer.Option("--compare", help="Another run folder to put side by side in one table (repeat for more).")] = None,
    top_k: Annotated[int, typer.Option("--top-k", help="Test patches listed per memory code (paper Fig. 4).", min=1)] = 3,
    slides: Annotated[Optional[Path], typer.Option("--slides", help="Folder of whole-slide images ({slide_id}.svs, ...): crops of the codes' patches (needs openslide).")] = None,
    html: Annotated[bool, typer.Option("--html", help="Also write report.html with the figures embedded (one file).")] = False,
    device: Annotated[str, typer.Option("--device", help="Device for the memory-code pass: auto, cpu, cuda or cuda:N.")] = "auto",
) -> None:
    """Write a report of a training run: CV table, ROC and loss curves, memory dynamics and memory-code patches."""
    try:
        from momkd.report.build import build_report  # imports matplotlib: only now

        path = build_report(run_dir, out, compare=compare or [], top_k=top_k, slides_dir=slides, device=device,
                            html=html, log=lambda msg: console.print(msg, style="dim", highlight=False, markup=False,
                                                                     soft_wrap=True))
    except MomkdError as e:
        console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except ImportError as e:  # matplotlib missing: a usage error, not a crash
        console.print(escape(f"error: momkd report needs matplotlib (pip install momkd[plot]): {e}"),
                      highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except Exception as e:  # noqa: BLE001 - one line, no traceback, unless asked for
        if os.environ.get("MOMKD_DEBUG"):
            raise
        console.print(escape(f"internal error: {type(e).__name__}: {' '.join(str(e).split())} "
                             "(set MOMKD_DEBUG=1 for a traceback)"), highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    console.print(f"report → {escape(str(path))}" + (f" and {escape(str(path.with_suffix('.html')))}" if html else ""),
                  highlight=False, soft_wrap=True)
