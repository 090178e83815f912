"""Write outputs atomically, and replace only what bakeedit itself wrote.

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

import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from bakeedit.errors import BakeeditError, OutputExistsError, OutputNotOursError, OutputPathError

if TYPE_CHECKING:
    from bakeedit.recipe import LoadedRecipe

#: Files an ``apply`` folder holds besides those its bakeedit.json lists in ``files_sha256``. These mirror the
#: constants of their writers (provenance, card, pipeline, apply_eval; a test checks they agree): importing them
#: here would import the whole pipeline into the module every writer imports.
CHECKPOINT_NAMES = frozenset({"bakeedit.json", "README.md", "neurons.json", "recipe.yaml", "neurons_heatmap.png",
                              "neurons-random.json"})
#: Files carried from the base model that bakeedit does not hash (see ``edit/stream.py`` and ``export/save.py``).
CARRIED_NAMES = frozenset({"merges.txt", "vocab.txt", "LICENSE", "LICENSE.txt", "LICENSE.md", "NOTICE",
                           "USE_POLICY.md"})
CARRIED_UNHASHED_SUFFIXES = (".model", ".jinja", ".tiktoken")
#: What ``bakeedit sweep`` writes.
SWEEP_NAMES = frozenset({"sweep.json", "sweep.md", "tradeoff.png", "neurons.json"})
#: The marker a sweep folder is recognised by, and the keys every bakeedit marker carries.
SWEEP_MARKER = "sweep.json"
PROVENANCE_MARKER = "bakeedit.json"
MARKER_KEYS = ("bakeedit_version", "format_version")
_LEGACY_SWEEP_KEYS = ("lambdas", "points", "pareto", "recipe_sha256")  # sweep.json before it carried MARKER_KEYS
_EVAL_DIR, _PLOTS_DIR, _EVAL_FILES = "eval", "plots", frozenset({"results.json", "report.md"})
_KNOWN_DIRS = frozenset({_EVAL_DIR, f"{_EVAL_DIR}/{_PLOTS_DIR}"})
_MAX_NAMED = 5


# --- which paths -o may not be ---------------------------------------------------------------------------------


class Protected(NamedTuple):
    """A folder that replacing ``-o`` must not destroy. ``inside=True`` also refuses an ``-o`` within it (the base
    model's folder: a bake written into a checkpoint folder corrupts it); otherwise a new sub-folder is fine."""

    label: str
    path: Path
    inside: bool = True


def protected_for_recipe(lr: LoadedRecipe) -> list[Protected]:
    """The folders an ``apply``/``sweep`` of ``lr`` reads from: the recipe's, the neurons file's, the base model's.

    A relative model path is protected as resolved against the current directory (where it is loaded from) and
    against the recipe's folder (where ``verify`` looks for it)."""
    from bakeedit.models.embedded import EMBEDDED_ALIASES

    protected = [Protected("the recipe's folder", lr.path.parent, inside=False)]
    if lr.recipe.neurons_file is not None:
        protected.append(Protected("the neurons_file's folder", lr.resolve(lr.recipe.neurons_file).parent,
                                   inside=False))
    model = lr.recipe.model.id
    if model and model not in EMBEDDED_ALIASES:
        ref = Path(model).expanduser()
        for candidate in [ref] if ref.is_absolute() else [Path.cwd() / ref, lr.path.parent / ref]:
            if candidate.suffix == ".gguf":
                protected.append(Protected("the folder of the model's .gguf file", candidate.parent, inside=False))
            elif candidate.is_dir():
                protected.append(Protected("the base model's folder", candidate))
    return protected


def _always_protected() -> list[Protected]:
    fixed = [Protected("the root folder", Path("/"), inside=False),
             Protected("the current directory", Path.cwd(), inside=False)]
    home = os.environ.get("HOME")
    if home:
        fixed.insert(1, Protected("your home folder ($HOME)", Path(home), inside=False))
    return fixed


def _relation(out: Path, folder: Path, inside: bool) -> str | None:
    if out == folder:
        return "is"
    if folder.is_relative_to(out):
        return "contains"
    if inside and out.is_relative_to(folder):
        return "is inside"
    return None


def check_output_path(out: str | Path, protected: Sequence[Protected | tuple] = ()) -> Path:
    """``out`` resolved, or :class:`OutputPathError` if it is empty or would destroy a protected folder."""
    text = str(out)
    if not text.strip():
        raise OutputPathError("-o is empty: name the folder to write, e.g. -o ./debiased-model")
    resolved = Path(out).expanduser().resolve()
    entries = [Protected(*p) for p in (*protected, *_always_protected())]  # the caller's first: most telling
    found = []
    for entry in entries:
        relation = _relation(resolved, Path(entry.path).expanduser().resolve(), entry.inside)
        if relation is not None:
            found.append((("is", "is inside", "contains").index(relation), relation, entry))
    if found:
        _, relation, entry = min(found, key=lambda f: f[0])  # the most specific: "is" before "contains"
        shown = f"'{text}'" if text == str(resolved) else f"'{text}' ({resolved})"
        where = "" if relation == "is" else f" '{Path(entry.path).expanduser().resolve()}'"
        raise OutputPathError(f"-o {shown} {relation} {entry.label}{where}; refusing to write there")
    return resolved


# --- is this folder or file bakeedit's own ----------------------------------------------------------------------


def read_marker(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path`` if it parses and carries bakeedit's marker keys, else ``None``."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    if all(k in data for k in MARKER_KEYS):
        return data
    if Path(path).name == SWEEP_MARKER and all(k in data for k in _LEGACY_SWEEP_KEYS):
        return data
    return None


def is_neurons_file(path: Path) -> bool:
    """A NeuronSet JSON written by bakeedit (``created_with: bakeedit X``)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (isinstance(data, dict) and all(k in data for k in ("format_version", "method", "neurons"))
            and str(data.get("created_with", "")).startswith("bakeedit"))


def is_results_file(path: Path) -> bool:
    """An evaluation ``results.json`` written by bakeedit."""
    data = read_marker(path)
    return data is not None and "results" in data


def _allowed_in_eval(parts: tuple[str, ...]) -> bool:
    if len(parts) == 1:
        return parts[0] in _EVAL_FILES
    return len(parts) == 2 and parts[0] == _PLOTS_DIR and parts[1].endswith(".png")


def _allowed_checkpoint_file(rel: tuple[str, ...], hashed: set[str]) -> bool:
    if "/".join(rel) in hashed:
        return True
    if rel[0] == _EVAL_DIR:
        return _allowed_in_eval(rel[1:])
    if len(rel) != 1:
        return False
    name = rel[0]
    return name in CHECKPOINT_NAMES or name in CARRIED_NAMES or name.endswith(CARRIED_UNHASHED_SUFFIXES)


def _allowed_sweep_file(rel: tuple[str, ...]) -> bool:
    if rel[0] == _EVAL_DIR:
        return _allowed_in_eval(rel[1:])
    return len(rel) == 1 and rel[0] in SWEEP_NAMES


def _extras(folder: Path, rel: tuple[str, ...], allowed: Callable[[tuple[str, ...]], bool]) -> tuple[list[str], bool]:
    """(entries under ``folder/rel`` bakeedit did not write, whether anything there is bakeedit's). A folder with
    nothing of bakeedit's in it is named once (``data/``), not file by file, unless bakeedit names it (``eval/``)."""
    extras: list[str] = []
    ours = False
    with os.scandir(folder.joinpath(*rel)) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        sub = (*rel, entry.name)
        if _is_dead_temporary(entry.name):
            continue  # a killed run's leftover: bakeedit's, and deleted with the folder
        if entry.is_dir(follow_symlinks=False):
            sub_extras, sub_ours = _extras(folder, sub, allowed)
            if sub_ours or "/".join(sub) in _KNOWN_DIRS:
                extras += sub_extras
                ours = True
            else:
                extras.append("/".join(sub) + "/")
        elif allowed(sub):
            ours = True
        else:
            extras.append("/".join(sub))
    return extras, ours


def why_not_replaceable(folder: Path) -> str | None:
    """``None`` if ``--overwrite`` may replace ``folder`` (an empty folder, or a bakeedit output holding only what
    bakeedit writes), else the reason, for the one-line error."""
    folder = Path(folder)
    if not any(folder.iterdir()):
        return None
    provenance = read_marker(folder / PROVENANCE_MARKER)
    if provenance is not None:
        hashed = provenance.get("files_sha256")
        names = set(hashed) if isinstance(hashed, dict) else set()
        allowed: Callable[[tuple[str, ...]], bool] = lambda rel: _allowed_checkpoint_file(rel, names)  # noqa: E731
    elif read_marker(folder / SWEEP_MARKER) is not None:
        allowed = _allowed_sweep_file
    else:
        return f"is not a bakeedit output (it has no {PROVENANCE_MARKER} or {SWEEP_MARKER} written by bakeedit)"
    extras, _ = _extras(folder, (), allowed)
    if not extras:
        return None
    more = f" and {len(extras) - _MAX_NAMED} more" if len(extras) > _MAX_NAMED else ""
    return f"holds files bakeedit did not write: {', '.join(extras[:_MAX_NAMED])}{more}"


def check_output(out: str | Path, overwrite: bool, protected: Sequence[Protected | tuple] = ()) -> Path:
    """Fail early (before any model is loaded) if ``out`` may not be written; returns it resolved.

    ``protected`` adds the caller's folders (see :func:`protected_for_recipe`) to ``/``, ``$HOME`` and the
    current directory. The leftovers of killed runs are dealt with first, so an orphaned previous output is back in
    place before deciding whether ``out`` exists."""
    out = check_output_path(out, protected)
    blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise OutputPathError(f"-o '{out}': '{blocker}' is a file, not a folder, so nothing can be written below it",
                              hint="choose an -o whose parent folders are folders (or can be created)")
    if out.parent.is_dir():
        with output_lock(out):
            remove_stale_temporaries(out)
    return _check_existing(out, overwrite)


def _check_existing(out: Path, overwrite: bool) -> Path:
    if not out.exists():
        return out
    if not out.is_dir():
        raise OutputExistsError(f"output '{out}' exists and is not a folder", hint="choose another -o path")
    reason = why_not_replaceable(out)
    if not overwrite:
        if reason is None:
            raise OutputExistsError(f"output '{out}' already exists")
        raise OutputExistsError(f"output '{out}' already exists and {reason}",
                                hint="choose another -o folder; --overwrite replaces only what bakeedit wrote")
    if reason is not None:
        raise OutputNotOursError(f"output '{out}' {reason}; --overwrite will not replace it")
    return out


def check_output_file(out: str | Path, overwrite: bool, is_ours: Callable[[Path], bool], what: str) -> Path:
    """The same promise for a single-file output: replaced only with ``overwrite`` and only if ``is_ours``."""
    if not str(out).strip():
        raise OutputPathError(f"-o is empty: name the {what} to write")
    path = Path(out).expanduser()
    if path.is_dir():
        raise OutputPathError(f"-o '{out}' is a folder: name the {what} to write inside it")
    path = path.parent.resolve() / path.name
    if os.path.lexists(path):
        if not overwrite:
            raise OutputExistsError(f"output '{path}' already exists",
                                    hint="pass --overwrite to replace it, or choose another -o file")
        if path.is_symlink() or not path.is_file() or not is_ours(path):
            raise OutputNotOursError(f"output '{path}' is not a {what} written by bakeedit; --overwrite will not "
                                     "replace it")
    return path


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


def _is_dead_temporary(name: str) -> bool:
    match = _ANY_TEMP.match(name)
    return bool(match) and not owner_alive(int(match.group(2)), match.group(3))


def temp_name(out: Path, kind: str = "tmp") -> str:
    """``.NAME.KIND-PID-tTOKEN-RAND``: the pid and start token say whose it is, so the sweep leaves a live one."""
    token = process_token(os.getpid())
    owner = f"{os.getpid()}-t{token}" if token else f"{os.getpid()}"
    return f".{out.name}.{kind}-{owner}-{secrets.token_hex(4)}"


def _make_temp_dir(out: Path) -> Path:
    """A fresh hidden sibling folder with the usual permissions (``0o777 & ~umask``, unlike mkdtemp's 0700)."""
    while True:
        path = out.parent / temp_name(out)
        try:
            os.mkdir(path, 0o777)
        except FileExistsError:
            continue
        return path


def _remove(path: Path) -> None:
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
        _remove(sibling)
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


def _fsync_path(path: Path, directory: bool = False) -> None:
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
                _fsync_path(path)
        _fsync_path(Path(dirpath), directory=True)


def fsync_dir(folder: Path) -> None:
    _fsync_path(folder, directory=True)


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
        _remove(path)


@contextmanager
def staged_output(out: Path, overwrite: bool = False, protected: Sequence[Protected | tuple] = ()) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it becomes ``out``, on any error it is removed.

    The final check of ``out`` (a concurrent run may have created it) and the swap run under :func:`output_lock`,
    with interrupts deferred."""
    out = check_output(out, overwrite, protected)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _make_temp_dir(out)
    try:
        yield tmp
        fsync_tree(tmp)
        with output_lock(out), signals_deferred():
            _check_existing(out, overwrite)  # a concurrent run may have written it meanwhile
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
        _fsync_path(tmp)
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
    tmp = _make_temp_dir(target)
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
