"""The ``momkd`` command. Each command's body lives in ``cli/cmd_*.py`` and imports heavy code lazily,
so ``momkd --help`` is instant and never imports PyTorch."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="momkd",
    help="MoMKD: train with histology + RNA, predict genomic biomarkers from histology alone.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """MoMKD: train with histology + RNA, predict genomic biomarkers from histology alone."""


def main() -> None:  # pragma: no cover - console entry point
    app()
