"""Integrated gradients of site activations at the last prompt position, one layer at a time, batched over alpha.

KnowBias (arXiv 2601.21864, Eq. for ``Attr``) scores channel ``i`` of a site in layer ``l`` by

    Attr_i = h_i * mean_{k=1..m} dP(a* | (k/m) * h at layer l, last position) / dh_i

with a zero baseline, the Riemann (right-point) approximation of the path integral from 0 to ``h``. Only the
activation at the last prompt position of that one layer and site is scaled; every other position and layer is
left as the model computes it.

Doing that literally costs ``m`` full forward/backward passes per layer (600 for SmolLM2's 30 layers at m = 20; 113 s
for one 44-token question, ``../shared/ENVIRONMENT.md``). Three facts make it cheap:

1. The prompt positions before the last one never see the scaled activation (causal attention), so their keys and
   values are computed once per question, with the KV cache, and only the last position (plus the answer tokens
   of a multi-token answer) is re-run.
2. The ``m`` alpha steps of one layer differ only from layer ``l`` up, so they go through the model as one batch.
3. The blocks below ``l`` see the same input for every alpha. They run once at batch 1; a forward pre-hook on
   block ``l`` broadcasts the hidden state to batch ``m``; the KV cache is expanded to batch ``m`` only for the
   blocks from ``l`` up (``share_lower=True``). With ``share_lower=False`` every block runs at batch ``m``: same
   result, used by ``bench/ig.py`` to measure what the sharing buys.

Gradients are taken with respect to a zero leaf ``z`` added to the scaled activation (``alpha * h + z``), with the
model's parameters frozen for the duration, so autograd builds no weight-gradient graph.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from bakeedit.models.arch import ModelLayout
from bakeedit.models.hookpoints import site_hooks

Cell = tuple[int, str]


@dataclass
class IGResult:
    """Attributions per ``(layer, site)`` (float32, one value per channel) and the answer probability."""

    attributions: dict[Cell, torch.Tensor]
    probability: float  # P(a*) of the unedited model (alpha = 1)


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Turn off ``requires_grad`` on every parameter for the block, restoring each flag afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _cache_kwarg(model: nn.Module) -> str:
    # transformers 5.24 renamed `past_key_values` to `cache` (the old name goes in 5.40); accept both.
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _output_cache(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def answer_probability(logits: torch.Tensor, answer_ids: torch.Tensor) -> torch.Tensor:
    """``P(a*) = prod_j softmax(logits[:, j])[answer_ids[j]]``, the probability of the whole answer; ``logits`` is
    ``[batch, A, V]``, ``logits[:, j]`` the prediction of answer token ``j`` (teacher forcing).

    For a one-token answer this is the softmax probability of that token at the last prompt position, KnowBias's
    target. For several tokens it is the product, not the mean: a mean of per-token probabilities is the probability
    of nothing, and continuation tokens that are near-certain once the first is given dilute the first one's
    signal. The product keeps ``Attr`` an attribution of one probability, so completeness (``sum_i Attr_i = P(x) -
    P(site zeroed)``) still holds. It is taken as ``exp`` of the summed float32 log-softmax values.
    """
    logp = logits.float().log_softmax(dim=-1)
    index = answer_ids.to(logits.device).view(1, -1, 1).expand(logits.shape[0], -1, 1)
    return logp.gather(-1, index).squeeze(-1).sum(dim=-1).exp()


def _scale_first_position(alphas: torch.Tensor, z: torch.Tensor, seen: dict[str, torch.Tensor]):
    """Site function: position 0 of the re-run segment (the last prompt token) becomes ``alpha * h + z``."""

    def fn(act: torch.Tensor) -> torch.Tensor:
        seen["h"] = act[0, 0].detach()
        # .to(): with a device_map the block may live on another GPU than the embedding (gradients flow through it)
        scaled = alphas.to(act.device, act.dtype).view(-1, 1) * act[:, 0] + z.to(act.device, act.dtype)
        return torch.cat([scaled.unsqueeze(1), act[:, 1:]], dim=1)

    return fn


@contextmanager
def _broadcast_block_input(block: nn.Module, batch: int) -> Iterator[None]:
    """Expand the hidden state entering ``block`` from batch 1 to ``batch`` (blocks take it first, or by name)."""

    def pre_hook(_module: nn.Module, args: tuple, kwargs: dict):
        if args:
            return (args[0].expand(batch, *args[0].shape[1:]), *args[1:]), kwargs
        hidden = kwargs["hidden_states"]
        return args, {**kwargs, "hidden_states": hidden.expand(batch, *hidden.shape[1:])}

    handle = block.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _prefix_cache(model: nn.Module, prefix: torch.Tensor):
    with torch.no_grad():
        out = model(prefix.unsqueeze(0), use_cache=True)
    cache = _output_cache(out)
    if cache is None or not hasattr(cache, "layers"):
        raise RuntimeError(f"{type(model).__name__} returned no per-layer KV cache; cannot run cached attribution")
    return cache


def integrated_gradients(
    model: nn.Module,
    layout: ModelLayout,
    prompt_ids: torch.Tensor,
    answer_ids: torch.Tensor,
    cells: Sequence[Cell],
    steps: int = 20,
    share_lower: bool = True,
    on_cell: Callable[[Cell], None] | None = None,
) -> IGResult:
    """IG attributions of every channel of each ``(layer, site)`` in ``cells`` to ``P(answer | prompt)``.

    ``prompt_ids`` (1-D, at least 2 tokens) ends at the position whose activation is scaled; ``answer_ids`` (1-D)
    are the gold answer's tokens, scored by :func:`answer_probability` with teacher forcing. Each cell costs one
    batched forward (``steps`` rows, only the last prompt position and the answer positions) and one backward.
    """
    if prompt_ids.dim() != 1 or len(prompt_ids) < 2 or answer_ids.dim() != 1 or len(answer_ids) < 1:
        raise ValueError("prompt_ids needs at least 2 tokens and answer_ids at least 1 (both 1-D)")
    device = next(model.parameters()).device
    prompt_ids, answer_ids = prompt_ids.to(device), answer_ids.to(device)
    segment = torch.cat([prompt_ids[-1:], answer_ids[:-1]])
    alphas = torch.arange(1, steps + 1, device=device, dtype=torch.float32) / steps
    kwarg = _cache_kwarg(model)
    blocks = layout.blocks(model)
    out: dict[Cell, torch.Tensor] = {}
    probability = float("nan")
    with frozen_parameters(model):
        prefix = _prefix_cache(model, prompt_ids[:-1])
        for layer, site in cells:
            cache = copy.deepcopy(prefix)
            for i in range(layer if share_lower else 0, len(cache.layers)):
                cache.layers[i].batch_repeat_interleave(steps)
            z = torch.zeros(steps, layout.site_size(site), device=device, requires_grad=True)
            seen: dict[str, torch.Tensor] = {}
            ids = segment.unsqueeze(0) if share_lower else segment.unsqueeze(0).expand(steps, -1)
            with site_hooks(model, layout, {(layer, site): _scale_first_position(alphas, z, seen)}):
                if share_lower:
                    with _broadcast_block_input(blocks[layer], steps):
                        logits = model(ids, **{kwarg: cache}, use_cache=True).logits
                else:
                    logits = model(ids, **{kwarg: cache}, use_cache=True).logits
            p = answer_probability(logits, answer_ids)
            (grad,) = torch.autograd.grad(p.sum(), z)
            out[(layer, site)] = seen["h"].float() * grad.float().mean(dim=0)
            probability = float(p[-1].detach())
            if on_cell is not None:
                on_cell((layer, site))
    return IGResult(attributions=out, probability=probability)
