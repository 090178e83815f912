"""Write outputs atomically: a staged folder or file renamed into place only when complete.

A folder output (``apply``, ``sweep``, a streamed bake) is built in a hidden sibling ``.NAME.tmp-PID-tTOKEN-RAND``
and renamed into place at the end; an error or an interrupt (SIGINT, and SIGTERM/SIGHUP, which the CLI turns into
``KeyboardInterrupt``) removes it, so a failed run leaves nothing behind. A file output (``locate -o
neurons.json``) is written to a hidden sibling and ``os.replace``-d; ``eval`` files are moved into their folder one
by one, the marker (``results.json``) last.

Why each rule exists:

* ``-o`` may not be empty, equal to or above ``/``, ``$HOME`` or the current directory, nor equal to or above the
  recipe's or the neurons file's folder, nor equal to, inside or above the base model's folder: replacing such a
  folder would delete the user's own files (or the base weights) — checked before any model is loaded.
* ``--overwrite`` replaces a folder only if it is a bakeedit output: a ``bakeedit.json`` (or a sweep's
  ``sweep.json``) that parses and carries bakeedit's keys, and no file bakeedit does not write there. Anything else
  is refused with the names of the files in the way, and nothing is touched.
* The swap (``out -> .old``, ``tmp -> out``) undoes its first rename if the second fails, runs with interrupts
  deferred, and is serialised by an ``flock`` on ``.NAME.lock`` that also guards the re-check of ``out``, so a
  concurrent writer makes the losing run fail cleanly (its temporary removed) instead of leaving a hidden copy.
* Files and folders are fsync-ed before the final rename and the parent after it: a crash leaves the old output or
  the complete new one, never a renamed folder of empty files.
* A run killed outright (SIGKILL, power loss) leaves a hidden temporary; the next run for the same output deletes
  it when its owner is gone (the pid is dead, or is alive with another start time/boot: a reused pid), and an
  orphaned ``.old`` that holds the only copy of the previous output is renamed back instead of deleted.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from bakeedit.errors import BakeeditError
from bakeedit.io.ownership import Protected, check_existing, check_output, check_output_file
from bakeedit.io.temporaries import (
    fsync_dir,
    fsync_path,
    fsync_tree,
    make_temp_dir,
    output_lock,
    remove_stale_temporaries,
    remove_tree,
    signals_deferred,
    temp_name,
)

# --- the staged writers -----------------------------------------------------------------------------------------


def _swap(tmp: Path, out: Path) -> None:
    """``tmp`` becomes ``out``; a previous ``out`` is moved aside first and deleted only once ``tmp`` is in place.
    If the second rename fails, the first is undone: the previous output is never left only in a hidden folder."""
    if not os.path.lexists(out):
        os.rename(tmp, out)
        fsync_dir(out.parent)
        return
    old = out.parent / temp_name(out, "old")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException as exc:
        try:
            os.rename(old, out)
        except OSError:
            raise BakeeditError(f"output '{out}': the new folder could not be renamed into place ({exc}) and the "
                                f"previous output could not be put back: it is in '{old}'",
                                hint=f"rename '{old.name}' back to '{out.name}' (the next bakeedit run writing "
                                "there does so too)") from exc
        raise
    fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)


def _discard(path: Path, exc: BaseException) -> None:
    """Remove a temporary after an error; a second Ctrl-C must not leave it half-deleted."""
    with signals_deferred(reraise=not isinstance(exc, KeyboardInterrupt)):
        remove_tree(path)


@contextmanager
def staged_output(out: Path, overwrite: bool = False, protected: Sequence[Protected | tuple] = ()) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it becomes ``out``, on any error it is removed.

    The final check of ``out`` (a concurrent run may have created it) and the swap run under :func:`output_lock`,
    with interrupts deferred."""
    out = check_output(out, overwrite, protected)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out)
    try:
        yield tmp
        fsync_tree(tmp)
        with output_lock(out), signals_deferred():
            check_existing(out, overwrite)  # a concurrent run may have written it meanwhile
            _swap(tmp, out)
    except BaseException as exc:
        _discard(tmp, exc)
        raise


@contextmanager
def staged_file(out: Path, overwrite: bool, is_ours: Callable[[Path], bool], what: str) -> Iterator[Path]:
    """Yield a hidden temporary path beside the file ``out``; on success it is fsync-ed and ``os.replace``-d onto
    ``out`` (checked again under the lock), on any error it is removed."""
    out = check_output_file(out, overwrite, is_ours, what)
    out.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(out):
        remove_stale_temporaries(out)
    tmp = out.parent / temp_name(out)
    try:
        yield tmp
        fsync_path(tmp)
        with output_lock(out), signals_deferred():
            check_output_file(out, overwrite, is_ours, what)
            os.replace(tmp, out)
            fsync_dir(out.parent)
    except BaseException as exc:
        _discard(tmp, exc)
        raise


@contextmanager
def staged_into(folder: Path, marker: str, overwrite: bool, is_ours: Callable[[Path], bool],
                what: str) -> Iterator[Path]:
    """Yield a hidden temporary folder inside ``folder``; on success move each file written there into ``folder``
    (``os.replace``, the ``marker`` file last, so its presence means the rest is there), on error remove it.

    For outputs that share a folder with other files (``bakeedit eval -o``, by default a checkpoint's ``eval/``):
    every file appears complete or not at all, and a ``marker`` that bakeedit did not write is never replaced."""
    folder = Path(folder)
    target = folder / marker
    check_output_file(target, overwrite, is_ours, what)
    folder.mkdir(parents=True, exist_ok=True)
    with output_lock(target):
        remove_stale_temporaries(target)
    tmp = make_temp_dir(target)
    try:
        yield tmp
        fsync_tree(tmp)
        with output_lock(target), signals_deferred():
            check_output_file(target, overwrite, is_ours, what)
            _move_files(tmp, folder, marker)
    except BaseException as exc:
        _discard(tmp, exc)
        raise


def _move_files(src: Path, dst: Path, last: str) -> None:
    files = sorted((p.relative_to(src) for p in src.rglob("*") if not p.is_dir()), key=lambda r: (str(r) == last,
                                                                                                  str(r)))
    for rel in files:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(src / rel, dst / rel)
    for rel in {r.parent for r in files} | {Path(".")}:
        fsync_dir(dst / rel)
    shutil.rmtree(src, ignore_errors=True)
