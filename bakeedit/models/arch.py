"""Where each *site* lives in each supported architecture.

A site is a named place inside a decoder block (``attn.q``, ``mlp.act``, ...; see ``SITES`` and
``../shared/METHODS.md``). Method code speaks only of ``(layer, site, index)``; this module maps that address to
a module, to the physical channel of that module's output or input, and so to a weight row or column. Fused
layouts (Phi-3 ``qkv_proj``/``gate_up_proj``, GPT-2's ``c_attn`` Conv1D, GPT-NeoX's per-head interleaved
``query_key_value``) are resolved here and nowhere else.

The table is declarative: an :class:`ArchSpec` lists, per site, the module path inside the block, whether the
site is an output channel (``out``: a weight row, plus the bias) or an input channel (``in``: a weight column), and
how a site index maps to a channel of a fused tensor. :class:`ModelLayout` binds a spec to one model's config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from bakeedit.errors import UnsupportedArchitecture

Site = Literal["attn.q", "attn.k", "attn.v", "attn.o_in", "mlp.gate", "mlp.up", "mlp.act"]
SITES: tuple[str, ...] = ("attn.q", "attn.k", "attn.v", "attn.o_in", "mlp.gate", "mlp.up", "mlp.act")

#: A dimension of a block, computed from the model config by :func:`_dims`.
Dim = Literal["q", "kv", "ffn"]


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


@dataclass(frozen=True)
class ArchSpec:
    """The site table of one architecture family."""

    name: str
    model_types: tuple[str, ...]
    blocks: str
    sites: dict[str, SiteMap]
    notes: str = ""
    #: Projection weights stored ``[in, out]`` (GPT-2's ``Conv1D``) instead of ``nn.Linear``'s ``[out, in]``. Known
    #: from the architecture, so that a checkpoint can be edited tensor by tensor without building the model.
    transposed_weights: bool = False


def _llama_like(name: str, model_types: tuple[str, ...], notes: str = "") -> ArchSpec:
    return ArchSpec(
        name=name,
        model_types=model_types,
        blocks="model.layers",
        sites={
            "attn.q": SiteMap("self_attn.q_proj", "out", "q"),
            "attn.k": SiteMap("self_attn.k_proj", "out", "kv"),
            "attn.v": SiteMap("self_attn.v_proj", "out", "kv"),
            "attn.o_in": SiteMap("self_attn.o_proj", "in", "q"),
            "mlp.gate": SiteMap("mlp.gate_proj", "out", "ffn"),
            "mlp.up": SiteMap("mlp.up_proj", "out", "ffn"),
            "mlp.act": SiteMap("mlp.down_proj", "in", "ffn"),
        },
        notes=notes,
    )


ARCHITECTURES: tuple[ArchSpec, ...] = (
    _llama_like("llama", ("llama",)),
    _llama_like("mistral", ("mistral",)),
    _llama_like("qwen2", ("qwen2",), notes="q/k/v projections carry a bias, scaled with the row"),
    _llama_like("qwen3", ("qwen3",), notes="attn.q/attn.k are before the per-head q/k RMSNorm"),
    _llama_like("gemma", ("gemma", "gemma2", "gemma3_text"), notes="attn.q/attn.k are before q/k norm (Gemma3)"),
    ArchSpec(
        name="phi3",
        model_types=("phi3",),
        blocks="model.layers",
        sites={
            "attn.q": SiteMap("self_attn.qkv_proj", "out", "q"),
            "attn.k": SiteMap("self_attn.qkv_proj", "out", "kv", offset=("q",)),
            "attn.v": SiteMap("self_attn.qkv_proj", "out", "kv", offset=("q", "kv")),
            "attn.o_in": SiteMap("self_attn.o_proj", "in", "q"),
            "mlp.gate": SiteMap("mlp.gate_up_proj", "out", "ffn"),
            "mlp.up": SiteMap("mlp.gate_up_proj", "out", "ffn", offset=("ffn",)),
            "mlp.act": SiteMap("mlp.down_proj", "in", "ffn"),
        },
        notes="fused qkv_proj = [q | k | v] and gate_up_proj = [gate | up]",
    ),
    ArchSpec(
        name="gpt2",
        model_types=("gpt2",),
        blocks="transformer.h",
        sites={
            "attn.q": SiteMap("attn.c_attn", "out", "q"),
            "attn.k": SiteMap("attn.c_attn", "out", "kv", offset=("q",)),
            "attn.v": SiteMap("attn.c_attn", "out", "kv", offset=("q", "kv")),
            "attn.o_in": SiteMap("attn.c_proj", "in", "q"),
            "mlp.up": SiteMap("mlp.c_fc", "out", "ffn"),
            "mlp.act": SiteMap("mlp.c_proj", "in", "ffn"),
        },
        notes="Conv1D weights are stored [in, out]; c_attn = [q | k | v]; no gated MLP, so no mlp.gate",
        transposed_weights=True,
    ),
    ArchSpec(
        name="gpt_neox",
        model_types=("gpt_neox",),
        blocks="gpt_neox.layers",
        sites={
            "attn.q": SiteMap("attention.query_key_value", "out", "q", interleave=0),
            "attn.k": SiteMap("attention.query_key_value", "out", "kv", interleave=1),
            "attn.v": SiteMap("attention.query_key_value", "out", "kv", interleave=2),
            "attn.o_in": SiteMap("attention.dense", "in", "q"),
            "mlp.up": SiteMap("mlp.dense_h_to_4h", "out", "ffn"),
            "mlp.act": SiteMap("mlp.dense_4h_to_h", "in", "ffn"),
        },
        notes="query_key_value is interleaved per head: [h0: q k v | h1: q k v | ...]; no gated MLP",
    ),
)


def supported_model_types() -> list[str]:
    """Every ``config.model_type`` bakeedit can edit."""
    return sorted(t for spec in ARCHITECTURES for t in spec.model_types)


def spec_for_model_type(model_type: str) -> ArchSpec:
    for spec in ARCHITECTURES:
        if model_type in spec.model_types:
            return spec
    raise UnsupportedArchitecture(
        f"unsupported architecture '{model_type}'",
        hint="supported model types: " + ", ".join(supported_model_types()),
    )


@dataclass(frozen=True)
class Dims:
    """The sizes a site can have in one model."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn: int

    @property
    def q(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv(self) -> int:
        return self.n_kv_heads * self.head_dim

    def of(self, dim: Dim) -> int:
        return {"q": self.q, "kv": self.kv, "ffn": self.ffn}[dim]


def _dims(config) -> Dims:
    """Read the block sizes from a transformers config, whatever its attribute names."""
    config = getattr(config, "text_config", None) or config
    if config.model_type == "gpt2":
        hidden, heads, layers = config.n_embd, config.n_head, config.n_layer
        return Dims(layers, heads, heads, hidden // heads, config.n_inner or 4 * hidden)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return Dims(config.num_hidden_layers, heads, kv_heads, head_dim, config.intermediate_size)


def _get_submodule(root: nn.Module, path: str) -> nn.Module:
    try:
        return root.get_submodule(path)
    except AttributeError as exc:
        raise UnsupportedArchitecture(
            f"{type(root).__name__} has no submodule '{path}'",
            hint="the model does not match its architecture's layout; is it a causal LM of a supported family?",
        ) from exc


@dataclass
class ModelLayout:
    """An :class:`ArchSpec` bound to the sizes of one model: the only object method code asks for addresses."""

    spec: ArchSpec
    dims: Dims
    model_type: str
    _channel_cache: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def for_config(cls, config) -> ModelLayout:
        model_type = (getattr(config, "text_config", None) or config).model_type
        return cls(spec=spec_for_model_type(model_type), dims=_dims(config), model_type=model_type)

    @classmethod
    def for_model(cls, model: nn.Module) -> ModelLayout:
        return cls.for_config(model.config)

    @property
    def n_layers(self) -> int:
        return self.dims.n_layers

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(s for s in SITES if s in self.spec.sites)

    def site_map(self, site: str) -> SiteMap:
        if site not in SITES:
            raise UnsupportedArchitecture(f"unknown site '{site}'", hint="sites: " + ", ".join(SITES))
        if site not in self.spec.sites:
            raise UnsupportedArchitecture(
                f"site '{site}' does not exist in {self.spec.name} models",
                hint=f"{self.spec.name} has: " + ", ".join(self.sites),
            )
        return self.spec.sites[site]

    def site_size(self, site: str) -> int:
        return self.dims.of(self.site_map(site).size)

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return _get_submodule(model, self.spec.blocks)

    def module(self, model: nn.Module, layer: int, site: str) -> nn.Module:
        """The module whose output (``out`` sites) or input (``in`` sites) holds the site's channels."""
        if not 0 <= layer < self.n_layers:
            raise UnsupportedArchitecture(f"layer {layer} out of range: the model has {self.n_layers} layers")
        return _get_submodule(self.blocks(model)[layer], self.site_map(site).module)

    def module_name(self, layer: int, site: str) -> str:
        return f"{self.spec.blocks}.{layer}.{self.site_map(site).module}"

    def channels(self, site: str, indices: torch.Tensor | list[int] | None = None) -> torch.Tensor:
        """Physical channels (of the module's output or input feature axis) of the site's ``indices``.

        ``None`` means every index of the site, in order.
        """
        if site not in self._channel_cache:
            smap = self.site_map(site)
            size = self.dims.of(smap.size)
            idx = torch.arange(size)
            if smap.interleave is not None:
                hd = self.dims.head_dim
                phys = (idx // hd) * 3 * hd + smap.interleave * hd + idx % hd
            else:
                phys = idx + sum(self.dims.of(d) for d in smap.offset)
            self._channel_cache[site] = phys
        full = self._channel_cache[site]
        if indices is None:
            return full
        return full[torch.as_tensor(indices, dtype=torch.long)]

    def describe_channel(self, site: str, index: int) -> str:
        """A human reading of one index: which head and dimension, and which query heads a shared k/v touches."""
        smap = self.site_map(site)
        if smap.size == "ffn":
            return f"neuron {index}"
        hd = self.dims.head_dim
        head, dim = divmod(index, hd)
        if smap.size == "kv" and self.dims.n_kv_heads != self.dims.n_heads:
            group = self.dims.n_heads // self.dims.n_kv_heads
            return f"kv head {head} dim {dim} (shared by query heads {head * group}-{head * group + group - 1})"
        return f"head {head} dim {dim}"
