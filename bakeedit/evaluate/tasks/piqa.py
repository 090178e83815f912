"""PIQA, Physical Interaction QA (Bisk et al. 2020, "PIQA: Reasoning about Physical Commonsense in Natural
Language", AAAI), validation split, zero-shot.

Prompt (lm-eval ``piqa``): ``"Question: {goal}\\nAnswer:"``, each solution scored as ``" " + solution``; metrics
acc and acc_norm. Reads the original ``valid.jsonl`` (``goal``, ``sol1``, ``sol2``) with the labels from
``valid-labels.lst`` (line i labels row i; 0 = sol1).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from bakeedit.errors import DataError
from bakeedit.evaluate.tasks.base import load_hf_rows, read_jsonl, register_task, require_file
from bakeedit.evaluate.tasks.multiple_choice import MCItem, MultipleChoiceTask, check_gold


def piqa_context(goal: str) -> str:
    return f"Question: {goal}\nAnswer:"


@register_task
class Piqa(MultipleChoiceTask):
    """PIQA validation split (1,838 items)."""

    name: ClassVar[str] = "piqa"
    version: ClassVar[str] = "1"
    default_source: ClassVar[str] = "piqa"
    hf_dataset: ClassVar[str | None] = "ybisk/piqa"

    def read_local(self, path: Path) -> tuple[list[MCItem], list[Path]]:
        if path.is_file():
            path = path.parent
        file = require_file(path, "valid.jsonl")
        labels_file = require_file(path, "valid-labels.lst")
        rows = read_jsonl(file, ("goal", "sol1", "sol2"))
        labels = [(i, s.strip()) for i, s in enumerate(labels_file.read_text().splitlines(), start=1) if s.strip()]
        if len(labels) != len(rows):
            raise DataError(f"{labels_file} has {len(labels)} labels but {file} has {len(rows)} rows")
        items = []
        for (line_no, row), (label_line, label) in zip(rows, labels, strict=True):
            gold = check_gold(label, 2, f"{labels_file}:{label_line}", field="label")
            items.append(MCItem(str(line_no), piqa_context(row["goal"]), [row["sol1"], row["sol2"]], gold))
        return items, [file, labels_file]

    def read_hf(self, dataset_id: str) -> list[MCItem]:
        return [
            MCItem(str(i), piqa_context(r["goal"]), [r["sol1"], r["sol2"]], int(r["label"]))
            for i, r in enumerate(load_hf_rows(dataset_id, None, "validation"), start=1)
        ]
