"""The three batched log-likelihood strategies of :class:`bakeedit.evaluate.engine.Scorer`.

All three return, per request, ``sum_j log p(cont_j | ctx, cont_<j)`` (float32 per token) and equal the per-example loop
within float32 noise (``tests/evaluate/test_engine.py``); they differ in how much work they share.

``packed`` (default)
    One row per distinct context: the context, then one segment ``cont[:-1]`` per option, with a 4D attention mask in
    which a segment sees the context and itself (never another option) and position ids that restart after the
    context for every segment. The context's last position predicts every option's first token (so single-token
    options such as MMLU's letters need no segment at all), the context runs once, there is one forward per batch,
    and ``logits_to_keep`` (rows are left-padded, segments sit at the end) keeps the LM head off the context.
    Models with a sliding window fall back to ``kv`` for requests longer than half the window, because the custom
    mask replaces the model's own window mask; so do attention kernels that take no 4D mask (flash-attention).

    Under a ``positions: last`` edit (``last_scoped``) a segment's last token is its sequence's last (the next
    segment's position ids restart), and so is the context's last token when every option is one token long (the
    row ends there); when a context has both one-token and longer options, its last token must be edited for the
    first and not for the second, so the row gets one more segment: a copy of that token at the same position,
    which sees the context without the original and is the last column of the row, read by the one-token options.
    Such rows fall back to ``flat`` instead of ``kv`` (whose context pass would edit the wrong token).
``kv``
    The context prefixes run once, left-padded, into the KV cache; the cache rows are repeated for the options and a
    right-padded pass over the segments reads it. Two forwards per batch plus the cache copies.
``flat``
    lm-evaluation-harness's approach: one right-padded row ``(ctx + cont)[:-1]`` per request, longest first; requests
    with the same input (options differing only in their last token) share a row, as lm-eval's Collator does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from bakeedit.evaluate.batching import LLResult, TokenRequest, flat_batches, left_pad, right_pad, shared_batches

if TYPE_CHECKING:
    from bakeedit.evaluate.engine import Scorer

PAD_SEG, PREFIX_SEG = -2, -1


def logprobs_at(
    logits: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities (float32 per token, float64 sum) of ``targets`` [R, L] read at ``logits[rows, cols]``
    (index tensors [R, L]) where ``valid``, and whether every target is the argmax; ``log p = logit[t] -
    logsumexp(logits)``.

    Only the positions that predict a target are read: they are gathered into one ``[n_targets, vocab]`` float32
    block, so padding, context positions kept by ``logits_to_keep`` and the padded tail of short continuations cost
    no softmax work (``logsumexp`` and ``argmax`` over the whole ``[batch, width, vocab]`` block took about a tenth
    of ``bench/eval_engine.py``'s time)."""
    owner = torch.arange(targets.shape[0], device=targets.device)[:, None].expand_as(targets)[valid]
    sel = logits[rows[valid], cols[valid]].float()  # [n_targets, vocab]
    tgt = targets[valid]
    tok_lp = sel.gather(1, tgt[:, None]).squeeze(1) - torch.logsumexp(sel, dim=-1)
    missed = (sel.argmax(dim=-1) != tgt).to(torch.int64)
    n = targets.shape[0]
    # per-token log-probs are float32; their sum is float64 so that summation order adds no noise of its own
    lp = torch.zeros(n, dtype=torch.float64, device=sel.device).index_add_(0, owner, tok_lp.double())
    greedy = torch.zeros(n, dtype=torch.int64, device=sel.device).index_add_(0, owner, missed) == 0
    return lp.cpu(), greedy.cpu()


def _results(scorer_out: list, rows: Sequence[TokenRequest], lp: torch.Tensor, greedy: torch.Tensor) -> None:
    for k, r in enumerate(rows):
        scorer_out[r.index] = LLResult(float(lp[k]), len(r.cont), r.n_chars, bool(greedy[k]))


