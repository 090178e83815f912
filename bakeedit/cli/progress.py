"""One rich Progress for a command: a spinner line for the current step, plus bars that methods add.

rich allows one live display at a time, so a command creates this once and hands it down (locate methods and
evaluations add their own tasks to it) instead of nesting spinners and bars.
"""

from __future__ import annotations

import time
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


class PlainLineProgress(Progress):
    """rich's Progress for a log, not a terminal: no live display, but one plain line when a step starts (with the
    time since the command started and the previous step's duration) and one per tenth of a bar (done/total,
    elapsed and an estimate of the rest), so a log of a long run is not an hour of silence."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs, disable=True)
        self._started = time.monotonic()
        self._step: tuple[str, float] | None = None
        self._shown: dict[TaskID, int] = {}

    def _line(self, text: str) -> None:
        console.print(f"[{time.monotonic() - self._started:7.1f}s] {text}", highlight=False, markup=False)

    def step(self, description: str) -> None:
        now = time.monotonic()
        if self._step is not None:
            self._line(f"done: {self._step[0]} ({now - self._step[1]:.1f}s)")
        self._step = (description, now)
        self._line(description)

    def update(self, task_id: TaskID, **kwargs) -> None:
        super().update(task_id, **kwargs)
        task = self._tasks[task_id]
        if not task.total:
            return
        tenth = int(10 * min(task.completed, task.total) / task.total)
        if tenth > self._shown.get(task_id, 0):
            self._shown[task_id] = tenth
            elapsed = task.elapsed or 0.0
            left = elapsed * (task.total - task.completed) / task.completed if task.completed else float("nan")
            self._line(f"  {task.description}: {int(task.completed)}/{int(task.total)} ({elapsed:.0f}s, "
                       f"~{left:.0f}s left)")

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        self.update(task_id, advance=advance)


@contextmanager
def command_progress(first_step: str = "starting") -> Iterator[tuple[Progress, Callable[[str], None]]]:
    """Yield ``(progress, report)``; ``report("step")`` renames the step line. On a terminal: rich's spinner and
    bars; otherwise (a log, CI) :class:`PlainLineProgress`'s plain lines."""
    columns = (SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    if not console.is_terminal:
        with PlainLineProgress(*columns, console=console) as progress:
            if first_step != "starting":  # the placeholder a terminal shows until the first real step
                progress.step(first_step)
            yield progress, progress.step
        return
    # transient: the command prints its own summary; a failed step leaves only the error line
    with Progress(*columns, console=console, transient=True) as progress:
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
