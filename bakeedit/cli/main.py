"""The Click group, error display, signal handling and shared options.

Every failure a user can cause reaches the terminal as one line naming the file or field, plus a hint; ``--debug``
adds the traceback. SIGTERM and SIGHUP are turned into :class:`Terminated` (a ``KeyboardInterrupt``), so the same
clean-up that Ctrl-C runs (staged temporaries removed) runs for them too; the exit status is 128 + the signal
number (130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP), as shells report it.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import threading
import traceback
from typing import Any

import click
from rich.console import Console
from rich.markup import escape

from bakeedit import __version__
from bakeedit.errors import BakeeditError

console = Console(stderr=True, highlight=False)


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when SIGTERM or SIGHUP arrives: unwinds like Ctrl-C, so clean-up runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_terminated(signum: int, _frame: Any) -> None:
    # Ignore further signals while unwinding: a second SIGTERM must not interrupt the clean-up itself.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    raise Terminated(signum)


def install_signal_handlers() -> None:
    """SIGTERM/SIGHUP behave like SIGINT (only in the main thread; Python delivers signals there)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) in (signal.SIG_DFL, None):
            signal.signal(sig, _raise_terminated)


_OS_HINTS = {
    errno.ENOSPC: "free disk space (or choose an -o on another disk) and run again; nothing was left half-written",
    errno.EROFS: "the file system is read-only: choose an -o folder you can write to",
    errno.EACCES: "you lack permission there: choose another folder or fix its permissions",
    errno.EPERM: "you lack permission there: choose another folder or fix its permissions",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
    errno.EDQUOT: "your disk quota is exhausted: free space and run again",
}


def _os_error_line(exc: OSError) -> tuple[str, str | None]:
    where = exc.filename if exc.filename is not None else None
    what = exc.strerror or str(exc) or type(exc).__name__
    line = f"{where}: {what}" if where is not None else what
    return line, _OS_HINTS.get(exc.errno or -1)


def _show(message: str, hint: str | None) -> None:
    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    if hint:
        console.print(f"[dim]hint: {escape(hint)}[/]", soft_wrap=True)


class BakeeditGroup(click.Group):
    """Turns every failure into one red line plus a hint (traceback with --debug) and a non-zero exit status.

    :class:`BakeeditError` is a fault whose cause is known (exit 1). ``OSError`` (disk full, read-only file system,
    permissions) names the file the system named (exit 1). Interrupts exit 128 + signal. Anything else is a bug:
    one line that says so and asks for ``--debug`` (exit 2 is click's usage error, so bugs exit 3).
    """

    def invoke(self, ctx: click.Context) -> Any:
        install_signal_handlers()
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except KeyboardInterrupt as exc:
            debug = _debug(ctx)
            signum = exc.signum if isinstance(exc, Terminated) else int(signal.SIGINT)
            if debug:
                traceback.print_exc()
            _show(f"interrupted by {signal.Signals(signum).name}", "nothing was left half-written; run the same "
                  "command again (a locate resumes from its cache)")
            sys.exit(128 + signum)
        except BakeeditError as exc:
            if _debug(ctx):
                traceback.print_exc()
            _show(str(exc), exc.hint)
            sys.exit(1)
        except OSError as exc:
            if _debug(ctx):
                traceback.print_exc()
            line, hint = _os_error_line(exc)
            _show(line, hint)
            sys.exit(1)
        except Exception as exc:  # a bug: still one line, with the way to the traceback
            if _debug(ctx):
                traceback.print_exc()
            first = (str(exc).strip().splitlines() or [""])[0]
            _show(f"unexpected {type(exc).__name__}: {first}",
                  "this is a bug in bakeedit: run again with `bakeedit --debug ...` and report the traceback")
            sys.exit(3)


def _debug(ctx: click.Context) -> bool:
    return bool(ctx.obj and ctx.obj.get("debug"))


@click.group(cls=BakeeditGroup)
@click.version_option(__version__, prog_name="bakeedit")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Find the neurons of a causal LM that govern social bias, edit them, and bake the edit into a checkpoint."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no fork warnings from tokenizers in workers
    # transformers' own tqdm bars would interleave with ours; rich shows progress instead.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
