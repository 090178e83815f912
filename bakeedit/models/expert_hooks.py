"""Hook points inside a mixture-of-experts block, where no module per expert exists to hook.

transformers 5 keeps a block's routed experts as one module holding 3D parameters (``gate_up_proj``
``[experts, 2 * ffn, hidden]``, ``down_proj`` ``[experts, hidden, ffn]``) and runs them in a fused kernel
(``grouped_mm``). A site of one expert (``mlp.experts.3.act``) is therefore reached by replacing that module's
``forward`` for the duration of a hook with the plain per-expert loop of the model's own eager implementation,
with the site functions applied to the expert's gate/up output and to the input of its down projection. The loop
is written out here, not borrowed from transformers, so it is the runtime reference the fold is checked against;
with no site functions it computes the same function as the fused kernel (tests/models/test_moe.py).

Site functions receive ``[tokens_routed_to_the_expert, site_size]`` tensors: elementwise edits (scales) are exact;
position-scoped edits cannot be expressed on routed tokens and are refused by the plan (``edit/plan.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

SiteFn = Callable[[torch.Tensor], "torch.Tensor | None"]
_STATE = "_bakeedit_expert_fns"


class ExpertHookHandle:
    """Removes one expert-site function; the module's own ``forward`` comes back when the last one goes."""

    def __init__(self, module: nn.Module, key: tuple[int, str], entry: tuple) -> None:
        self.module, self.key, self.entry = module, key, entry

    def remove(self) -> None:
        fns: dict = getattr(self.module, _STATE, {})
        entries = fns.get(self.key, [])
        if self.entry in entries:
            entries.remove(self.entry)
        if not entries:
            fns.pop(self.key, None)
        if not fns and _STATE in vars(self.module):
            delattr(self.module, _STATE)
            del self.module.forward  # the instance attribute; the class's forward shows through again


def _apply(fns: list[tuple], t: torch.Tensor) -> torch.Tensor:
    for fn, phys in fns:
        phys = phys.to(t.device)
        out = fn(t.index_select(-1, phys))
        if out is not None:
            t = t.index_copy(-1, phys, out.to(t.dtype))
    return t


def _looped_forward(module: nn.Module) -> Callable[..., torch.Tensor]:
    """The eager per-expert loop of transformers' ``*Experts.forward`` (Qwen2-MoE, Qwen3-MoE, Mixtral), with
    the registered site functions applied to expert ``e``'s ``gate_up`` output and ``down_proj`` input."""

    def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        fns: dict = getattr(module, _STATE)
        final = torch.zeros_like(hidden_states)
        for expert in range(module.num_experts):
            token_idx, slot = torch.where(top_k_index == expert)
            if token_idx.numel() == 0:
                continue
            gate_up = F.linear(hidden_states[token_idx], module.gate_up_proj[expert])
            gate_up = _apply(fns.get((expert, "out"), []), gate_up)
            gate, up = gate_up.chunk(2, dim=-1)
            inner = _apply(fns.get((expert, "in"), []), module.act_fn(gate) * up)
            out = F.linear(inner, module.down_proj[expert]) * top_k_weights[token_idx, slot, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final

    return forward


def register_expert_hook(module: nn.Module, expert: int, axis: str, phys: torch.Tensor, fn: SiteFn
                         ) -> ExpertHookHandle:
    """Apply ``fn`` to channels ``phys`` of expert ``expert``'s gate/up output (``axis="out"``) or down-projection
    input (``axis="in"``) until the handle is removed."""
    for name in ("gate_up_proj", "down_proj", "act_fn", "num_experts"):
        if not hasattr(module, name):
            raise TypeError(f"{type(module).__name__} has no '{name}': not a transformers 5 fused experts module")
    if _STATE not in vars(module):
        setattr(module, _STATE, {})
        module.forward = _looped_forward(module)
    entry = (fn, phys)
    getattr(module, _STATE).setdefault((expert, axis), []).append(entry)
    return ExpertHookHandle(module, (expert, axis), entry)
