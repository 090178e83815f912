"""GSM8K, grade-school math word problems (Cobbe et al. 2021, "Training Verifiers to Solve Math Word Problems",
arXiv:2110.14168), test split, greedy generation.

Prompt (lm-eval ``gsm8k``): k worked examples ``"Question: {q}\\nAnswer: {worked answer}"`` joined by blank lines,
then ``"Question: {q}\\nAnswer:"``. The continuation is generated greedily up to ``max_new_tokens`` and cut at
``"Question:"``, a blank line or an end-of-turn token. Metrics, as lm-eval's two filters, exact match after removing
commas, ``$`` and a final period:

- ``exact_match`` ("flexible-extract"): the LAST number in the generation equals the gold ``#### N`` number;
- ``exact_match_strict`` ("strict-match"): the generation itself contains ``#### N`` with the gold number.

Deviations from lm-eval, for CPU cost: 3 examples instead of 5 and 128 new tokens instead of 256 (both options), and
the examples come from the test split (our copy has no train split): they are drawn with the seed from items that are
not scored, so a full run scores 1,319 - k items. SmolLM2-135M scores about 0 here; the task exists to show that an
edit does not break what a larger model can do.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from bakeedit.errors import DataError, RecipeError
from bakeedit.evaluate.tasks.base import (
    Task,
    TaskData,
    TaskResult,
    data_sha256,
    load_hf_rows,
    mean_metric,
    read_jsonl,
    register_task,
    require_file,
    resolve_source,
    sample_items,
    text_sha256,
)

if TYPE_CHECKING:
    from bakeedit.evaluate.engine import Scorer

STOP = ("Question:", "\n\n", "</s>", "<|im_end|>")
_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_IGNORE = (re.compile(","), re.compile(r"\$"), re.compile(r"(?s).*#### "), re.compile(r"\.$"))


def normalize(text: str) -> str:
    """lm-eval's exact-match normalisation for GSM8K (``regexes_to_ignore``, ``ignore_case``)."""
    for pattern in _IGNORE:
        text = pattern.sub("", text)
    return text.strip().lower()


def extract_strict(generation: str) -> str | None:
    m = _STRICT.search(generation)
    return m.group(1) if m else None


def extract_flexible(generation: str) -> str | None:
    """The last number-like span of the generation."""
    matches = _FLEXIBLE.findall(generation)
    if not matches:
        return None
    last = matches[-1]
    return last[0] or last[1]


def gold_number(answer: str) -> str:
    return normalize(answer)  # "(?s).*#### " strips the worked solution, leaving the final number


@register_task
class Gsm8k(Task):
    """GSM8K test split (1,319 problems)."""

    name: ClassVar[str] = "gsm8k"
    version: ClassVar[str] = "1"
    kind: ClassVar[str] = "capability"
    default_source: ClassVar[str] = "gsm8k"
    hf_dataset: ClassVar[str | None] = "openai/gsm8k"

    def __init__(self, num_fewshot: int = 3, max_new_tokens: int = 128) -> None:
        if num_fewshot < 0 or max_new_tokens < 1:
            raise RecipeError("gsm8k needs num_fewshot >= 0 and max_new_tokens >= 1")
        self.num_fewshot = num_fewshot
        self.max_new_tokens = max_new_tokens
        self._shots: list[dict[str, str]] = []

    def options(self) -> dict[str, Any]:
        return {"num_fewshot": self.num_fewshot, "max_new_tokens": self.max_new_tokens}

    def load(self, source: str | Path | None, limit: int | None, seed: int) -> TaskData:
        where = resolve_source(source, self.default_source, self.hf_dataset)
        if isinstance(where, Path):
            file = require_file(where, "test.jsonl")
            numbered = read_jsonl(file, ("question", "answer"))
            for line_no, r in numbered:
                if "####" not in r["answer"]:
                    raise DataError(f"{file}:{line_no}: field 'answer' has no final '#### <number>' line")
            rows = [{"question": r["question"], "answer": r["answer"]} for _, r in numbered]
            src, sha = str(file), data_sha256(file)
        else:
            rows = [{"question": r["question"], "answer": r["answer"]} for r in load_hf_rows(where, "main", "test")]
            src, sha = f"hf:{where}", text_sha256(repr(rows))
        if len(rows) <= self.num_fewshot:
            raise DataError(f"{src} has {len(rows)} problems, too few for {self.num_fewshot} examples")
        rng = random.Random(seed)
        shot_idx = set(rng.sample(range(len(rows)), self.num_fewshot))
        pool = [r for i, r in enumerate(rows) if i not in shot_idx]
        items = sample_items(pool, limit, seed)
        shots = [rows[i] for i in sorted(shot_idx)]
        return TaskData([{"shots": shots, **r} for r in items], src, sha, limit, seed, len(rows))

    @staticmethod
    def prompt(question: str, shots: list[dict[str, str]]) -> str:
        demos = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots)
        return demos + f"Question: {question}\nAnswer:"

    def evaluate(self, scorer: Scorer, data: TaskData) -> TaskResult:
        prompts = [self.prompt(it["question"], it["shots"]) for it in data.items]
        generations = scorer.generate(prompts, self.max_new_tokens, stop=STOP)
        flexible, strict = [], []
        for it, gen in zip(data.items, generations, strict=True):
            gold = gold_number(it["answer"])
            f, s = extract_flexible(gen), extract_strict(gen)
            flexible.append(float(f is not None and normalize(f) == gold))
            strict.append(float(s is not None and normalize(s) == gold))
        metrics = {
            "exact_match": mean_metric("exact_match", np.array(flexible), seed=data.seed),
            "exact_match_strict": mean_metric("exact_match_strict", np.array(strict), seed=data.seed),
        }
        return self.result(data, metrics, items=self.item_scores(data, exact_match=flexible, exact_match_strict=strict))
