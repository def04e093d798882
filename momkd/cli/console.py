"""How every ``momkd`` command prints: through a :class:`CliConsole` (wrapped to the terminal on a terminal, never
wrapped in a pipe or a log file: a CSV-like line or a path stays on one line there), progress lines through
:func:`log_lines`, dropped by the shared ``--quiet`` option."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.console import Console, ConsoleDimensions

LOG_WIDTH = 160  # columns that tables and rules are laid out in when the output is not a terminal


class CliConsole(Console):
    """A :class:`rich.console.Console` that decides at each print whether its stream is a terminal.

    On a terminal it behaves as rich does (text wrapped to the terminal's width). Otherwise text is soft-wrapped
    (one line stays one line) and tables and rules get at least :data:`LOG_WIDTH` columns instead of rich's 80.
    """

    @property  # type: ignore[misc]
    def size(self) -> ConsoleDimensions:
        size = super().size
        return size if self.is_terminal else ConsoleDimensions(max(size.width, LOG_WIDTH), size.height)

    def print(self, *objects: Any, soft_wrap: bool | None = None, **kwargs: Any) -> None:
        if soft_wrap is None and not self.is_terminal:
            soft_wrap = True
        super().print(*objects, soft_wrap=soft_wrap, **kwargs)


Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines (results and errors are still printed).")]


def progress_console(console: CliConsole, quiet: bool) -> CliConsole:
    """``console``, or with ``--quiet`` a console on the same stream that prints nothing (for progress only)."""
    return CliConsole(stderr=console.stderr, quiet=True) if quiet else console


def log_lines(console: CliConsole, quiet: bool = False) -> Callable[[str], None]:
    """A library ``log`` callback: each message as one plain line on ``console`` (never read as rich markup), or
    nothing with ``--quiet``."""
    if quiet:
        return lambda message: None
    return lambda message: console.print(message, style="dim", highlight=False, markup=False)
