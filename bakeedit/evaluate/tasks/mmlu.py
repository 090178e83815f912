"""MMLU, Measuring Massive Multitask Language Understanding (Hendrycks et al. 2021, ICLR), test split, 57 subjects.

Prompt (lm-eval ``mmlu``, default zero-shot): ``"The following are multiple choice questions (with answers) about
{subject}.\\n\\n{question}\\nA. {c0}\\nB. {c1}\\nC. {c2}\\nD. {c3}\\nAnswer:"``, the options scored as the letters
``" A"`` ... ``" D"``; metric acc. ``num_fewshot`` > 0 inserts the first k dev questions of the subject, each
followed by `` {letter}\\n\\n`` (lm-eval's ``first_n`` sampler). The overall acc is the mean over all scored
questions (lm-eval's size-weighted group average); the breakdown holds each subject and each of the four categories
(``category:stem`` ...). ``--limit`` samples questions across the chosen subjects, not per subject.

Small models answer lettered questions near chance (SmolLM2-135M prefers "A" whatever the content).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from bakeedit.errors import DataError, RecipeError
from bakeedit.evaluate.tasks.base import MetricValue, TaskData, TaskResult, load_hf_rows, mean_metric, register_task
from bakeedit.evaluate.tasks.multiple_choice import MCItem, MultipleChoiceTask, check_gold, score_items

if TYPE_CHECKING:
    from bakeedit.evaluate.engine import Scorer

LETTERS = ("A", "B", "C", "D")
HEADER = ["question", "choice0", "choice1", "choice2", "choice3", "answer"]

# lm-evaluation-harness's subject -> category map (lm_eval/tasks/mmlu/_generate_configs.py)
_STEM = ("abstract_algebra anatomy astronomy college_biology college_chemistry college_computer_science "
         "college_mathematics college_physics computer_security conceptual_physics electrical_engineering "
         "elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science "
         "high_school_mathematics high_school_physics high_school_statistics machine_learning")
_HUMANITIES = ("formal_logic high_school_european_history high_school_us_history high_school_world_history "
               "international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy "
               "prehistory professional_law world_religions")
_SOCIAL = ("econometrics high_school_geography high_school_government_and_politics high_school_macroeconomics "
           "high_school_microeconomics high_school_psychology human_sexuality professional_psychology "
           "public_relations security_studies sociology us_foreign_policy")
_OTHER = ("business_ethics clinical_knowledge college_medicine global_facts human_aging management marketing "
          "medical_genetics miscellaneous nutrition professional_accounting professional_medicine virology")
CATEGORIES: dict[str, str] = {
    s: cat for cat, names in (("stem", _STEM), ("humanities", _HUMANITIES), ("social_sciences", _SOCIAL),
                              ("other", _OTHER)) for s in names.split()
}
SUBJECTS = tuple(sorted(CATEGORIES))


def format_question(question: str, choices: list[str]) -> str:
    return question.strip() + "".join(f"\n{L}. {c}" for L, c in zip(LETTERS, choices, strict=True)) + "\nAnswer:"


def read_csv(file: Path) -> list[tuple[int, str, list[str], int]]:
    """``(line, question, choices, answer index)`` rows of one subject CSV (header ``question,choice0..3,answer``)."""
    rows = []
    with open(file, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header != HEADER:
            raise DataError(f"{file}:1: expected the header {','.join(HEADER)}, got {header}")
        for row in reader:
            line = reader.line_num
            if len(row) != len(HEADER):
                missing = HEADER[len(row)] if len(row) < len(HEADER) else None
                raise DataError(f"{file}:{line}: expected {len(HEADER)} fields, got {len(row)}"
                                + (f" (missing field {missing!r})" if missing else ""))
            rows.append((line, row[0], row[1:5], check_gold(row[5], 4, f"{file}:{line}", field="answer")))
    return rows


@register_task
class Mmlu(MultipleChoiceTask):
    """MMLU test split; ``subjects`` picks some of the 57 (default all), ``num_fewshot`` dev examples (default 0)."""

    name: ClassVar[str] = "mmlu"
    version: ClassVar[str] = "1"
    default_source: ClassVar[str] = "mmlu"
    hf_dataset: ClassVar[str | None] = "cais/mmlu"
    norm: ClassVar[bool] = False

    def __init__(self, subjects: list[str] | str | None = None, num_fewshot: int = 0) -> None:
        if isinstance(subjects, str):
            subjects = [s.strip() for s in subjects.split(",") if s.strip()]
        unknown = sorted(set(subjects or ()) - set(SUBJECTS))
        if unknown:
            raise RecipeError(f"unknown MMLU subjects {unknown}", hint="subjects: " + ", ".join(SUBJECTS))
        if not 0 <= num_fewshot <= 5:
            raise RecipeError(f"MMLU num_fewshot must be 0-5 (the dev split has 5 per subject), got {num_fewshot}")
        self.subjects = sorted(subjects) if subjects else list(SUBJECTS)
        self.num_fewshot = num_fewshot

    def options(self) -> dict[str, object]:
        return {"subjects": "all" if self.subjects == list(SUBJECTS) else self.subjects,
                "num_fewshot": self.num_fewshot}

    def _prompt(self, subject: str, question: str, choices: list[str], shots: list[tuple[str, list[str], int]]) -> str:
        head = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        demos = "".join(f"{format_question(q, c)} {LETTERS[a]}\n\n" for q, c, a in shots)
        return head + demos + format_question(question, choices)

    def read_local(self, path: Path) -> tuple[list[MCItem], list[Path]]:
        if not (path / "test").is_dir():
            raise DataError(f"MMLU folder {path} has no test/ subfolder", hint="see mmlu/SOURCE.md")
        items, files = [], []
        for subject in self.subjects:
            file = path / "test" / f"{subject}_test.csv"
            if not file.is_file():
                raise DataError(f"data file not found: {file}")
            shots: list[tuple[str, list[str], int]] = []
            if self.num_fewshot:
                dev = path / "dev" / f"{subject}_dev.csv"
                if not dev.is_file():
                    raise DataError(f"data file not found: {dev} (needed for num_fewshot > 0)")
                shots = [(q, c, a) for _, q, c, a in read_csv(dev)[: self.num_fewshot]]
                files.append(dev)
            for line, q, choices, answer in read_csv(file):
                items.append(MCItem(f"{subject}:{line}", self._prompt(subject, q, choices, shots), choices, answer,
                                    continuations=[" " + L for L in LETTERS], group=subject))
            files.append(file)
        return items, files

    def read_hf(self, dataset_id: str) -> list[MCItem]:
        items = []
        for subject in self.subjects:
            shots = [(r["question"], list(r["choices"]), int(r["answer"]))
                     for r in load_hf_rows(dataset_id, subject, "dev")[: self.num_fewshot]] if self.num_fewshot else []
            for i, r in enumerate(load_hf_rows(dataset_id, subject, "test")):
                items.append(MCItem(f"{subject}:{i}", self._prompt(subject, r["question"], list(r["choices"]), shots),
                                    list(r["choices"]), int(r["answer"]), continuations=[" " + L for L in LETTERS],
                                    group=subject))
        return items

    def evaluate(self, scorer: Scorer, data: TaskData) -> TaskResult:
        lls = score_items(scorer, data.items)
        correct = np.array([float(np.argmax(ll) == it.gold) for it, ll in zip(data.items, lls, strict=True)])
        breakdown: dict[str, dict[str, MetricValue]] = {}
        groups: dict[str, list[int]] = {}
        for i, it in enumerate(data.items):
            groups.setdefault(it.group or "", []).append(i)
            groups.setdefault(f"category:{CATEGORIES[it.group or '']}", []).append(i)
        for g in sorted(groups):
            breakdown[g] = {"acc": mean_metric("acc", correct[groups[g]], seed=data.seed)}
        return self.result(data, {"acc": mean_metric("acc", correct, seed=data.seed)}, breakdown,
                           self.item_scores(data, acc=correct))
