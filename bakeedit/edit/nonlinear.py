"""Elementwise response maps and position scopes: the edits that cannot be folded into a weight.

COCO's nonlinear enhancement (NE; ``../shared/METHODS.md``) changes a neuron's response as a function of itself,
and KnowBias's released code scales its neurons at the last position only. Both act on chosen channels ``c`` of a
site (``attn.q``, ``attn.v``, ``mlp.act``, ... any site of ``models/arch.py``), elementwise, at some positions:
``a[t, c] <- f(a[t, c]; theta_c)``. The maps, with ``a`` one activation and every parameter one number per neuron
(stored as a float32 vector of shape ``[n]`` over the ``n`` channels of a ``(layer, site)`` group):

* ``scale``: ``lambda * a``; ``lambda`` (default 1; 0 masks). Linear.
* ``tanh_gain``: ``a + alpha * tanh(a / s)``; ``alpha`` (1), ``s > 0`` (1). A gain of ``1 + alpha / s`` near 0
  that saturates: a large response gains at most ``|alpha|``.
* ``sigmoid_gain``: ``a * (1 + alpha * sigmoid(beta * (|a| - theta)))``; ``alpha`` (1), ``beta`` (1), ``theta``
  (0). A gain of up to ``1 + alpha`` switched on where ``|a|`` exceeds ``theta`` (``beta`` sets how sharply).
* ``power``: ``sign(a) * |a| ** p``; ``p > 0`` (1). ``p > 1`` sharpens strong responses, ``p < 1`` compresses.

Positions: ``all`` edits every position whose token index is at least ``start``; ``last`` edits only the last
position of each forward call (if its index is at least ``start``). Under ``generate()`` with the KV cache the
prefill's last position is the last prompt token and every decoding step feeds one new token, which *is* the last
position, so ``last`` reproduces KnowBias's reference. The token index of a position is the cache length before
the call plus its offset in the call (padding included), tracked by :class:`PositionTracker`.

A map that is linear for its parameters (``scale``; ``tanh_gain`` or ``sigmoid_gain`` with ``alpha = 0``;
``sigmoid_gain`` with ``beta = 0``, i.e. ``lambda = 1 + alpha / 2``; ``power`` with ``p = 1``) at all positions
from 0 is a plain scale: :func:`bakeedit.edit.plan.build_plan` routes it to the fold, never to the module.

The generated module (``bakeedit/export/modeling_template.py``) repeats these four formulas; the round-trip tests
(``tests/export/test_custom_module.py``) prove the two agree to 1e-5 in float32.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from bakeedit.maps import apply_map
from bakeedit.models.hookpoints import SiteFn


def first_position(seq_len: int, positions: str, start: int, offset: int) -> int:
    """Index (within this call) of the first position to edit; ``seq_len`` when none is.

    ``offset`` is the token index of the call's first position (the cache length).
    """
    first = seq_len - 1 if positions == "last" else 0
    return min(seq_len, max(first, start - offset))


@dataclass
class PositionTracker:
    """The token index of the first position of the current forward call: the KV cache's length before it.

    A forward pre-hook on the base model (``model.base_model``, the stack of blocks) reads the cache argument, so
    the count is right whether the causal-LM wrapper or the bare stack is called, with or without a cache.
    """

    offset: int = 0

    def __call__(self, _module: nn.Module, _args: tuple, kwargs: dict) -> None:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        self.offset = int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else 0

    def attach(self, model: nn.Module) -> RemovableHandle:
        return model.base_model.register_forward_pre_hook(self, with_kwargs=True)


def response_fn(
    map_name: str,
    indices: Sequence[int],
    params: Mapping[str, Sequence[float]],
    positions: str,
    start: int,
    tracker: PositionTracker,
) -> SiteFn:
    """A site hook function applying ``map_name`` to channels ``indices`` at the chosen positions.

    ``params`` maps each parameter name to one value per index (shape ``[len(indices)]``).
    """
    index = torch.tensor(list(indices), dtype=torch.long)
    values = {name: torch.tensor(list(v), dtype=torch.float32) for name, v in params.items()}
    on_device: dict[torch.device, tuple[torch.Tensor, dict[str, torch.Tensor]]] = {}

    def apply(act: torch.Tensor) -> torch.Tensor | None:
        first = first_position(act.shape[-2], positions, start, tracker.offset)
        if first >= act.shape[-2]:
            return None
        if act.device not in on_device:
            on_device[act.device] = (index.to(act.device), {k: v.to(act.device) for k, v in values.items()})
        idx, p = on_device[act.device]
        out = act.clone()
        out[..., first:, idx] = apply_map(map_name, act[..., first:, idx], p)
        return out

    return apply
