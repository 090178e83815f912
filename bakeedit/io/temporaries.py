"""Temporaries of staged outputs and who owns them, the per-output lock, deferred signals and fsync.

A staged write lives in a hidden sibling ``.NAME.tmp-PID-tTOKEN-RAND`` (``.NAME.old-...`` while a previous output
is moved aside). A run killed outright (SIGKILL, power loss) leaves one; the next run for the same output deletes
it when its owner is gone (the pid is dead, or is alive with another start time/boot: a reused pid), and renames
an orphaned ``.old`` that holds the only copy of the previous output back instead of deleting it. The check of an
output and its swap run under an ``flock`` on ``.NAME.lock``, with SIGINT/SIGTERM/SIGHUP deferred, so two runs
never interleave there and an interrupt never lands between the two renames.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

# --- temporaries and who owns them --------------------------------------------------------------------------------

_TEMP_SUFFIX = r"\.(tmp|old)-(\d+)(?:-t([0-9a-f]+))?(?:-|$)"
_ANY_TEMP = re.compile(rf"^\..+?{_TEMP_SUFFIX}")


def _temp_pattern(out: Path) -> re.Pattern[str]:
    return re.compile(rf"^\.{re.escape(out.name)}{_TEMP_SUFFIX}")


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:8]
    except OSError:
        return ""


def process_token(pid: int) -> str | None:
    """Boot id and start time of ``pid`` (Linux), so a pid reused by another process is not taken for the owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        start = int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None
    return f"{_boot_id()}{start:x}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:
        return False
    return True


def owner_alive(pid: int, token: str | None) -> bool:
    """Whether the process that made a temporary still runs (same pid and, where recorded, same start token)."""
    if not _pid_alive(pid):
        return False
    if token:
        current = process_token(pid)
        return current is None or current == token
    return True


def is_dead_temporary(name: str) -> bool:
    match = _ANY_TEMP.match(name)
    return bool(match) and not owner_alive(int(match.group(2)), match.group(3))


def temp_name(out: Path, kind: str = "tmp") -> str:
    """``.NAME.KIND-PID-tTOKEN-RAND``: the pid and start token say whose it is, so the sweep leaves a live one."""
    token = process_token(os.getpid())
    owner = f"{os.getpid()}-t{token}" if token else f"{os.getpid()}"
    return f".{out.name}.{kind}-{owner}-{secrets.token_hex(4)}"


def make_temp_dir(out: Path) -> Path:
    """A fresh hidden sibling folder with the usual permissions (``0o777 & ~umask``, unlike mkdtemp's 0700)."""
    while True:
        path = out.parent / temp_name(out)
        try:
            os.mkdir(path, 0o777)
        except FileExistsError:
            continue
        return path


def remove_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with suppress(FileNotFoundError):
            path.unlink()


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Delete the ``.NAME.tmp-*`` / ``.NAME.old-*`` siblings of ``out`` whose owner is gone; returns them.

    An orphaned ``.old`` while ``out`` is missing is the only copy of the previous output (a run killed between
    its two renames): it is renamed back to ``out``, not deleted."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    pattern = _temp_pattern(out)
    stale = []
    for sibling in out.parent.iterdir():
        match = pattern.match(sibling.name)
        if match and not owner_alive(int(match.group(2)), match.group(3)):
            with suppress(OSError):
                stale.append((match.group(1) != "old", -sibling.lstat().st_mtime, sibling))
    removed = []
    for is_tmp, _, sibling in sorted(stale):  # .old first, newest first
        if not is_tmp and not os.path.lexists(out):
            os.rename(sibling, out)
            continue
        remove_tree(sibling)
        removed.append(sibling)
    return removed


# --- locking, durability, interrupts ------------------------------------------------------------------------------


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``.NAME.lock`` beside ``out`` (removed again on release).

    The file is unlinked by its holder; a waiter that then wins the lock on the unlinked inode notices (the path
    now names another inode, or none) and retries, so two holders never overlap."""
    path = Path(out).parent / f".{Path(out).name}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            mine = os.fstat(fd)
            try:
                now = os.stat(path)
            except FileNotFoundError:
                now = None
        except BaseException:
            os.close(fd)
            raise
        if now is not None and (now.st_ino, now.st_dev) == (mine.st_ino, mine.st_dev):
            break
        os.close(fd)
    try:
        yield
    finally:
        with suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


_DEFERRED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextmanager
def signals_deferred(reraise: bool = True) -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP until the block is done (renames, clean-up), then act on them as they would have
    acted. With ``reraise=False`` (clean-up while an interrupt already unwinds) a signal that came meanwhile is
    dropped instead. A no-op outside the main thread, where Python cannot change handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {}
    for sig in _DEFERRED:
        handler = signal.getsignal(sig)
        if handler not in (signal.SIG_IGN, None):
            previous[sig] = handler
            signal.signal(sig, lambda signum, _frame: pending.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if pending and reraise:
            _deliver(pending[0], previous[pending[0]])


def _deliver(signum: int, handler: Any) -> None:
    if callable(handler):
        handler(signum, None)
    elif handler == signal.SIG_DFL:
        os.kill(os.getpid(), signum)


def fsync_path(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return  # e.g. a folder that cannot be opened on this platform: durability is best effort there
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):  # the file system does not sync this kind of file
            raise
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file, then every folder bottom-up, so a rename that lands on disk names complete files."""
    for dirpath, _dirnames, filenames in os.walk(folder, topdown=False):
        for name in filenames:
            path = Path(dirpath) / name
            if not path.is_symlink():
                fsync_path(path)
        fsync_path(Path(dirpath), directory=True)


def fsync_dir(folder: Path) -> None:
    fsync_path(folder, directory=True)


