"""How every ``momkd`` command ends when something goes wrong: one line on stderr and an exit code, defined once.

=====================================  ====  ================================================================
raised inside a command                exit  printed on stderr
=====================================  ====  ================================================================
``MomkdError`` (any subclass)          2     ``error: <message>``
``ImportError``, ``missing=`` given    2     ``error: <missing>: <message>`` (an optional extra is absent)
``KeyboardInterrupt`` (Ctrl-C)         130   ``interrupted: <what to do>`` (the command's ``interrupted=``)
SIGTERM (systemd stop, docker stop,    143   ``terminated: <what to do>`` (the same ``interrupted=``)
``kill``)
anything else                          1     ``internal error: <type>: <message> (set MOMKD_DEBUG=1 for a
                                             traceback)``; with ``MOMKD_DEBUG`` set, the traceback instead
=====================================  ====  ================================================================

SIGTERM is turned into ``Terminated``, a ``KeyboardInterrupt`` raised in the main thread, while a command runs: it
stops exactly as Ctrl-C does (``finally`` blocks run, so ``infer`` leaves its finished rows, valid for
``--resume``), and exits with the shell's code for a SIGTERM death, 128 + 15 = 143, so that service managers
and scripts still see which signal ended it. A second SIGTERM while the command stops is ignored (a service
manager that will not wait sends SIGKILL).

The exit codes a command chooses itself with ``typer.Exit`` pass through unchanged (``infer`` and ``bench``: 1
when some slides or measurements failed; ``validate``: 2 when the cohort has problems). Messages are printed as
plain text, never read as rich markup, so the ``[plot]`` of ``pip install momkd[plot]`` prints as written.
"""

from __future__ import annotations

import functools
import inspect
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import NoReturn, TypeVar

import typer
from rich.console import Console
from rich.text import Text

from momkd.errors import MomkdError

INTERNAL_ERROR = 1
USAGE_ERROR = 2
INTERRUPTED = 130
TERMINATED = 128 + signal.SIGTERM
DEBUG_ENV = "MOMKD_DEBUG"  # set (non-empty): an unexpected exception shows its traceback instead of one line
RERUN = "rerun the same command to start again"

Command = TypeVar("Command", bound=Callable[..., None])

_stderr = Console(stderr=True)


class Terminated(KeyboardInterrupt):
    """The process got SIGTERM (raised in the main thread by ``sigterm_interrupts``)."""


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """While the block runs (in the main thread), SIGTERM raises ``Terminated`` there; a second one is ignored.
    The previous handler is back afterwards. Elsewhere than the main thread, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigterm(_signum: int, _frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def handle_errors(*, interrupted: str = RERUN, missing: str | None = None) -> Callable[[Command], Command]:
    """Decorate a command so that its errors end as the table above says.

    ``interrupted``: what to do after Ctrl-C, a ``str.format`` template over the command's arguments (``{out}``
    is its ``out`` argument). ``missing``: what an ``ImportError`` means for this command (the extra to install);
    without it an ``ImportError`` is an internal error.
    """

    def decorate(command: Command) -> Command:
        signature = inspect.signature(command)

        @functools.wraps(command)
        def run(*args: object, **kwargs: object) -> None:
            try:
                with sigterm_interrupts():
                    command(*args, **kwargs)
            except (typer.Exit, typer.Abort, typer.TyperException):
                raise
            except MomkdError as e:
                _exit(USAGE_ERROR, "error:", str(e))
            except KeyboardInterrupt as e:
                bound = signature.bind(*args, **kwargs)
                bound.apply_defaults()
                what = interrupted.format_map(bound.arguments)
                if isinstance(e, Terminated):
                    _exit(TERMINATED, "terminated:", what, style="")
                _exit(INTERRUPTED, "interrupted:", what, style="")
            except Exception as e:  # noqa: BLE001 - one line, never a traceback for hospital IT unless asked for
                if isinstance(e, ImportError) and missing is not None:
                    _exit(USAGE_ERROR, "error:", f"{missing}: {e}")
                if os.environ.get(DEBUG_ENV):
                    raise
                _exit(INTERNAL_ERROR, "internal error:",
                      f"{type(e).__name__}: {' '.join(str(e).split())} (set {DEBUG_ENV}=1 for a traceback)")

        return run  # type: ignore[return-value]

    return decorate


def _exit(code: int, label: str, message: str, style: str = "red") -> NoReturn:
    """Print ``label message`` as one plain-text line on stderr and exit with ``code``."""
    _stderr.print(Text.assemble((label, style), " ", message), soft_wrap=True)
    raise typer.Exit(code) from None
