"""OpenBookQA (Mihaylov et al. 2018, "Can a Suit of Armor Conduct Electricity? A New Dataset for Open Book Question
Answering", EMNLP), test split, zero-shot, without the open-book fact.

Prompt (lm-eval ``openbookqa``): the bare question stem, each option scored as ``" " + answer text``; metrics acc
and acc_norm. Reads the official AI2 ``test.jsonl`` (``question.stem``, ``question.choices[].text/label``,
``answerKey``).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from bakeedit.errors import DataError
from bakeedit.evaluate.tasks.base import load_hf_rows, read_jsonl, register_task, require_file
from bakeedit.evaluate.tasks.multiple_choice import MCItem, MultipleChoiceTask


@register_task
class OpenBookQA(MultipleChoiceTask):
    """OpenBookQA main test split (500 questions)."""

    name: ClassVar[str] = "openbookqa"
    version: ClassVar[str] = "1"
    default_source: ClassVar[str] = "openbookqa"
    hf_dataset: ClassVar[str | None] = "allenai/openbookqa"

    def read_local(self, path: Path) -> tuple[list[MCItem], list[Path]]:
        file = require_file(path, "test.jsonl")
        items = []
        for line_no, row in read_jsonl(file, ("id", "question", "answerKey")):
            where = f"{file}:{line_no}"
            q = row["question"]
            if not isinstance(q, dict) or "stem" not in q or "choices" not in q:
                raise DataError(f"{where}: missing field 'question.stem' or 'question.choices'")
            try:
                texts = [str(c["text"]) for c in q["choices"]]
                labels = [str(c["label"]) for c in q["choices"]]
            except (KeyError, TypeError):
                raise DataError(f"{where}: missing field 'question.choices[].text' or '.label'") from None
            if row["answerKey"] not in labels:
                raise DataError(f"{where}: field 'answerKey' = {row['answerKey']!r} is not one of {labels}")
            items.append(MCItem(str(row["id"]), q["stem"].strip(), texts, labels.index(row["answerKey"])))
        return items, [file]

    def read_hf(self, dataset_id: str) -> list[MCItem]:
        return [
            MCItem(str(r["id"]), r["question_stem"].strip(), list(r["choices"]["text"]),
                   list(r["choices"]["label"]).index(r["answerKey"]))
            for r in load_hf_rows(dataset_id, "main", "test")
        ]
