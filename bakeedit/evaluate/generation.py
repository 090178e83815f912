"""Greedy batched generation with a KV cache, left padding, a shared prompt prefix computed once (few-shot
examples), and stop strings (used by ``Scorer.generate``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from bakeedit.edit.nonlinear import attached_positions
from bakeedit.evaluate.batching import left_pad

if TYPE_CHECKING:
    from bakeedit.evaluate.engine import Scorer


def greedy_generate(
    scorer: Scorer, prompts: Sequence[list[int]], max_new_tokens: int, stop: Sequence[str] = ()
) -> list[str]:
    """Decode ``max_new_tokens`` greedily for each tokenized prompt; a row stops at EOS or once a ``stop`` string
    appears, and its text is cut before the first stop string. Prompts are batched longest first."""
    tok = scorer.tokenizer
    eos = tok.eos_token_id
    out: list[str] = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    done_rows = 0
    for b in range(0, len(order), scorer.batch_size):
        idx = order[b:b + scorer.batch_size]
        texts = _generate_batch(scorer, [prompts[i] for i in idx], max_new_tokens, stop, eos)
        for i, t in zip(idx, texts, strict=True):
            out[i] = t
        done_rows += len(idx)
        scorer._report("generate", done_rows, len(prompts))
    return out


MIN_SHARED_PREFIX = 16  # tokens; below this, running the common prefix separately costs more than it saves


def _common_prefix_len(prompts: list[list[int]]) -> int:
    first = prompts[0]
    n = min(len(p) for p in prompts) - 1  # every row keeps at least one token of its own
    for p in prompts[1:]:
        k = 0
        while k < n and p[k] == first[k]:
            k += 1
        n = k
    return max(n, 0)


def _prefill(scorer: Scorer, prompts: list[list[int]]) -> tuple[object, torch.Tensor, torch.Tensor, torch.Tensor]:
    """First forward of a batch: ``(result, cache, mask, positions)``. A common prefix (few-shot examples) runs once
    with batch 1 and its cache is repeated for the rows; the rest of each prompt follows, left-padded, with a mask
    hole for the padding and positions that continue after the prefix."""
    dev = scorer.device
    n_common = _common_prefix_len(prompts) if len(prompts) > 1 else 0
    window = scorer.sliding_window
    # A `positions: last` edit lands on the last token of each forward call: a prefix run as its own call would be
    # edited at its last token, which one prompt alone never is. Such models prefill each prompt whole.
    last_scoped = "last" in attached_positions(scorer.model)
    if last_scoped or n_common < MIN_SHARED_PREFIX or (window is not None and max(map(len, prompts)) > window // 2):
        ids, mask = left_pad(prompts, scorer.pad_token_id, dev)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        res = scorer._forward(ids, mask, positions, use_cache=True, logits_to_keep=1)
        return res, scorer._cache_of(res), mask, positions
    prefix = torch.tensor([prompts[0][:n_common]], device=dev)
    cache = scorer._cache_of(scorer._forward(prefix, torch.ones_like(prefix), None, use_cache=True, logits_to_keep=1))
    cache.batch_repeat_interleave(len(prompts))
    ids, suffix_mask = left_pad([p[n_common:] for p in prompts], scorer.pad_token_id, dev)
    positions = n_common + (suffix_mask.cumsum(1) - 1).clamp(min=0)
    mask = torch.cat([torch.ones(len(prompts), n_common, dtype=suffix_mask.dtype, device=dev), suffix_mask], dim=1)
    res = scorer._forward(ids, mask, positions, cache=cache, logits_to_keep=1)
    return res, cache, mask, positions


def _generate_batch(
    scorer: Scorer, prompts: list[list[int]], max_new_tokens: int, stop: Sequence[str], eos: int | None
) -> list[str]:
    tok = scorer.tokenizer
    generated: list[list[int]] = [[] for _ in prompts]
    finished = [False] * len(prompts)
    with torch.inference_mode():
        res, cache, mask, positions = _prefill(scorer, prompts)
        ids = torch.empty(0, dtype=torch.long)  # the step input, set at the end of each step
        for step in range(max_new_tokens):
            if step:
                res = scorer._forward(ids, mask, positions, cache=cache, logits_to_keep=1)
            nxt = res.logits[:, -1].float().argmax(dim=-1)
            for k, t in enumerate(nxt.tolist()):
                if finished[k]:
                    continue
                if eos is not None and t == eos:
                    finished[k] = True
                    continue
                generated[k].append(t)
                if stop and any(s in tok.decode(generated[k], skip_special_tokens=True) for s in stop):
                    finished[k] = True
            if all(finished):
                break
            ids = nxt[:, None]
            mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
            positions = positions[:, -1:] + 1
    texts = []
    for g in generated:
        text = tok.decode(g, skip_special_tokens=True)
        cut = min((text.find(s) for s in stop if s in text), default=len(text))
        texts.append(text[:cut])
    return texts
