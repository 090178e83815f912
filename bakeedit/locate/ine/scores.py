"""Logit-based importance of value and query neurons for the gender gap (arXiv 2501.14457, Sec. 5.1).

For a prompt whose next token should be one of a pair (`` she``/`` he``), let ``x`` be the final residual at the last
position, ``sigma`` the final norm's scale at ``x`` and ``s = sign(gap)`` the side the unedited model leans to
(``gap = log p(female) - log p(male)``). The importance of a vector ``v`` written into the residual stream is

    Imp(v) = s * ([log p(w_f | x+v) - log p(w_m | x+v)] - [log p(w_f | x) - log p(w_m | x)])      (Eq. 8-9)

with ``p = softmax(W_U N_sigma(.) + b)`` and ``N_sigma`` the final norm with its scale frozen at ``sigma``. The
log-partition cancels in the difference of two log-probabilities, and ``N_sigma`` is affine, so ``Imp`` is exactly
linear: ``Imp(v) = direction . v`` with ``direction = s * N_sigma'^T (W_U[f] - W_U[m])``. Then

- an FFN value neuron ``i`` of layer ``l`` (``mlp.act``) writes ``v = m_i * W_down[:, i]`` at the last position;
- an attention value neuron (``attn.o_in`` channel ``j`` = dimension ``d`` of head ``h``) writes
  ``sum_s A[h, t, s] V[s, d] * W_o[:, j]``; the term of source position ``s`` is its contribution from ``s``, and
  the ``s`` with the largest ``|A V|`` is the neuron's *important position* (the start position marks a "general"
  neuron, Sec. 4.2).

Query neurons (FFN neurons of lower layers that activate the chosen value neurons; Yu & Ananiadou's query score):
with ``S_l = sum_{n in targets at l} c_n a_n`` (``a_n`` the target's activation at the last position,
``c_n = direction . W[:, n]`` its gap effect per unit), the score of FFN neuron ``q`` of layer ``l' < l`` at
position ``s`` is the first-order change of ``S_l`` when ``m_q(s) W_down[:, q]`` is added to the residual that
layer ``l`` reads, through the *direct* path only: the pre-norm with frozen scale, then the target's input weights
(``W_V`` row with the attention pattern held fixed, or the gate/up rows and the activation's slope). That is the
paper's "inner product of the neuron with the value neuron's input weights, times the coefficient", generalised to
gated MLPs by the chain rule; it is computed with one autograd pass per prompt batch.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from bakeedit.locate.ine.data import EncodedPrompt
from bakeedit.locate.ine.parts import ModelParts, eager_attention, head_source_contributions, write_matrix
from bakeedit.locate.knowbias.ig import frozen_parameters
from bakeedit.models.arch import ModelLayout
from bakeedit.models.hookpoints import site_hooks


@dataclass
class Batch:
    """Right-padded prompts: ``ids``/``mask`` ``[B, T]``, ``last`` ``[B]`` (index of each prompt's last token)."""

    ids: torch.Tensor
    mask: torch.Tensor
    last: torch.Tensor
    female: torch.Tensor
    male: torch.Tensor

    @property
    def rows(self) -> torch.Tensor:
        return torch.arange(len(self.last), device=self.last.device)


def make_batch(prompts: list[EncodedPrompt], pad_id: int, device: torch.device | str = "cpu") -> Batch:
    width = max(len(p.ids) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p.ids)] = torch.tensor(p.ids)
        mask[i, : len(p.ids)] = 1
    last = torch.tensor([len(p.ids) - 1 for p in prompts])
    female = torch.tensor([p.female_id for p in prompts])
    male = torch.tensor([p.male_id for p in prompts])
    return Batch(ids.to(device), mask.to(device), last.to(device), female.to(device), male.to(device))


