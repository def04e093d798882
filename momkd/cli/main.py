"""The ``momkd`` command. Each command's body lives in ``momkd/cli/cmd_*.py`` and imports heavy code lazily,
so ``momkd --help`` is instant and never imports PyTorch. Every command ends on an error as
:mod:`momkd.cli.errors` says (one line, exit 2 / 130 / 1); its choice options come from :mod:`momkd.cli.choices`."""

from __future__ import annotations

import typer

from momkd.cli import cmd_demo, cmd_infer, cmd_train
from momkd.cli import cmd_export
from momkd.cli import cmd_data
from momkd.cli import cmd_report
from momkd.cli import cmd_bench

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


app.command("validate")(cmd_data.validate)
app.command("synth")(cmd_data.synth)
app.command("train")(cmd_train.train)
app.command("evaluate")(cmd_train.evaluate)
app.command("demo")(cmd_demo.demo)
app.command("infer")(cmd_infer.infer)
app.command("export")(cmd_export.export)
app.command("report")(cmd_report.report)
app.command("bench")(cmd_bench.bench)


def main() -> None:  # pragma: no cover - console entry point
    app()
