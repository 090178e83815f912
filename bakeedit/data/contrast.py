"""The contrast prompt sets of ``coco`` (``bakeedit/data/contrast_prompts.jsonl``, documented in docs/data.md).

Each item is an ambiguous BBQ-style context naming two people of contrasting social groups, a question that invites
the stereotype (the prompt of set X) and a matched neutral question about the same context (set Y), plus the three
answer options that the evaluation's ``contrast_success`` probe scores on the ``heldout`` split.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bakeedit.data import SPLITS, package_data_path
from bakeedit.errors import DataError
from bakeedit.io.jsonl import read_jsonl

CONTRAST_FILE = "contrast_prompts.jsonl"
FIELDS = ("id", "category", "context", "question", "neutral_question", "options", "split")
OPTION_KEYS = ("stereotyped", "anti_stereotyped", "unknown")


@dataclass(frozen=True)
class ContrastItem:
    """One item: ``x_text`` invites the stereotype, ``y_text`` asks a neutral question about the same context."""

    id: str
    category: str
    context: str
    question: str
    neutral_question: str
    options: dict[str, str]
    split: str

    @property
    def x_text(self) -> str:
        return f"{self.context} {self.question}"

    @property
    def y_text(self) -> str:
        return f"{self.context} {self.neutral_question}"


def _check(raw: dict, path: Path, position: int) -> ContrastItem:
    where = f"{path}: item {position} (id {raw.get('id')!r})"
    for key in ("id", "category", "context", "question", "neutral_question", "split"):
        if not isinstance(raw[key], str) or not raw[key].strip():
            raise DataError(f"{where}: field '{key}' must be a non-empty string")
    if raw["split"] not in SPLITS:
        raise DataError(f"{where}: split '{raw['split']}' is not one of {', '.join(SPLITS)}")
    options = raw["options"]
    if not isinstance(options, dict) or any(not isinstance(options.get(k), str) for k in OPTION_KEYS):
        raise DataError(f"{where}: 'options' must map each of {', '.join(OPTION_KEYS)} to a string")
    return ContrastItem(
        id=raw["id"], category=raw["category"], context=raw["context"], question=raw["question"],
        neutral_question=raw["neutral_question"], options={k: options[k] for k in OPTION_KEYS}, split=raw["split"],
    )


def load_contrast_items(
    path: Path | None = None,
    split: str | None = "locate",
    categories: list[str] | None = None,
    max_items: int | None = None,
) -> list[ContrastItem]:
    """Validated items of ``split`` (``None`` = all), optionally only ``categories`` and the first ``max_items``
    of each category in file order. Every problem is a :class:`DataError` naming the file and the item."""
    path = Path(path) if path is not None else package_data_path(CONTRAST_FILE)
    items = [_check(raw, path, i) for i, raw in enumerate(read_jsonl(path, required=FIELDS), start=1)]
    duplicates = [k for k, n in Counter(it.id for it in items).items() if n > 1]
    if duplicates:
        raise DataError(f"{path}: duplicate item id(s) {', '.join(sorted(duplicates)[:5])}")
    if split is not None:
        items = [it for it in items if it.split == split]
    present = sorted({it.category for it in items})
    if categories is not None:
        unknown = sorted(set(categories) - set(present))
        if unknown:
            raise DataError(
                f"{path}: no {split or ''} items of categor{'y' if len(unknown) == 1 else 'ies'} "
                f"{', '.join(unknown)}",
                hint="categories in this file: " + ", ".join(present),
            )
        items = [it for it in items if it.category in categories]
    if max_items is not None:
        seen: Counter[str] = Counter()
        kept = []
        for it in items:
            if seen[it.category] < max_items:
                kept.append(it)
                seen[it.category] += 1
        items = kept
    if not items:
        raise DataError(f"{path}: no items for split '{split}'")
    return items


def by_category(items: list[ContrastItem]) -> dict[str, list[ContrastItem]]:
    """Items grouped per category, categories in order of first appearance."""
    groups: dict[str, list[ContrastItem]] = {}
    for it in items:
        groups.setdefault(it.category, []).append(it)
    return groups
