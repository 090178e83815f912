"""WinoGrande (Sakaguchi et al. 2020, "WinoGrande: An Adversarial Winograd Schema Challenge at Scale", AAAI),
v1.1 dev split (the XL release's validation set), zero-shot, with partial scoring.

Partial scoring (Trinh & Le 2018; lm-eval ``winogrande``): the blank ``_`` is filled with each option and the two
resulting *contexts* ``sentence[:blank] + option`` are compared on the log-likelihood of the shared continuation
``" " + sentence[blank + 1:].strip()``. Metric acc (lm-eval reports no acc_norm here). Reads the original
``dev.jsonl`` (``sentence``, ``option1``, ``option2``, ``answer`` "1"|"2").
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from bakeedit.errors import DataError
from bakeedit.evaluate.tasks.base import load_hf_rows, read_jsonl, register_task, require_file
from bakeedit.evaluate.tasks.multiple_choice import MCItem, MultipleChoiceTask, check_gold


def winogrande_item(item_id: str, sentence: str, option1: str, option2: str, gold: int, where: str) -> MCItem:
    """The partial-scoring form of one item: two contexts, one shared continuation."""
    if sentence.count("_") != 1:
        raise DataError(f"{where}: field 'sentence' must contain exactly one '_' blank: {sentence!r}")
    blank = sentence.index("_")
    target = sentence[blank + 1:].strip()
    contexts = [sentence[:blank] + option1, sentence[:blank] + option2]
    # acc_norm is not reported, so the choice texts only label the options
    return MCItem(item_id, "", [option1, option2], gold, continuations=[" " + target] * 2, contexts=contexts)


@register_task
class Winogrande(MultipleChoiceTask):
    """WinoGrande 1.1 dev split (1,267 items)."""

    name: ClassVar[str] = "winogrande"
    version: ClassVar[str] = "1"
    default_source: ClassVar[str] = "winogrande"
    hf_dataset: ClassVar[str | None] = "allenai/winogrande"
    norm: ClassVar[bool] = False

    def read_local(self, path: Path) -> tuple[list[MCItem], list[Path]]:
        file = require_file(path, "dev.jsonl")
        items = []
        for line_no, row in read_jsonl(file, ("qID", "sentence", "option1", "option2", "answer")):
            where = f"{file}:{line_no}"
            gold = check_gold(str(row["answer"]).strip() or None, 3, where, field="answer") - 1
            if gold < 0:
                raise DataError(f"{where}: field 'answer' must be '1' or '2', got {row['answer']!r}")
            items.append(winogrande_item(str(row["qID"]), row["sentence"], row["option1"], row["option2"], gold,
                                         where))
        return items, [file]

    def read_hf(self, dataset_id: str) -> list[MCItem]:
        return [
            winogrande_item(str(i), r["sentence"], r["option1"], r["option2"], int(r["answer"]) - 1,
                            f"{dataset_id}[{i}]")
            for i, r in enumerate(load_hf_rows(dataset_id, "winogrande_xl", "validation"))
        ]
