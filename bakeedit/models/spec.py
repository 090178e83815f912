"""The shapes an architecture file is read into: :class:`ArchSpec` (one family) and :class:`SiteMap` (one site).

A site is a named place inside a decoder block (``attn.q``, ``mlp.act``, ...; see ``SITES`` and
``../shared/METHODS.md``). A :class:`SiteMap` says which module of the block holds the site, whether the site is an
output channel (``out``: a weight row, plus the bias) or an input channel (``in``: a weight column), and how a site
index maps to a channel of a fused tensor. The tables themselves are data: one JSON file per family under
``bakeedit/models/architectures/`` (read by :mod:`bakeedit.models.registry`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

Site = Literal["attn.q", "attn.k", "attn.v", "attn.o_in", "mlp.gate", "mlp.up", "mlp.act"]
#: The sites of a dense block.
SITES: tuple[str, ...] = ("attn.q", "attn.k", "attn.v", "attn.o_in", "mlp.gate", "mlp.up", "mlp.act")
#: A mixture-of-experts block's shared expert (Qwen2-MoE): a gated MLP that every token goes through.
SHARED_SITES: tuple[str, ...] = ("mlp.shared.gate", "mlp.shared.up", "mlp.shared.act")
#: The parts of one routed expert; its sites are ``mlp.experts.E.gate`` / ``.up`` / ``.act``.
EXPERT_PARTS: tuple[str, ...] = ("gate", "up", "act")
_EXPERT_SITE = re.compile(r"^mlp\.experts\.(0|[1-9][0-9]*)\.(gate|up|act)$")
SITE_NAMES_HINT = f"{', '.join(SITES + SHARED_SITES)}, or mlp.experts.E.{{gate,up,act}} for expert E of a MoE block"

#: A dimension of a block, computed from the model config (``q`` = heads x head_dim, ``kv``, ``ffn``, and for
#: mixture-of-experts blocks one routed expert's width ``expert_ffn`` and the shared expert's ``shared_ffn``).
Dim = Literal["q", "kv", "ffn", "expert_ffn", "shared_ffn"]
DIMS: tuple[str, ...] = ("q", "kv", "ffn", "expert_ffn", "shared_ffn")


def expert_site(site: str) -> tuple[int, str] | None:
    """``(expert, part)`` of a routed-expert site name (``mlp.experts.3.act`` -> ``(3, "act")``), else None."""
    match = _EXPERT_SITE.match(site)
    return (int(match.group(1)), match.group(2)) if match else None


def is_site(site: str) -> bool:
    """Whether ``site`` is a site name at all (whether a model has it is the ArchSpec's question)."""
    return site in SITES or site in SHARED_SITES or expert_site(site) is not None


def site_order(site: str) -> tuple[int, int, int]:
    """Sort key: dense sites in block order, then the shared expert, then routed experts by number and part."""
    if site in SITES:
        return (0, SITES.index(site), 0)
    if site in SHARED_SITES:
        return (1, SHARED_SITES.index(site), 0)
    found = expert_site(site)
    if found is None:
        raise ValueError(f"unknown site '{site}'; allowed: {SITE_NAMES_HINT}")
    return (2, found[0], EXPERT_PARTS.index(found[1]))


@dataclass(frozen=True)
class SiteMap:
    """How one site is laid out in one architecture.

    ``offset`` names the dimensions that come before this site's channels in a fused tensor (Phi-3's ``qkv_proj``
    holds ``[q | k | v]``, so ``attn.v`` has ``offset=("q", "kv")``). ``interleave`` is GPT-NeoX's layout, where
    the fused output is ``[head0: q k v | head1: q k v | ...]``; the value is the part index (0 = q, 1 = k, 2 = v).
    """

    module: str
    axis: Literal["out", "in"]
    size: Dim
    offset: tuple[Dim, ...] = ()
    interleave: int | None = None
    #: Routed experts: the module holds one 3D parameter for all experts (``[experts, out, in]``, transformers 5's
    #: fused ``gate_up_proj``/``down_proj``) named ``param``; checkpoints store one 2D tensor per expert, named
    #: ``stored`` with ``{expert}`` filled in (``experts.{expert}.gate_proj``, relative to the block).
    param: str | None = None
    stored: str | None = None
    expert: int | None = None


@dataclass(frozen=True)
class ConfigKeys:
    """Which attributes of a transformers config hold the block sizes (GPT-2 spells them ``n_layer`` etc.).

    ``ffn_multiple``: when the FFN attribute is ``None`` (GPT-2's ``n_inner``), the FFN width is this multiple of
    the hidden size, as the model class itself computes it.
    """

    n_layers: str = "num_hidden_layers"
    n_heads: str = "num_attention_heads"
    n_kv_heads: str = "num_key_value_heads"
    head_dim: str = "head_dim"
    hidden: str = "hidden_size"
    ffn: str = "intermediate_size"
    ffn_multiple: int | None = None
    n_experts: str = "num_experts"
    expert_ffn: str = "moe_intermediate_size"
    shared_ffn: str = "shared_expert_intermediate_size"


@dataclass(frozen=True)
class ArchSpec:
    """The site table of one architecture family (or of a pattern that unknown families may follow)."""

    name: str
    model_types: tuple[str, ...]
    blocks: str
    sites: dict[str, SiteMap]
    notes: str = ""
    #: Routed experts of a MoE block, by part (``gate``, ``up``, ``act``); empty for dense families.
    expert_sites: dict[str, SiteMap] = field(default_factory=dict)
    #: Projection weights stored ``[in, out]`` (GPT-2's ``Conv1D``) instead of ``nn.Linear``'s ``[out, in]``. Known
    #: from the architecture, so that a checkpoint can be edited tensor by tensor without building the model.
    transposed_weights: bool = False
    config_keys: ConfigKeys = field(default_factory=ConfigKeys)
    #: Facts other tools need (``gguf_permute_qk``: llama.cpp's converter permutes Q/K rows; ``qk_norm``; biases).
    facts: dict[str, Any] = field(default_factory=dict)
    #: The pattern file this family was built from (``llama-like``), or None for a family with its own table.
    pattern: str | None = None
    #: Where the table was read from (a path relative to the package, for messages).
    source: str = ""
