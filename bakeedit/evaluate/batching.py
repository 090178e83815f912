"""Batch planning and padding for :mod:`bakeedit.evaluate.engine`: which requests share a forward pass, how rows are
padded, and how continuation log-probabilities are read off the logits in float32."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch


@dataclass
class TokenRequest:
    """One (context, continuation) pair after tokenization; ``index`` is its place in the caller's request list."""

    index: int
    ctx: list[int]  # at least one token: the last one predicts the first continuation token
    cont: list[int]  # at least one token
    n_chars: int


def left_pad(seqs: Sequence[Sequence[int]], pad: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """``ids, mask`` with the sequences aligned to the right (so the last column is every row's last token)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def right_pad(seqs: Sequence[Sequence[int]], pad: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """``ids, mask`` with the sequences aligned to the left (real tokens keep positions 0..len-1)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def flat_batches(requests: Sequence[TokenRequest], batch_size: int) -> Iterator[list[TokenRequest]]:
    """lm-eval's order: longest ``context + continuation`` first (padding stays small, memory errors come early)."""
    order = sorted(requests, key=lambda r: (-(len(r.ctx) + len(r.cont)), r.index))
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def packed_row_length(group: Sequence[TokenRequest]) -> int:
    """Tokens of a group's ``packed`` row: the context once, then ``cont[:-1]`` of every option."""
    return len(group[0].ctx) + sum(len(r.cont) - 1 for r in group)


PACKED_MIN_FILL = 0.8  # a packed row joins a batch only if it is at least this share of the batch's longest row


def shared_batches(
    requests: Sequence[TokenRequest], batch_size: int, packed: bool = False
) -> Iterator[list[list[TokenRequest]]]:
    """Groups of requests with identical context ids, packed so one batch has at most ``batch_size`` continuation
    rows. A group larger than ``batch_size`` is split (its context then runs once per part).

    Order, longest first so padding stays small: for the ``kv`` strategy (two passes) by context length, then by the
    longest continuation; with ``packed`` (one row per group) by the packed row's length, because that row is what
    gets padded, and a row shorter than ``PACKED_MIN_FILL`` of the batch's first (longest) row starts a new batch, so
    no row is more than a fifth padding. Sorting ``packed`` rows by context length instead pads MMLU's long
    contexts with one-token options next to HellaSwag's short contexts with four long endings: on the benchmark
    mix (bench/eval_engine.py) that ran 2.3x the tokens needed; by row length 1.35x, with the fill rule 1.1x.
    """
    by_ctx: dict[tuple[int, ...], list[TokenRequest]] = {}
    for r in requests:
        by_ctx.setdefault(tuple(r.ctx), []).append(r)
    units: list[list[TokenRequest]] = []
    for group in by_ctx.values():
        for start in range(0, len(group), batch_size):
            units.append(group[start:start + batch_size])
    if packed:
        units.sort(key=lambda g: (-packed_row_length(g), g[0].index))
    else:
        units.sort(key=lambda g: (-len(g[0].ctx), -max(len(r.cont) for r in g), g[0].index))
    batch: list[list[TokenRequest]] = []
    rows = 0
    for unit in units:
        short = packed and batch and packed_row_length(unit) < PACKED_MIN_FILL * packed_row_length(batch[0])
        if batch and (rows + len(unit) > batch_size or short):
            yield batch
            batch, rows = [], 0
        batch.append(unit)
        rows += len(unit)
    if batch:
        yield batch


def gather_continuation_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed float32 log-probabilities of ``targets`` under ``logits`` ([rows, width, vocab], position j predicting
    target j) over the positions where ``mask`` is true, and whether each row's targets are all the argmax.

    ``log p = logit[target] - logsumexp(logits)`` avoids materialising the whole log-softmax."""
    logits = logits[:, : targets.shape[1]].float()
    lse = torch.logsumexp(logits, dim=-1)
    tok = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    logprob = ((tok - lse).double() * mask).sum(dim=1)  # float32 per token, float64 sum (as the batched strategies)
    greedy = ((logits.argmax(dim=-1) == targets) | ~mask).all(dim=1)
    return logprob.cpu(), greedy.cpu()


@dataclass
class LLResult:
    """Log-likelihood of one continuation: summed log-prob, its token and character counts, and whether greedy
    decoding would have produced exactly these tokens (lm-eval's ``is_greedy``)."""

    logprob: float
    n_tokens: int
    n_chars: int
    is_greedy: bool
