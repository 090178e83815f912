"""Package data written by us (bias-knowledge questions, word lists, contrast prompts) and its splits.

Every item carries a ``split``: ``locate`` items are what locate methods see; ``heldout`` items are what the
built-in evaluation probes score, so a method is never judged on the items it located with.
"""

from __future__ import annotations

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


def select_split(items: list[dict[str, Any]], split: str | None) -> list[dict[str, Any]]:
    """Items of one split (``None`` = all)."""
    if split is not None and split not in SPLITS:
        raise DataError(f"unknown split '{split}'", hint=f"splits: {', '.join(SPLITS)}")
    return items if split is None else [it for it in items if it.get("split") == split]
