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

Positions: ``all`` edits every real token whose token index is at least ``start``; ``last`` edits only the last
real token of each sequence of a forward call (if its index is at least ``start``). The token index is the token's
place among the real tokens of its row, padding excluded: its position id where the call passes them, else counted
from the 2D attention mask (the cached part included), else the cache length plus its column. The last real token of
a sequence is followed by padding, by the end of the row, or by a token whose position id does not follow on (the
next sequence of a packed row). Under ``generate()`` with the KV cache the prefill's last real token is each row's
last prompt token and every decoding step feeds one new token per row, so ``last`` reproduces KnowBias's reference
whatever the padding. :class:`PositionTracker` reads the cache, mask and position ids of each call.

A map that is linear for its parameters (``scale``; ``tanh_gain`` or ``sigmoid_gain`` with ``alpha = 0``;
``sigmoid_gain`` with ``beta = 0``, i.e. ``lambda = 1 + alpha / 2``; ``power`` with ``p = 1``) at all positions
from 0 is a plain scale: :func:`bakeedit.edit.plan.build_plan` routes it to the fold, never to the module.

The generated module (``bakeedit/export/modeling_template.py``) repeats these four formulas; the round-trip tests
(``tests/export/test_custom_module.py``) prove the two agree to 1e-5 in float32.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from bakeedit.errors import EditError
from bakeedit.maps import apply_map
from bakeedit.models.hookpoints import SiteFn

#: Attribute of a model that carries module edits: the position scopes (``all``, ``last``) of those edits. Set by
#: :func:`bakeedit.edit.hooks.runtime_edit` while it is active and by the saved custom module, so that the scorer can
#: refuse the batching modes that cannot reproduce a ``last`` edit (``bakeedit/evaluate/engine.py``).
POSITIONS_ATTR = "bakeedit_positions"


def attached_positions(model: Any) -> frozenset[str]:
    """The position scopes of the module edits hooked into ``model`` (empty when it carries none)."""
    return frozenset(getattr(model, POSITIONS_ATTR, ()) or ())


def _two_d(value: Any) -> torch.Tensor | None:
    return value if isinstance(value, torch.Tensor) and value.dim() == 2 else None


def token_positions(
    shape: tuple[int, int],
    past: int,
    mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index, last)``, both ``[batch, seq]``, for the tokens of one forward call.

    ``index`` is each token's place among the real tokens of its row (the position id when given, because that is
    what the model itself uses; else counted from a 2D ``mask`` over the cached and new columns; else ``past`` plus
    the column). ``last`` marks the last real token of each sequence: a real token followed by padding, by the end
    of the row, or by a token whose index does not follow on (a packed row's next sequence). A 4D mask (a packed
    row's) says nothing per column and is ignored; padding then counts as real, which is harmless because no real
    token attends to it.
    """
    batch, seq = shape
    real = torch.ones(shape, dtype=torch.bool, device=device)
    index = (past + torch.arange(seq, device=device)).expand(shape)
    mask = _two_d(mask)
    if mask is not None and mask.shape[1] in (seq, past + seq):
        counted = mask.to(device=device, dtype=torch.long).expand(batch, -1)
        real = counted[:, -seq:].bool()
        index = counted.cumsum(1)[:, -seq:] - 1 + (past if counted.shape[1] == seq else 0)
    position_ids = _two_d(position_ids)
    if position_ids is not None and position_ids.shape[1] == seq and position_ids.shape[0] in (1, batch):
        index = position_ids.to(device=device, dtype=torch.long).expand(shape)
    ends = ~real[:, 1:] | (index[:, 1:] != index[:, :-1] + 1)
    last = real & torch.cat([ends, torch.ones(batch, 1, dtype=torch.bool, device=device)], dim=1)
    return index, last


@dataclass
class PositionTracker:
    """What decides, per forward call, which tokens a scoped edit reaches: the KV cache's length before the call,
    its attention mask and its position ids (see :func:`token_positions`).

    A forward pre-hook on the base model (``model.base_model``, the stack of blocks) reads them from the call's
    keyword arguments, so they are right whether the causal-LM wrapper or the bare stack is called, with or without
    a cache. The site hooks only see their own activations; they ask :meth:`positions`, computed once per call.
    """

    past: int = 0
    mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    shape: tuple[int, int] | None = None  # [batch, seq] of the call, for sites that see the tokens flattened
    _memo: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    def __call__(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        self.past = int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else 0
        self.mask = kwargs.get("attention_mask")
        self.position_ids = kwargs.get("position_ids")
        tokens = kwargs.get("input_ids", args[0] if args else None)  # GPT-2 passes input_ids by position
        tokens = kwargs.get("inputs_embeds") if tokens is None else tokens
        self.shape = (int(tokens.shape[0]), int(tokens.shape[1])) if isinstance(tokens, torch.Tensor) else None
        self._memo = {}

    def attach(self, model: nn.Module) -> RemovableHandle:
        return model.base_model.register_forward_pre_hook(self, with_kwargs=True)

    def positions(self, shape: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(index, last)`` of the current call for activations of ``shape``: ``[batch, seq, channels]``, or
        ``[batch * seq, channels]`` where a block flattens the tokens (Qwen2-MoE's shared expert)."""
        flat = len(shape) == 2 and self.shape is not None and shape[0] == self.shape[0] * self.shape[1]
        if len(shape) != 3 and not flat:
            raise EditError(
                f"a position-scoped edit needs [batch, seq, channels] activations, got shape {list(shape)}",
                hint="positions: last and start > 0 apply to attention and MLP sites, not routed experts",
            )
        rows = self.shape if flat else (shape[0], shape[1])
        key = (*rows, device)
        if key not in self._memo:
            self._memo[key] = token_positions(rows, self.past, self.mask, self.position_ids, device)
        index, last = self._memo[key]
        return (index.reshape(-1), last.reshape(-1)) if flat else (index, last)


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
        token_index, last = tracker.positions(tuple(act.shape), act.device)
        chosen = token_index >= start
        if positions == "last":
            chosen = chosen & last
        if not bool(chosen.any()):
            return None
        if act.device not in on_device:
            on_device[act.device] = (index.to(act.device), {k: v.to(act.device) for k, v in values.items()})
        idx, p = on_device[act.device]
        part = act[..., idx]
        out = act.clone()
        out[..., idx] = torch.where(chosen[..., None], apply_map(map_name, part, p), part)
        return out

    return apply
