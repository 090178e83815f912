"""One progress display for a command: a spinner line for the current step, plus bars that methods add.

rich allows one live display at a time, so a command creates this once and hands it down (locate methods and
evaluations add their own tasks to it) instead of nesting spinners and bars.

On a terminal that is rich's live display. Anywhere else (a log file, CI, ``nohup``, a pipe) rich would show
nothing until the end, so :class:`PlainProgress` writes plain lines to stderr instead: one when a step starts and
one per tenth of a bar (at most one every :data:`MIN_BAR_INTERVAL_S` seconds per bar, its completion always), each
starting with :data:`PROGRESS_PREFIX` and matching :data:`PROGRESS_LINE`, e.g.::

    bakeedit [  12.3s] locate neurons
    bakeedit [  40.1s] base: bbq 50% (600/1200, est. 30s left)

so ``grep -v '^bakeedit \\['`` leaves only the command's own output, and an error is still the one ``error:`` line
after them. ``BAKEEDIT_PROGRESS=plain|rich|none`` forces a mode (``none``: no progress at all).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

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
from bakeedit.errors import BakeeditError

#: Every plain progress line starts with this (then the seconds since the command's first step, then ``] ``).
PROGRESS_PREFIX = "bakeedit ["
#: A plain progress line, e.g. ``bakeedit [  12.3s] locate neurons``: what tests and log readers filter out.
PROGRESS_LINE = re.compile(r"^bakeedit \[ *\d+\.\ds\] \S")
#: Forces the progress mode: ``plain``, ``rich`` or ``none`` (unset: rich on a terminal, plain lines otherwise).
PROGRESS_ENV = "BAKEEDIT_PROGRESS"
MODES = ("plain", "rich", "none")
#: A bar's plain line is shown at most this often (seconds), except the line of its completion.
MIN_BAR_INTERVAL_S = 2.0


def progress_mode() -> str:
    """``rich``, ``plain`` or ``none``: ``$BAKEEDIT_PROGRESS`` if set, else rich on a terminal, plain otherwise."""
    forced = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if forced:
        if forced not in MODES:
            raise BakeeditError(f"{PROGRESS_ENV}: '{forced}' is not one of {', '.join(MODES)}",
                                hint=f"unset {PROGRESS_ENV} (rich on a terminal, plain lines otherwise) or pick one")
        return forced
    return "rich" if console.is_terminal else "plain"


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class PlainProgress(Progress):
    """rich's Progress without its live display (tasks are still tracked, so locate methods and evaluations use it
    unchanged), writing plain lines instead: :meth:`step` when a step starts, and one per tenth of a bar with
    done/total and an estimate of the time left (the bar's rate so far), at most one every
    :data:`MIN_BAR_INTERVAL_S` per bar, its completion always. Nothing is written before the first step or bar."""

    def __init__(self, *columns: Any, **kwargs: Any) -> None:
        super().__init__(*columns, **{**kwargs, "disable": True})
        self._started = self.get_time()
        self._step: str | None = None
        self._tenth: dict[TaskID, int] = {}
        self._shown_at: dict[TaskID, float] = {}
        self._finished: set[TaskID] = set()

    def _line(self, text: str) -> None:
        text = " ".join(text.split())  # one line, whatever the description holds
        console.print(f"{PROGRESS_PREFIX}{self.get_time() - self._started:6.1f}s] {text}", markup=False,
                      highlight=False, emoji=False, soft_wrap=True)  # soft_wrap: never cut into a second line

    def step(self, description: str) -> None:
        """A step starts (the same step reported twice in a row is one line)."""
        if description != self._step:
            self._step = description
            self._line(description)

    def update(self, task_id: TaskID, **kwargs: Any) -> None:
        super().update(task_id, **kwargs)
        self._show_bar(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._show_bar(task_id)

    def _show_bar(self, task_id: TaskID) -> None:
        with self._lock:
            task = self._tasks[task_id]
            total, done, elapsed, began = task.total, task.completed, task.elapsed or 0.0, task.start_time
        if not total:
            return
        now = self.get_time()
        if done >= total:
            if task_id not in self._finished:
                self._finished.add(task_id)
                self._tenth[task_id], self._shown_at[task_id] = 10, now
                self._line(f"{task.description} 100% ({int(done)}/{int(total)}, took {_duration(elapsed)})")
            return
        tenth = int(10 * done / total)
        if task_id in self._finished:  # its total grew after it finished: count tenths of the new total
            self._finished.discard(task_id)
            self._tenth[task_id] = tenth
        recent = now - self._shown_at.get(task_id, now if began is None else began) < MIN_BAR_INTERVAL_S
        if tenth <= self._tenth.get(task_id, 0) or recent:
            return
        self._tenth[task_id], self._shown_at[task_id] = tenth, now
        left = elapsed * (total - done) / done
        self._line(f"{task.description} {100 * done / total:.0f}% ({int(done)}/{int(total)}, "
                   f"est. {_duration(left)} left)")


@contextmanager
def command_progress(first_step: str = "starting") -> Iterator[tuple[Progress, Callable[[str], None]]]:
    """Yield ``(progress, report)``; ``report("step")`` starts a step. On a terminal, rich's spinner line (renamed
    by each step) and bars, exactly as before; otherwise :class:`PlainProgress`'s lines on stderr (nothing is
    written until a step really starts: the default ``first_step`` is only a terminal's placeholder); ``none``
    shows nothing."""
    columns = (SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    mode = progress_mode()
    if mode != "rich":
        with (PlainProgress(*columns, console=console) if mode == "plain"
              else Progress(*columns, console=console, disable=True)) as progress:
            if isinstance(progress, PlainProgress):
                if first_step != "starting":  # a real step, not the placeholder a terminal shows until the first
                    progress.step(first_step)
                yield progress, progress.step
            else:
                yield progress, lambda _description: None
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

    last: dict[str, int] = {}

    def report(description: str, done: int, total: int) -> None:
        if description not in bars:
            bars[description] = progress.add_task(description, total=total)
        elif done < last[description]:  # the same work again (a search's next trial): a fresh bar, whose time and
            progress.reset(bars[description], total=total)  # estimate are its own
        last[description] = done
        progress.update(bars[description], completed=done, total=total)

    return report
