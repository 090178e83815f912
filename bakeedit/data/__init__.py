"""Package data written by us (bias-knowledge questions, word lists, contrast prompts) and JSONL reading.

Every item carries a ``split``: ``locate`` items are what locate methods see; ``heldout`` items are what the
built-in evaluation probes score, so a method is never judged on the items it located with.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from bakeedit.errors import DataError

SPLITS = ("locate", "heldout")


def package_data_path(name: str) -> Path:
    """Path of a file shipped in ``bakeedit/data``."""
    path = Path(str(resources.files("bakeedit.data").joinpath(name)))
    if not path.exists():
        raise DataError(f"bakeedit data file '{name}' is missing from the installed package")
    return path


def read_jsonl(path: Path, required: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Read a JSONL file; a bad line or a missing field is a :class:`DataError` naming the file and line."""
    items: list[dict[str, Any]] = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as exc:
        raise DataError(f"{path}: no such data file") from exc
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
        items.append(item)
    return items


def select_split(items: list[dict[str, Any]], split: str | None) -> list[dict[str, Any]]:
    """Items of one split (``None`` = all)."""
    if split is not None and split not in SPLITS:
        raise DataError(f"unknown split '{split}'", hint=f"splits: {', '.join(SPLITS)}")
    return items if split is None else [it for it in items if it.get("split") == split]
