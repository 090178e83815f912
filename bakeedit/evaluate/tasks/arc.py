"""ARC-Easy and ARC-Challenge (Clark et al. 2018, "Think you have Solved Question Answering? Try ARC, the AI2
Reasoning Challenge", arXiv:1803.05457), test splits, zero-shot.

Prompt (lm-eval ``arc_easy``/``arc_challenge``): ``"Question: {question}\\nAnswer:"``, each option scored as
``" " + answer text``; metrics acc and acc_norm. The local copy is MosaicML's conversion (``query`` already starts
with ``"Question: "``, ``choices``, ``gold``), see ``arc/SOURCE.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from bakeedit.evaluate.tasks.base import load_hf_rows, read_jsonl, register_task, require_file
from bakeedit.evaluate.tasks.multiple_choice import MCItem, MultipleChoiceTask, check_gold

_PREFIX = "Question: "


def arc_context(question: str) -> str:
    """lm-eval's ARC prompt for a question stem (with or without the ``Question: `` prefix already in place)."""
    question = question.strip()
    if not question.startswith(_PREFIX):
        question = _PREFIX + question
    return question + "\nAnswer:"


class _Arc(MultipleChoiceTask):
    version: ClassVar[str] = "1"
    default_source: ClassVar[str] = "arc"
    hf_dataset: ClassVar[str | None] = "allenai/ai2_arc"
    file_name: ClassVar[str]
    hf_config: ClassVar[str]

    def read_local(self, path: Path) -> tuple[list[MCItem], list[Path]]:
        file = require_file(path, self.file_name)
        items = []
        for line_no, row in read_jsonl(file, ("query", "choices", "gold")):
            where = f"{file}:{line_no}"
            choices = [str(c) for c in row["choices"]]
            items.append(MCItem(str(line_no), arc_context(row["query"]), choices,
                                check_gold(row["gold"], len(choices), where)))
        return items, [file]

    def read_hf(self, dataset_id: str) -> list[MCItem]:
        items = []
        for row in load_hf_rows(dataset_id, self.hf_config, "test"):
            labels = list(row["choices"]["label"])
            items.append(MCItem(str(row["id"]), arc_context(row["question"]), list(row["choices"]["text"]),
                                labels.index(row["answerKey"])))
        return items


@register_task
class ArcEasy(_Arc):
    """ARC-Easy test split (2,376 questions)."""

    name: ClassVar[str] = "arc_easy"
    file_name: ClassVar[str] = "arc_easy_test.jsonl"
    hf_config: ClassVar[str] = "ARC-Easy"


@register_task
class ArcChallenge(_Arc):
    """ARC-Challenge test split (1,172 questions)."""

    name: ClassVar[str] = "arc_challenge"
    file_name: ClassVar[str] = "arc_challenge_test.jsonl"
    hf_config: ClassVar[str] = "ARC-Challenge"
