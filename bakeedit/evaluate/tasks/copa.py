"""COPA, Choice Of Plausible Alternatives (Roemmele, Bejan & Gordon 2011, AAAI Spring Symposium), the SuperGLUE
validation split (Wang et al. 2019), zero-shot.

Prompt (lm-eval ``copa``): the premise without its final period, then `` because`` (cause) or `` therefore``
(effect); each alternative scored as ``" " + alternative`` with its first letter lower-cased; metric acc (lm-eval
reports no acc_norm for COPA). The local copy is MosaicML's rendering, whose ``query`` puts a comma before the
connective (``"..., therefore"``); the comma is removed so the prompt matches lm-eval's.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import ClassVar

from bakeedit.evaluate.tasks.base import load_hf_rows, read_jsonl, register_task, require_file
from bakeedit.evaluate.tasks.multiple_choice import MCItem, MultipleChoiceTask, check_gold

_COMMA_CONNECTIVE = re.compile(r",\s*(because|therefore)\s*$")


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


@register_task
class Copa(MultipleChoiceTask):
    """COPA (SuperGLUE validation, 100 items)."""

    name: ClassVar[str] = "copa"
    version: ClassVar[str] = "1"
    default_source: ClassVar[str] = "copa"
    hf_dataset: ClassVar[str | None] = "aps/super_glue"
    norm: ClassVar[bool] = False

    def read_local(self, path: Path) -> tuple[list[MCItem], list[Path]]:
        file = require_file(path, "copa_val.jsonl")
        items = []
        for line_no, row in read_jsonl(file, ("query", "choices", "gold")):
            context = _COMMA_CONNECTIVE.sub(r" \1", row["query"].strip())
            choices = [_lower_first(str(c)) for c in row["choices"]]
            items.append(MCItem(str(line_no), context, choices,
                                check_gold(row["gold"], len(choices), f"{file}:{line_no}")))
        return items, [file]

    def read_hf(self, dataset_id: str) -> list[MCItem]:
        items = []
        for r in load_hf_rows(dataset_id, "copa", "validation"):
            connective = {"cause": "because", "effect": "therefore"}[r["question"]]
            context = r["premise"].strip()[:-1] + f" {connective}"
            items.append(MCItem(str(r["idx"]), context, [_lower_first(r["choice1"]), _lower_first(r["choice2"])],
                                int(r["label"])))
        return items
