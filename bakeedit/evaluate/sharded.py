"""The data-parallel scorer: under ``torchrun``, every log-likelihood or generation request list is split over the
ranks and gathered, so evaluation tasks need no change (``bakeedit/parallel.py`` has the process-group helpers)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from bakeedit.evaluate.batching import LLResult, flat_batches, shared_batches
from bakeedit.evaluate.engine import Scorer
from bakeedit.parallel import deal_batches, gather_mapping, ranks


def make_scorer(model: Any, tokenizer: Any, **kwargs: Any) -> Any:
    """A :class:`bakeedit.evaluate.engine.Scorer`; in a process group of several ranks, one that splits every
    request list over the ranks (see :func:`_sharded_scorer_class`) and hands every rank all results."""
    cls = _sharded_scorer_class() if ranks().world_size > 1 else Scorer
    return cls(model, tokenizer, **kwargs)


@functools.cache
def _sharded_scorer_class() -> type:
    """The data-parallel Scorer (built on first use, once per process).

    Results equal one process's bit for bit: the requests are cut into the batches one process would form
    (``evaluate/batching.py``: ``shared_batches`` for the packed and kv strategies, ``flat_batches`` for flat, the
    longest-first cut of ``evaluate/generation.py`` for generation), whole batches are dealt out by
    :func:`deal_batches`, and each batch is scored alone. Scoring one batch's requests forms exactly that batch
    again (same sort, and every unit of it passed the fill rule against the same first row), so every number comes
    from the same forward pass with the same padding companions as in a single process.
    """
    class ShardedScorer(Scorer):
        def _batches(self, requests: Sequence[Any]) -> list[list[Any]]:
            if self.mode == "flat":
                return [list(b) for b in flat_batches(requests, self.batch_size)]
            return [[r for g in groups for r in g]
                    for groups in shared_batches(requests, self.batch_size, packed=self.mode == "packed")]

        def score_tokens(self, requests: Sequence[Any]) -> list[LLResult]:
            local: dict[int, LLResult] = {}
            mine = deal_batches(self._batches(requests))
            total, done, progress = sum(len(b) for _, b in mine), 0, self.progress
            self.progress = None  # per-batch calls would each report their own totals
            try:
                for _, batch in mine:
                    # re-indexed 0..k-1 in request order: the strategies write out[r.index] and break ties by it
                    ordered = sorted(batch, key=lambda r: r.index)
                    scored = super().score_tokens([replace(r, index=k) for k, r in enumerate(ordered)])
                    local.update({r.index: res for r, res in zip(ordered, scored, strict=True)})
                    done += len(batch)
                    if progress is not None:
                        progress("loglikelihood", done, total)
            finally:
                self.progress = progress
            merged = gather_mapping(local)
            return [merged[r.index] for r in requests]

        def generate(self, prompts: Sequence[str], max_new_tokens: int, stop: Sequence[str] = ()) -> list[str]:
            # The order of generation.greedy_generate: longest encoded prompt first (stable), cut every batch_size.
            room = max(1, self.max_length - max_new_tokens)
            lengths = [max(1, min(room, len(ids) + self.add_bos_token)) for ids in self._encode_many(prompts)]
            order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
            batches = [order[b:b + self.batch_size] for b in range(0, len(order), self.batch_size)]
            local: dict[int, str] = {}
            mine = deal_batches(batches)
            total, progress = sum(len(b) for _, b in mine), self.progress
            self.progress = None
            try:
                for _, idx in mine:
                    texts = super().generate([prompts[i] for i in idx], max_new_tokens, stop)
                    local.update(zip(idx, texts, strict=True))
                    if progress is not None:
                        progress("generate", len(local), total)
            finally:
                self.progress = progress
            merged = gather_mapping(local)
            return [merged[i] for i in range(len(prompts))]

    return ShardedScorer