def _keeps_logits(model: nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def last_logits(model: nn.Module, batch: Batch, forward: Callable | None = None) -> torch.Tensor:
    """``[B, vocab]`` float32 logits at each prompt's last position; only those rows go through the unembedding
    when the model takes ``logits_to_keep`` (a 2-D per-sample index tensor). ``forward`` replaces ``model(...)``."""
    forward = forward or model
    if _keeps_logits(model):
        out = forward(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False,
                      logits_to_keep=batch.last.view(-1, 1))
        return out.logits[:, 0].float()
    out = forward(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False)
    return out.logits[batch.rows, batch.last].float()


def _no_logits(model: nn.Module) -> dict:
    """Keyword that spares the unembedding of every position when only hidden activations are needed."""
    return {"logits_to_keep": 1} if _keeps_logits(model) else {}


@dataclass
class ValueScores:
    """One batch's value-neuron scores (float32, on CPU)."""

    gap: torch.Tensor  # [B] log p(female) - log p(male), unedited
    direction: torch.Tensor  # [B, hidden] d Imp / d v at the final residual (includes the lean's sign)
    ffn: torch.Tensor  # [B, n_layers, ffn] Imp of each mlp.act neuron
    attn: torch.Tensor  # [B, n_layers, n_heads * head_dim] Imp of each attn.o_in neuron
    attn_start: torch.Tensor  # [B, n_layers, q] bool: the important position is the start position


def gap_direction(parts: ModelParts, final_residual: torch.Tensor, female: torch.Tensor, male: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gap [B], direction [B, hidden])`` at the final residual ``[B, hidden]``; see the module docstring."""
    sigma = parts.final.sigma(final_residual)
    diff = (parts.unembed[female] - parts.unembed[male]).float()
    gap = (parts.final.apply(final_residual, sigma) * diff).sum(-1)
    if parts.unembed_bias is not None:
        gap = gap + (parts.unembed_bias[female] - parts.unembed_bias[male]).float()
    sign = torch.where(gap >= 0, 1.0, -1.0).unsqueeze(-1)
    return gap, sign * parts.final.pullback(diff, sigma)


def _last_recorder(store: dict, key, batch: Batch) -> Callable[[torch.Tensor], None]:
    def record(act: torch.Tensor) -> None:
        store[key] = act[batch.rows, batch.last].detach()

    return record


@torch.no_grad()
def value_scores(model: nn.Module, layout: ModelLayout, parts: ModelParts, batch: Batch) -> ValueScores:
    """Imp of every ``mlp.act`` and ``attn.o_in`` neuron for each prompt of the batch (one forward pass)."""
    n_layers, rows, last = layout.n_layers, batch.rows, batch.last
    store: dict = {}
    fns = {(layer, "mlp.act"): _last_recorder(store, layer, batch) for layer in range(n_layers)}
    values: dict[int, torch.Tensor] = {}
    for layer in range(n_layers):
        fns[(layer, "attn.v")] = lambda act, layer=layer: values.__setitem__(layer, act.detach())
    final_in: list[torch.Tensor] = []
    handle = parts.final_norm.register_forward_pre_hook(lambda _m, args: final_in.append(args[0].detach()))
    try:
        with eager_attention(model), site_hooks(model, layout, fns):
            out = model(input_ids=batch.ids, attention_mask=batch.mask, output_attentions=True, use_cache=False,
                        **_no_logits(model))
    finally:
        handle.remove()
    gap, direction = gap_direction(parts, final_in[-1][rows, last].float(), batch.female, batch.male)
    ffn, attn, start = [], [], []
    for layer in range(n_layers):
        ffn.append(store[layer].float() * (direction @ write_matrix(model, layout, layer, "mlp.act").float()))
        per_unit = direction @ write_matrix(model, layout, layer, "attn.o_in").float()  # [B, q]
        weights = out.attentions[layer][rows, :, last]  # [B, H, T]
        contrib = torch.stack([head_source_contributions(weights[b], values[layer][b], layout)
                               for b in range(len(last))])  # [B, T, q]
        attn.append(contrib.sum(1) * per_unit)
        magnitude = contrib.abs()
        start.append((magnitude.argmax(1) == 0) & (magnitude.amax(1) > 0))
    return ValueScores(gap.cpu(), direction.cpu(), torch.stack(ffn, 1).cpu(), torch.stack(attn, 1).cpu(),
                       torch.stack(start, 1).cpu())


@dataclass(frozen=True)
class Targets:
    """The value neurons query neurons must activate: ``{layer: indices}`` per site."""

    ffn: dict[int, torch.Tensor]
    attn: dict[int, torch.Tensor]

    def layers(self) -> list[int]:
        return sorted(set(self.ffn) | set(self.attn))


def query_scores(model: nn.Module, layout: ModelLayout, parts: ModelParts, batch: Batch, direction: torch.Tensor,
                 targets: Targets) -> tuple[torch.Tensor, torch.Tensor]:
    """``(score [B, n_layers, ffn], start [B, n_layers, ffn])``: each FFN neuron's query score (summed over
    positions) and whether its largest ``|score|`` is at the start position. See the module docstring."""
    device, dtype = batch.ids.device, next(model.parameters()).dtype
    n_batch, width = batch.ids.shape
    hidden = parts.unembed.shape[1]
    direction = direction.to(device).float()
    rows, last = batch.rows, batch.last
    acts: dict = {}
    leaves: dict[tuple[str, int], torch.Tensor] = {}
    norm_in: dict[tuple[str, int], torch.Tensor] = {}

    def leaf_hook(kind: str, layer: int):
        leaf = torch.zeros(n_batch, width, hidden, dtype=dtype, device=device, requires_grad=True)
        leaves[(kind, layer)] = leaf

        def fn(_mod: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            norm_in[(kind, layer)] = args[0].detach()
            return output + leaf

        return fn

    fns: dict = {}
    for layer in range(layout.n_layers):
        fns[(layer, "mlp.act")] = lambda a, layer=layer: acts.__setitem__(("ffn", layer), a)
    for layer in targets.attn:
        fns[(layer, "attn.o_in")] = lambda a, layer=layer: acts.__setitem__(("attn", layer), a)
        # The attention pattern is held fixed: only the value path carries a query neuron's effect.
        fns[(layer, "attn.q")] = lambda a: a.detach()
        fns[(layer, "attn.k")] = lambda a: a.detach()
    handles = [parts.attn_norms[layer].register_forward_hook(leaf_hook("attn", layer)) for layer in targets.attn]
    handles += [parts.mlp_norms[layer].register_forward_hook(leaf_hook("ffn", layer)) for layer in targets.ffn]
    try:
        with torch.enable_grad(), frozen_parameters(model), site_hooks(model, layout, fns):
            model(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False, **_no_logits(model))
            pulled: dict[int, torch.Tensor] = {}
            for kind, index_map, norms in (("attn", targets.attn, parts.attn), ("ffn", targets.ffn, parts.mlp)):
                site = "attn.o_in" if kind == "attn" else "mlp.act"
                for layer, idx in index_map.items():
                    idx = idx.to(device)
                    coef = direction @ write_matrix(model, layout, layer, site).float()[:, idx]  # [B, n]
                    total = (acts[(kind, layer)][rows, last][:, idx].float() * coef).sum()
                    (grad,) = torch.autograd.grad(total, leaves[(kind, layer)], retain_graph=True, allow_unused=True)
                    if grad is not None:
                        norm = norms[layer]
                        back = norm.pullback(grad, norm.sigma(norm_in[(kind, layer)]))
                        pulled[layer] = pulled[layer] + back if layer in pulled else back
    finally:
        for h in handles:
            h.remove()
    return _accumulate(model, layout, acts, pulled, (n_batch, width, hidden), device)


@torch.no_grad()
def _accumulate(model: nn.Module, layout: ModelLayout, acts: dict, pulled: dict[int, torch.Tensor],
                shape: tuple[int, int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Query scores from the pulled-back gradients: layer ``l'`` sees the sum over the target layers above it."""
    scores, start = [], []
    above = torch.zeros(*shape, device=device)
    for layer in reversed(range(layout.n_layers)):
        m = acts[("ffn", layer)].detach().float()  # [B, T, ffn]
        per_pos = m * (above @ write_matrix(model, layout, layer, "mlp.act").float())
        scores.append(per_pos.sum(1))
        magnitude = per_pos.abs()
        start.append((magnitude.argmax(1) == 0) & (magnitude.amax(1) > 0))
        if layer in pulled:
            above = above + pulled[layer]
    return torch.stack(scores[::-1], 1).cpu(), torch.stack(start[::-1], 1).cpu()
