"""The ``momkd`` command. Each command's body lives in ``momkd/cli/cmd_*.py`` and imports heavy code lazily,
so ``momkd --help`` is instant and never imports PyTorch. Every command ends on an error as
:mod:`momkd.cli.errors` says (one line, exit 2 / 130 / 1); its choice options come from :mod:`momkd.cli.choices`;
it prints through :class:`momkd.cli.console.CliConsole` (never wrapped outside a terminal).

Conventions every command keeps: ``--out/-o`` is the folder it writes, ``--quiet/-q`` drops the progress lines
(results and errors are still printed), an optional extra that is missing is a usage error that names it.
Help text is Markdown (``momkd[plot]`` prints as written), a flag takes no value and shows none in ``--help``,
and ``--help`` or a usage error into a pipe or a file is plain, unwrapped text (one line per option).
"""

from __future__ import annotations

import re
import sys
from typing import Any, ClassVar

import typer
from typer.core import TyperCommand, TyperGroup, TyperOption

from momkd.cli import cmd_demo, cmd_infer, cmd_train
from momkd.cli import cmd_export
from momkd.cli import cmd_data
from momkd.cli import cmd_report
from momkd.cli import cmd_bench
from momkd.cli import cmd_serve

UNWRAPPED = 1_000_000  # help formatter width outside a terminal: no line is ever wrapped


def help_on_terminal() -> bool:
    """Whether ``--help`` goes to a terminal (rich help, wrapped to it) rather than a pipe or a file (plain)."""
    return sys.stdout.isatty()


def _plain_metavars(params: list[Any], ctx: Any) -> list[Any]:
    """``params`` with the metavars typer's help gets wrong set right: none for a flag (typer would show its type,
    ``<bool>``, though a flag takes no value), the element for a repeatable option (``<path>``, not
    ``<list[Path]>``: the option takes one value per use)."""
    for param in params:
        if not isinstance(param, TyperOption) or param.metavar is not None:
            continue
        if param.is_flag:
            param.metavar = ""
        elif param.multiple:
            param.metavar = re.sub(r"^<list\[(.+)\]>$", lambda m: f"<{m.group(1).lower()}>", param.display_type(ctx))
    return params


class _PlainHelp:
    """Help with plain metavars; typer's rich help on a terminal, click's plain unwrapped help elsewhere. Mixed
    in before the typer class named by ``typer_base``, whose base (the click class) gives the plain help."""

    typer_base: ClassVar[Any]

    def get_params(self, ctx: Any) -> list[Any]:
        return _plain_metavars(super().get_params(ctx), ctx)  # type: ignore[misc]

    def format_help(self, ctx: Any, formatter: Any) -> None:
        if help_on_terminal():
            self.typer_base.format_help(self, ctx, formatter)
        else:
            formatter.width = UNWRAPPED
            super(self.typer_base, self).format_help(ctx, formatter)  # type: ignore[misc]  # click's plain help


class _Command(_PlainHelp, TyperCommand):
    """A typer command whose help follows the module docstring."""

    typer_base = TyperCommand


class _Group(_PlainHelp, TyperGroup):
    """The ``momkd`` group, with the help of :class:`_Command`; a usage error (unknown option, missing value)
    into a pipe or a file is click's plain lines rather than typer's boxed panel wrapped at 80 columns."""

    typer_base = TyperGroup

    def main(self, *args: Any, **kwargs: Any) -> Any:
        markup = self.rich_markup_mode
        if not sys.stderr.isatty():
            self.rich_markup_mode = None   # typer's main prints usage errors plainly when there is no markup mode
        try:
            return super().main(*args, **kwargs)
        finally:
            self.rich_markup_mode = markup


app = typer.Typer(
    name="momkd",
    help="MoMKD: train with histology + RNA, predict genomic biomarkers from histology alone.",
    cls=_Group,
    no_args_is_help=True,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """MoMKD: train with histology + RNA, predict genomic biomarkers from histology alone."""


def _command(name: str, body: Any) -> None:
    app.command(name, cls=_Command)(body)


_command("validate", cmd_data.validate)
_command("synth", cmd_data.synth)
_command("train", cmd_train.train)
_command("evaluate", cmd_train.evaluate)
_command("demo", cmd_demo.demo)
_command("infer", cmd_infer.infer)
_command("export", cmd_export.export)
_command("report", cmd_report.report)
_command("bench", cmd_bench.bench)
_command("serve", cmd_serve.serve)


def main() -> None:  # pragma: no cover - console entry point
    app()