def _targets(rows: Sequence[TokenRequest], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    targets, mask = right_pad([r.cont for r in rows], 0, device)
    return targets, mask.bool()


def score_flat(scorer: Scorer, requests: Sequence[TokenRequest]) -> list[LLResult]:
    out: list = [None] * len(requests)
    _score_flat_into(scorer, requests, out, len(requests))
    return out


def _score_flat_into(scorer: Scorer, requests: Sequence[TokenRequest], out: list, total: int, done: int = 0) -> int:
    """Score ``requests`` one row each into ``out[r.index]``; progress counts on from ``done`` of ``total``."""
    # lm-eval's one shortcut (Collator group_by="contexts"): requests whose model input is identical, i.e. options that
    # differ only in their last token such as MMLU's " A" .. " D", share one row
    rows_by_input: dict[tuple[tuple[int, ...], int], list[TokenRequest]] = {}
    for r in requests:
        rows_by_input.setdefault((tuple(r.ctx + r.cont[:-1]), len(r.ctx)), []).append(r)
    leaders = [g[0] for g in rows_by_input.values()]
    members = {id(g[0]): g for g in rows_by_input.values()}
    for batch in flat_batches(leaders, scorer.batch_size):
        ids, mask = right_pad([r.ctx + r.cont[:-1] for r in batch], scorer.pad_token_id, scorer.device)
        logits = scorer._forward(ids, mask, None).logits
        reqs = [m for r in batch for m in members[id(r)]]
        row_of = [k for k, r in enumerate(batch) for _ in members[id(r)]]
        targets, valid = _targets(reqs, scorer.device)
        rows = torch.tensor(row_of, device=scorer.device)[:, None].expand_as(targets)
        start = torch.tensor([len(r.ctx) - 1 for r in reqs], device=scorer.device)
        cols = (start[:, None] + torch.arange(targets.shape[1], device=scorer.device)).clamp(max=ids.shape[1] - 1)
        _results(out, reqs, *logprobs_at(logits, rows, cols, targets, valid))
        done += len(reqs)
        scorer._report("loglikelihood", done, total)
    return done


def _score_kv_batch(scorer: Scorer, groups: list[list[TokenRequest]], out: list) -> None:
    prefixes = [g[0].ctx[:-1] for g in groups]
    rows = [r for g in groups for r in g]
    row_group = torch.tensor([gi for gi, g in enumerate(groups) for _ in g], device=scorer.device)
    cache, prefix_mask = None, None
    if max(len(p) for p in prefixes):
        ids, prefix_mask = left_pad(prefixes, scorer.pad_token_id, scorer.device)
        positions = (prefix_mask.cumsum(1) - 1).clamp(min=0)
        cache = scorer._cache_of(scorer._forward(ids, prefix_mask, positions, use_cache=True, logits_to_keep=1))
        cache.batch_select_indices(row_group)  # one cache row per option, the prefix computed once
        prefix_mask = prefix_mask[row_group]
    ids, mask = right_pad([[r.ctx[-1], *r.cont[:-1]] for r in rows], scorer.pad_token_id, scorer.device)
    start = torch.tensor([len(r.ctx) - 1 for r in rows], device=scorer.device)
    positions = start[:, None] + torch.arange(ids.shape[1], device=scorer.device)[None, :]
    full_mask = mask if prefix_mask is None else torch.cat([prefix_mask, mask], dim=1)
    logits = scorer._forward(ids, full_mask, positions, cache=cache).logits
    targets, valid = _targets(rows, scorer.device)
    idx = torch.arange(len(rows), device=scorer.device)[:, None].expand_as(targets)
    cols = torch.arange(targets.shape[1], device=scorer.device)[None, :].expand_as(targets)
    _results(out, rows, *logprobs_at(logits, idx, cols, targets, valid))


def score_kv(scorer: Scorer, requests: Sequence[TokenRequest]) -> list[LLResult]:
    out: list = [None] * len(requests)
    done = 0
    for groups in shared_batches(requests, scorer.batch_size):
        _score_kv_batch(scorer, groups, out)
        done += sum(len(g) for g in groups)
        scorer._report("loglikelihood", done, len(requests))
    return out


def _needs_last_copy(group: Sequence[TokenRequest]) -> bool:
    """Whether a group's packed row needs a copy of its context's last token under a ``last`` edit: that token ends
    the sequence of its one-token options and not of its longer ones."""
    lengths = {len(r.cont) == 1 for r in group}
    return len(lengths) == 2


def _score_packed_batch(
    scorer: Scorer, groups: list[list[TokenRequest]], out: list, last_scoped: bool = False
) -> None:
    dev = scorer.device
    seqs, segs, poss, copies = [], [], [], []
    for g in groups:
        ctx = g[0].ctx
        seq, seg, pos = list(ctx), [PREFIX_SEG] * len(ctx), list(range(len(ctx)))
        for k, r in enumerate(g):
            piece = r.cont[:-1]  # the context's last position already predicts every option's first token
            seq += piece
            seg += [k] * len(piece)
            pos += range(len(ctx), len(ctx) + len(piece))
        copy = last_scoped and _needs_last_copy(g)
        if copy:  # the edited twin of the context's last token, for the one-token options (module docstring)
            seq.append(ctx[-1])
            seg.append(len(g))
            pos.append(len(ctx) - 1)
        seqs.append(seq)
        segs.append(seg)
        poss.append(pos)
        copies.append(copy)
    ids, _ = left_pad(seqs, scorer.pad_token_id, dev)
    seg, _ = left_pad(segs, PAD_SEG, dev)
    positions, _ = left_pad(poss, 0, dev)
    width = ids.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=dev).tril()
    allowed = causal & (seg != PAD_SEG)[:, None, :] & (
        (seg == PREFIX_SEG)[:, None, :] | (seg[:, :, None] == seg[:, None, :])
    )
    # the segments (and a copy of the context's last token) fill the last columns of each row: the LM head runs on
    # those only
    tails = [1 + sum(len(r.cont) - 1 for r in g) + copy for g, copy in zip(groups, copies, strict=True)]
    for gi, (tail, copy) in enumerate(zip(tails, copies, strict=True)):
        if copy:  # the copy stands in for the original, which it must not also see
            allowed[gi, width - 1, width - tail] = False
    allowed |= torch.eye(width, dtype=torch.bool, device=dev)  # padding queries see themselves: no empty softmax row
    logits = scorer._forward(ids, scorer.attention_mask_4d(allowed), positions, logits_to_keep=max(tails)).logits
    offset = width - logits.shape[1]  # logits cover columns offset .. width-1
    rows = [r for g in groups for r in g]
    targets, valid = _targets(rows, dev)
    row_idx, col_idx = [], []
    for gi, (g, tail, copy) in enumerate(zip(groups, tails, copies, strict=True)):
        last_ctx = width - tail  # column of the context's last token
        col = last_ctx + 1  # first column of the first segment
        for r in g:
            first = width - 1 if copy and len(r.cont) == 1 else last_ctx
            cols = [first] + [col + j for j in range(len(r.cont) - 1)]
            cols += [first] * (targets.shape[1] - len(cols))
            row_idx.append([gi] * targets.shape[1])
            col_idx.append([c - offset for c in cols])
            col += len(r.cont) - 1
    rows_t = torch.tensor(row_idx, device=dev)
    cols_t = torch.tensor(col_idx, device=dev)
    _results(out, rows, *logprobs_at(logits, rows_t, cols_t, targets, valid))


def score_packed(scorer: Scorer, requests: Sequence[TokenRequest], last_scoped: bool = False) -> list[LLResult]:
    out: list = [None] * len(requests)
    window = scorer.sliding_window
    done = 0
    for groups in shared_batches(requests, scorer.batch_size, packed=True):
        too_long = window is not None and any(len(r.ctx) + len(r.cont) > window // 2 for g in groups for r in g)
        if (too_long or not scorer.supports_4d_mask) and last_scoped:
            done = _score_flat_into(scorer, [r for g in groups for r in g], out, len(requests), done)
            continue
        if too_long or not scorer.supports_4d_mask:
            _score_kv_batch(scorer, groups, out)
        else:
            _score_packed_batch(scorer, groups, out, last_scoped)
        done += sum(len(g) for g in groups)
        scorer._report("loglikelihood", done, len(requests))
    return out
