"""Perplexity on a held-out text, the language-modelling check that an edit did not damage the model in general.

Default text: the HellaSwag validation contexts, each completed with its gold ending (``"{activity}: {context}
{gold ending}"``, 10,042 short documents; MIT licence, the rendering described in ``hellaswag/SOURCE.md``). They are
plain English descriptions of everyday activities, not used by any locate method. ``text_file=`` scores any UTF-8
file instead, one document per blank-line separated paragraph.

Each document is scored whole (rolling windows of the scorer's ``max_length`` for long ones) given only BOS. Metrics
as lm-eval's ``wikitext`` (lower is better): ``word_perplexity = exp(-sum LL / sum words)``, ``byte_perplexity =
exp(-sum LL / sum UTF-8 bytes)``, ``bits_per_byte = -sum LL / (sum bytes * ln 2)``, plus ``token_perplexity`` (per
model token, comparable only between models that share a tokenizer, e.g. a base and its edit). Standard errors are
bootstrap over documents of the ratio.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from bakeedit.errors import DataError
from bakeedit.evaluate.stats import ItemScores
from bakeedit.evaluate.tasks.base import (
    MetricValue,
    Task,
    TaskData,
    TaskResult,
    bootstrap_stderr,
    register_task,
    require_file,
    resolve_source,
)
from bakeedit.evaluate.tasks.hellaswag import preprocess, read_rendered

if TYPE_CHECKING:
    from bakeedit.evaluate.engine import Scorer


@register_task
class Perplexity(Task):
    """Perplexity of the held-out documents (default: HellaSwag contexts + gold endings)."""

    name: ClassVar[str] = "perplexity"
    version: ClassVar[str] = "1"
    kind: ClassVar[str] = "capability"
    default_source: ClassVar[str] = "hellaswag"

    def __init__(self, text_file: str | Path | None = None) -> None:
        self.text_file = Path(text_file) if text_file else None

    def options(self) -> dict[str, Any]:
        return {"text": str(self.text_file) if self.text_file else "hellaswag contexts + gold endings"}

    def load(self, source: str | Path | None, limit: int | None, seed: int) -> TaskData:
        if self.text_file is not None:
            if not self.text_file.is_file():
                raise DataError(f"text file not found: {self.text_file}")
            docs = [p.strip() for p in re.split(r"\n\s*\n", self.text_file.read_text(encoding="utf-8")) if p.strip()]
            file = self.text_file
        else:
            where = resolve_source(source, self.default_source)
            if not isinstance(where, Path):
                raise DataError("the perplexity task reads a local file only", hint="pass --data-dir or text_file=")
            file = require_file(where, "hellaswag_val_full.txt")
            docs = [preprocess(ctx) + " " + preprocess(endings[gold]) for _, ctx, gold, endings in read_rendered(file)]
        if not docs:
            raise DataError(f"{file} holds no text")
        return TaskData.sampled(docs, file, limit, seed)

    def evaluate(self, scorer: Scorer, data: TaskData) -> TaskResult:
        docs: list[str] = data.items
        results = scorer.rolling_loglikelihood(docs)
        ll = np.array([r.logprob for r in results], dtype=np.float64)
        toks = np.array([r.n_tokens for r in results], dtype=np.float64)
        words = np.array([len(re.split(r"\s+", d)) for d in docs], dtype=np.float64)
        nbytes = np.array([len(d.encode("utf-8")) for d in docs], dtype=np.float64)

        def metric(name: str, fn: Any) -> MetricValue:
            se = bootstrap_stderr(len(docs), lambda idx: fn(idx), seed=data.seed) if len(docs) > 1 else None
            return MetricValue(name, float(fn(np.arange(len(docs)))), se, len(docs), higher_is_better=False)

        metrics = {
            "word_perplexity": metric("word_perplexity", lambda i: math.exp(-ll[i].sum() / words[i].sum())),
            "byte_perplexity": metric("byte_perplexity", lambda i: math.exp(-ll[i].sum() / nbytes[i].sum())),
            "bits_per_byte": metric("bits_per_byte", lambda i: -ll[i].sum() / nbytes[i].sum() / math.log(2)),
            "token_perplexity": metric("token_perplexity", lambda i: math.exp(-ll[i].sum() / toks[i].sum())),
        }
        return self.result(data, metrics, items=self.item_scores(data, ll=ll, tokens=toks, words=words, nbytes=nbytes))

    def item_metrics(self, scores: ItemScores) -> dict[str, float]:
        """The four perplexities of per-document log-likelihoods and sizes (ratios of sums, not means)."""
        v = scores.values
        ll = v["ll"].sum()
        return {"word_perplexity": math.exp(-ll / v["words"].sum()),
                "byte_perplexity": math.exp(-ll / v["nbytes"].sum()),
                "bits_per_byte": -ll / v["nbytes"].sum() / math.log(2),
                "token_perplexity": math.exp(-ll / v["tokens"].sum())}
