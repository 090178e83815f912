"""Which paths an output may be written to, and which existing outputs bakeedit may replace.

* ``-o`` may not be empty, equal to or above ``/``, ``$HOME`` or the current directory, nor equal to or above the
  folders a run reads (a caller passes them as :class:`Protected`; the base model's folder refuses ``inside`` too):
  replacing such a folder would delete the user's own files or the base weights. Checked before any model loads.
* ``--overwrite`` replaces a folder only if it is a bakeedit output: a ``bakeedit.json`` (or a sweep's
  ``sweep.json``) that parses and carries bakeedit's keys, and no file bakeedit does not write there. Anything else
  is refused with the names of the files in the way, and nothing is touched. A single-file output is replaced only
  if the caller's ``is_ours`` recognises it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from bakeedit.errors import OutputExistsError, OutputNotOursError, OutputPathError
from bakeedit.io.temporaries import is_dead_temporary, output_lock, remove_stale_temporaries

#: Files an ``apply`` folder holds besides those its bakeedit.json lists in ``files_sha256``. These mirror the
#: constants of their writers (provenance, card, pipeline, apply_eval; a test checks they agree): importing them
#: here would import the whole pipeline into the module every writer imports.
CHECKPOINT_NAMES = frozenset({"bakeedit.json", "README.md", "neurons.json", "recipe.yaml", "neurons_heatmap.png",
                              "neurons-random.json"})
#: Files carried from the base model that bakeedit does not hash (see ``export/stream.py`` and ``export/save.py``).
CARRIED_NAMES = frozenset({"merges.txt", "vocab.txt", "LICENSE", "LICENSE.txt", "LICENSE.md", "NOTICE",
                           "USE_POLICY.md"})
CARRIED_UNHASHED_SUFFIXES = (".model", ".jinja", ".tiktoken")
#: What ``bakeedit sweep`` writes.
SWEEP_NAMES = frozenset({"sweep.json", "sweep.md", "tradeoff.png", "neurons.json"})
#: What ``bakeedit search`` writes.
SEARCH_NAMES = frozenset({"search.json", "front.md", "front.png", "trials.jsonl", "trials.md", "recipe.yaml",
                          "neurons.json", "study.db"})
#: The markers a sweep and a search folder are recognised by, and the keys every bakeedit marker carries.
SWEEP_MARKER = "sweep.json"
SEARCH_MARKER = "search.json"
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
        if is_dead_temporary(entry.name):
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
    elif read_marker(folder / SEARCH_MARKER) is not None:
        allowed = lambda rel: len(rel) == 1 and rel[0] in SEARCH_NAMES  # noqa: E731
    else:
        return (f"is not a bakeedit output (it has no {PROVENANCE_MARKER}, {SWEEP_MARKER} or {SEARCH_MARKER} "
                "written by bakeedit)")
    extras, _ = _extras(folder, (), allowed)
    if not extras:
        return None
    more = f" and {len(extras) - _MAX_NAMED} more" if len(extras) > _MAX_NAMED else ""
    return f"holds files bakeedit did not write: {', '.join(extras[:_MAX_NAMED])}{more}"


def check_output(out: str | Path, overwrite: bool, protected: Sequence[Protected | tuple] = ()) -> Path:
    """Fail early (before any model is loaded) if ``out`` may not be written; returns it resolved.

    ``protected`` adds the caller's folders (:func:`bakeedit.workflows.outputs.protected_for_recipe`) to ``/``,
    ``$HOME`` and the current directory. The leftovers of killed runs are dealt with first, so an orphaned previous
    output is back in place before deciding whether ``out`` exists."""
    out = check_output_path(out, protected)
    blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise OutputPathError(f"-o '{out}': '{blocker}' is a file, not a folder, so nothing can be written below it",
                              hint="choose an -o whose parent folders are folders (or can be created)")
    if out.parent.is_dir():
        with output_lock(out):
            remove_stale_temporaries(out)
    return check_existing(out, overwrite)


def check_existing(out: Path, overwrite: bool) -> Path:
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


