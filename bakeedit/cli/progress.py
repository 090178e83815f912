"""One rich Progress for a command: a spinner line for the current step, plus bars that methods add.

rich allows one live display at a time, so a command creates this once and hands it down (locate methods and
evaluations add their own tasks to it) instead of nesting spinners and bars.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from bakeedit.cli.main import console


@contextmanager
def command_progress(first_step: str = "starting") -> Iterator[tuple[Progress, Callable[[str], None]]]:
    """Yield ``(progress, report)``; ``report("step")`` renames the step line."""
    with Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,  # the command prints its own summary; a failed step leaves only the error line
    ) as progress:
        step = progress.add_task(first_step, total=None)

        def report(description: str) -> None:
            progress.update(step, description=description)

        yield progress, report


def bar_reporter(progress: Progress) -> Callable[[str, int, int], None]:
    """A ``(description, done, total)`` callback (what evaluations report) that keeps one bar per description."""
    bars: dict[str, TaskID] = {}

    def report(description: str, done: int, total: int) -> None:
        if description not in bars:
            bars[description] = progress.add_task(description, total=total)
        progress.update(bars[description], completed=done, total=total)

    return report
