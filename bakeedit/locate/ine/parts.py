"""The pieces of a decoder that ``ine``'s scores need besides the sites: norms, unembedding, write columns.

The importance score of arXiv 2501.14457 (after Yu & Ananiadou's neuron attribution) reads a neuron's contribution
through ``softmax(unembed(final_norm(x)))`` with the final norm's scale taken from the actual final residual, so the
norm is an affine map ``y = a * C(x) / sigma + b`` once ``sigma`` is fixed (``C`` centres for LayerNorm, is the
identity for RMSNorm). The query-neuron score pulls gradients back through the blocks' pre-norms the same way.

The ArchSpec names only the sites, so the norms are found by structure and then *checked*, never assumed: the final
norm is the one norm-like sibling of the block list; a block's two norm-like children are told apart by which one's
output feeds ``attn.q``'s module and which ``mlp.up``'s; the formula of each norm must reproduce its module's output,
the final norm's output must be the unembedding's input, the logits must be ``W_U y + b``, and each layer's
``attn.o_in`` must equal the attention-weighted ``attn.v`` (the decomposition the attention scores rely on). A model
that breaks one of these (sandwich norms as in Gemma 2/3, logit soft-capping, attention sinks) gets an
:class:`~bakeedit.errors.UnsupportedArchitecture` naming the check, not a silently wrong score.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from bakeedit.edit.fold import feature_axis
from bakeedit.errors import UnsupportedArchitecture
from bakeedit.models.arch import ModelLayout
from bakeedit.models.hookpoints import capture_sites


@dataclass(frozen=True)
class FrozenNorm:
    """``y = gain * C(x) / sigma(x) + bias``, with ``sigma`` computable from ``x`` and then held fixed."""

    gain: torch.Tensor  # float32 [hidden]
    bias: torch.Tensor | None
    centered: bool
    eps: float

    def _center(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(-1, keepdim=True) if self.centered else x

    def sigma(self, x: torch.Tensor) -> torch.Tensor:
        """The scale of the actual input, ``[..., 1]``."""
        return (self._center(x.float()).pow(2).mean(-1, keepdim=True) + self.eps).sqrt()

    def apply(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The norm with its scale frozen at ``sigma`` (an affine map of ``x``)."""
        y = self.gain.to(x.device) * self._center(x.float()) / sigma
        return y if self.bias is None else y + self.bias.to(x.device)

    def pullback(self, grad: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Transpose of the frozen map's linear part: a gradient w.r.t. the output -> w.r.t. the input."""
        return self._center(self.gain.to(grad.device) * grad.float() / sigma)


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> bool:
    a, b = a.float(), b.float()
    return bool((a - b).abs().max() <= _tolerance(dtype) * max(1.0, float(b.abs().max())))


def is_norm(module: nn.Module) -> bool:
    """A leaf module with a 1-D ``weight``: an RMSNorm or LayerNorm, whatever the family calls it."""
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() == 1 and next(module.children(), None) is None


def frozen_norm(module: nn.Module, sample: torch.Tensor, where: str) -> FrozenNorm:
    """Read ``module``'s affine form and check it against the module on ``sample`` (a real input).

    Candidates: LayerNorm (centred, with its bias), RMSNorm with gain ``w`` (Llama, Qwen, Mistral, Phi-3) and with
    gain ``1 + w`` (Gemma). The first whose formula reproduces ``module(sample)`` wins.
    """
    eps = next((float(getattr(module, n)) for n in ("variance_epsilon", "eps", "epsilon")
                if isinstance(getattr(module, n, None), (int, float))), None)
    if eps is None:
        raise UnsupportedArchitecture(f"{where} ({type(module).__name__}) has no epsilon attribute ine can read")
    weight = module.weight.detach().float()
    bias = getattr(module, "bias", None)
    bias = bias.detach().float() if isinstance(bias, torch.Tensor) else None
    candidates = [FrozenNorm(weight, bias, True, eps)] if isinstance(module, nn.LayerNorm) or bias is not None else []
    candidates += [FrozenNorm(weight, None, False, eps), FrozenNorm(1.0 + weight, None, False, eps)]
    with torch.no_grad():
        reference = module(sample)
    for norm in candidates:
        if _close(norm.apply(sample, norm.sigma(sample)), reference, sample.dtype):
            return norm
    raise UnsupportedArchitecture(
        f"{where} ({type(module).__name__}) is neither an RMSNorm nor a LayerNorm with an elementwise gain",
        hint="ine scores a neuron through the norms with their scale frozen; this norm has another form",
    )


def write_matrix(model: nn.Module, layout: ModelLayout, layer: int, site: str) -> torch.Tensor:
    """``[hidden, n]``: column ``i`` is what channel ``i`` of an input site (``mlp.act``, ``attn.o_in``) adds to the
    residual stream per unit of activation (``W_down[:, i]``, ``W_o[:, j]``). A view where the layout allows."""
    weight = layout.module(model, layer, site).weight
    weight = weight if feature_axis(layout, site) == 1 else weight.t()
    phys = layout.channels(site)
    start = int(phys[0])
    if bool((phys == torch.arange(start, start + len(phys))).all()):
        return weight.narrow(1, start, len(phys))
    return weight.index_select(1, phys.to(weight.device))


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Run with the eager attention implementation (the only one that returns attention weights), then restore."""
    before = getattr(model.config, "_attn_implementation", None)
    if before in (None, "eager"):
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


@contextmanager
def record_io(modules: dict[str, nn.Module]) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """``{name: (input, output)}`` of each module during the forward passes inside the block (detached)."""
    store: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name: str):
        def fn(_mod: nn.Module, args: tuple, output: torch.Tensor) -> None:
            out = output[0] if isinstance(output, tuple) else output
            store[name] = (args[0].detach(), out.detach())

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def head_source_contributions(attn_row: torch.Tensor, values: torch.Tensor, layout: ModelLayout) -> torch.Tensor:
    """``[T, n_heads * head_dim]``: what source position ``s`` puts into ``attn.o_in`` channel ``j`` at the query
    position, ``A[h(j), s] * V[s, kv(h(j)), d(j)]``. Summed over ``s`` it is ``attn.o_in`` itself.

    ``attn_row`` is ``[n_heads, T]`` (the query position's attention weights), ``values`` ``[T, n_kv_heads*head_dim]``
    (the ``attn.v`` site); under GQA query head ``h`` reads kv head ``h // (n_heads / n_kv_heads)``.
    """
    dims = layout.dims
    group = dims.n_heads // dims.n_kv_heads
    v = values.float().view(values.shape[0], dims.n_kv_heads, dims.head_dim).repeat_interleave(group, dim=1)
    return (attn_row.float().t().unsqueeze(-1) * v).reshape(values.shape[0], dims.q)


@dataclass
class ModelParts:
    """The final norm, the unembedding and each block's two pre-norms, each with its checked affine form."""

    final_norm: nn.Module
    final: FrozenNorm
    unembed: torch.Tensor  # [vocab, hidden] (the weight itself)
    unembed_bias: torch.Tensor | None
    attn_norms: list[nn.Module]
    mlp_norms: list[nn.Module]
    attn: list[FrozenNorm]
    mlp: list[FrozenNorm]


def _final_norm(model: nn.Module, layout: ModelLayout) -> nn.Module:
    parent_path = layout.spec.blocks.rpartition(".")[0]
    parent = model.get_submodule(parent_path) if parent_path else model
    blocks = layout.blocks(model)
    found = [m for m in parent.children() if m is not blocks and is_norm(m)]
    if len(found) != 1:
        raise UnsupportedArchitecture(f"cannot find the final norm of this {layout.spec.name} model "
                                      f"({len(found)} norm-like modules beside the blocks)")
    return found[0]


def _block_norms(model: nn.Module, layout: ModelLayout, layer: int) -> list[nn.Module]:
    norms = [m for m in layout.blocks(model)[layer].children() if is_norm(m)]
    if len(norms) != 2:
        raise UnsupportedArchitecture(
            f"block {layer} of this {layout.spec.name} model has {len(norms)} norms, not 2 (input and pre-MLP)",
            hint="ine adds a neuron's output to the residual stream as a fixed vector; models that normalise the "
            "attention/MLP outputs before the residual (Gemma 2/3 sandwich norms) are not supported",
        )
    return norms


def discover_parts(model: nn.Module, layout: ModelLayout, sample_ids: torch.Tensor) -> ModelParts:
    """Find the norms and unembedding, and check every assumption of the scores on one real forward pass."""
    config = getattr(model.config, "text_config", None) or model.config
    if getattr(config, "final_logit_softcapping", None):
        raise UnsupportedArchitecture(f"{layout.spec.name}: logit soft-capping makes the log-prob gap nonlinear in "
                                      "the final residual; ine's linear score does not apply")
    lm_head = model.get_output_embeddings()
    final_norm = _final_norm(model, layout)
    pairs = [_block_norms(model, layout, layer) for layer in range(layout.n_layers)]
    modules: dict[str, nn.Module] = {"final": final_norm, "lm_head": lm_head}
    for layer, norms in enumerate(pairs):
        modules.update({f"{layer}.n{i}": n for i, n in enumerate(norms)})
        modules[f"{layer}.q"] = layout.module(model, layer, "attn.q")
        modules[f"{layer}.up"] = layout.module(model, layer, "mlp.up")
    addresses = [(layer, site) for layer in range(layout.n_layers) for site in ("attn.v", "attn.o_in")]
    with torch.no_grad(), eager_attention(model), record_io(modules) as io, \
            capture_sites(model, layout, addresses) as acts:
        out = model(input_ids=sample_ids.view(1, -1), output_attentions=True, use_cache=False)
    dtype = next(model.parameters()).dtype
    final_in, final_out = io["final"]
    if not _close(io["lm_head"][0], final_out, dtype):
        raise UnsupportedArchitecture("the unembedding's input is not the final norm's output")
    logits = final_out.float() @ lm_head.weight.float().t()
    bias = getattr(lm_head, "bias", None)
    if bias is not None:
        logits = logits + bias.float()
    if not _close(logits, out.logits, dtype):
        raise UnsupportedArchitecture("the logits are not the unembedding of the final norm's output (logit scaling "
                                      "or soft-capping?)")
    attn_norms, mlp_norms, attn, mlp = [], [], [], []
    for layer, norms in enumerate(pairs):
        outs = [io[f"{layer}.n{i}"][1] for i in range(2)]
        feeds_q = [i for i in range(2) if _close(outs[i], io[f"{layer}.q"][0], dtype)]
        feeds_up = [i for i in range(2) if _close(outs[i], io[f"{layer}.up"][0], dtype)]
        if len(feeds_q) != 1 or len(feeds_up) != 1 or feeds_q == feeds_up:
            raise UnsupportedArchitecture(f"block {layer}: cannot tell the input norm from the pre-MLP norm")
        attn_norms.append(norms[feeds_q[0]])
        mlp_norms.append(norms[feeds_up[0]])
        attn.append(frozen_norm(attn_norms[-1], io[f"{layer}.n{feeds_q[0]}"][0], f"block {layer} input norm"))
        mlp.append(frozen_norm(mlp_norms[-1], io[f"{layer}.n{feeds_up[0]}"][0], f"block {layer} pre-MLP norm"))
        if out.attentions is None or out.attentions[layer] is None:
            raise UnsupportedArchitecture("the model returns no attention weights, even with eager attention")
        rebuilt = head_source_contributions(out.attentions[layer][0, :, -1], acts[(layer, "attn.v")][0], layout)
        if not _close(rebuilt.sum(0), acts[(layer, "attn.o_in")][0, -1], dtype):
            raise UnsupportedArchitecture(
                f"block {layer}: attn.o_in is not the attention-weighted attn.v, so attention value neurons cannot be "
                "split by source position", hint="use sites: [mlp.act]")
    final = frozen_norm(final_norm, final_in, "the final norm")
    return ModelParts(final_norm, final, lm_head.weight, bias, attn_norms, mlp_norms, attn, mlp)
