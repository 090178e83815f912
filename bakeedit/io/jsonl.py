"""Line-oriented reading: JSON Lines with line numbers, and plain one-item-a-line text files. In JSON Lines every
bad line or missing field is a DataError naming the file and line.

The package's own probe data (``bakeedit/data``) and the benchmark loaders (``evaluate/tasks``) read through this,
so a malformed file is reported the same way wherever it is read, and the file is read once.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bakeedit.errors import DataError


def read_jsonl_numbered(path: Path, required: Sequence[str] = (), null_is_missing: bool = False
                        ) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each non-blank line; a line that is not JSON, not an object, or lacks one of
    ``required`` (or, with ``null_is_missing``, holds ``null`` there) is a DataError naming ``path:line``."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as exc:
        raise DataError(f"{path}: no such data file") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not a UTF-8 text file ({exc.reason})") from exc
    rows: list[tuple[int, dict[str, Any]]] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
        if not isinstance(item, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(item).__name__}")
        missing = [f for f in required if f not in item]
        if missing:
            raise DataError(f"{path}:{lineno}: missing field(s) {', '.join(missing)}")
        empty = [f for f in required if null_is_missing and item[f] is None]
        if empty:
            raise DataError(f"{path}:{lineno}: missing field {empty[0]!r} (it is null)",
                            hint=f"expected fields: {', '.join(required)} (see the data set's SOURCE.md)")
        rows.append((lineno, item))
    return rows


def read_jsonl(path: Path, required: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The objects of a JSON Lines file (see :func:`read_jsonl_numbered`), without their line numbers."""
    return [item for _, item in read_jsonl_numbered(path, required)]


def read_lines(path: Path, what: str) -> list[str]:
    """The non-blank lines of a text file that are not ``#`` comments, stripped (probe sentences, neutral text);
    a missing or empty file is a DataError naming it and ``what`` it should hold."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as exc:
        raise DataError(f"{path}: no such {what} file") from exc
    found = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not found:
        raise DataError(f"{path}: no {what} (one a line; '#' starts a comment)")
    return found
