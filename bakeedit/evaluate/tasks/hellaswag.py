"""HellaSwag (Zellers et al. 2019, "HellaSwag: Can a Machine Really Finish Your Sentence?", ACL), validation split,
zero-shot.

Prompt (lm-eval ``hellaswag``): ``"{activity_label}: {context}"``, each ending scored as ``" " + ending``; metrics
acc and acc_norm; text passed through lm-eval's ``preprocess`` (WikiHow ``[title]`` -> ``". "``, other bracket tags
dropped, double spaces collapsed). The local copy is the llama.cpp-style rendering (6 lines per item: label and
context, gold index, four endings; see ``hellaswag/SOURCE.md``). It keeps the second context fragment's first letter
as written, where lm-eval capitalises it (``ctx_b.capitalize()``), so scores can differ slightly from lm-eval's.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import ClassVar

from bakeedit.errors import DataError
from bakeedit.evaluate.tasks.base import load_hf_rows, register_task, require_file
from bakeedit.evaluate.tasks.multiple_choice import MCItem, MultipleChoiceTask, check_gold

LINES_PER_ITEM = 6


def preprocess(text: str) -> str:
    """lm-eval's HellaSwag text clean-up."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def read_rendered(file: Path) -> list[tuple[int, str, int, list[str]]]:
    """``(first line number, context, gold, endings)`` per item of the 6-lines-per-item rendering."""
    lines = file.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % LINES_PER_ITEM:
        last = len(lines) - len(lines) % LINES_PER_ITEM + 1
        raise DataError(f"{file}:{last}: incomplete item: expected {LINES_PER_ITEM} lines per item "
                        "(context, gold index, 4 endings)")
    out = []
    for start in range(0, len(lines), LINES_PER_ITEM):
        ctx, gold, *endings = lines[start:start + LINES_PER_ITEM]
        line_no = start + 1
        if not ctx.strip():
            raise DataError(f"{file}:{line_no}: missing field 'context' (empty line)")
        for k, e in enumerate(endings):
            if not e.strip():
                raise DataError(f"{file}:{line_no + 2 + k}: missing field 'ending {k}' (empty line)")
        out.append((line_no, ctx, check_gold(gold.strip(), len(endings), f"{file}:{line_no + 1}"), endings))
    return out


@register_task
class HellaSwag(MultipleChoiceTask):
    """HellaSwag validation split (10,042 items)."""

    name: ClassVar[str] = "hellaswag"
    version: ClassVar[str] = "1"
    default_source: ClassVar[str] = "hellaswag"
    hf_dataset: ClassVar[str | None] = "Rowan/hellaswag"

    def read_local(self, path: Path) -> tuple[list[MCItem], list[Path]]:
        file = require_file(path, "hellaswag_val_full.txt")
        items = [MCItem(str(line_no), preprocess(ctx), [preprocess(e) for e in endings], gold)
                 for line_no, ctx, gold, endings in read_rendered(file)]
        return items, [file]

    def read_hf(self, dataset_id: str) -> list[MCItem]:
        items = []
        for r in load_hf_rows(dataset_id, None, "validation"):
            ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize()
            items.append(MCItem(str(r["ind"]), preprocess(r["activity_label"] + ": " + ctx),
                                [preprocess(e) for e in r["endings"]], int(r["label"])))
        return items
