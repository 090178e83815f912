"""Where each *site* lives in each supported architecture: an :class:`ArchSpec` bound to one model's sizes.

A site is a named place inside a decoder block (``attn.q``, ``mlp.act``, ...; see ``SITES`` and
``../shared/METHODS.md``). Method code speaks only of ``(layer, site, index)``; :class:`ModelLayout` maps that
address to a module, to the physical channel of that module's output or input, and so to a weight row or column.
Fused layouts (Phi-3 ``qkv_proj``/``gate_up_proj``, GPT-2's ``c_attn`` Conv1D, GPT-NeoX's per-head interleaved
``query_key_value``) are resolved here and nowhere else. The tables are data (``models/architectures/*.json``,
read by :mod:`bakeedit.models.registry`); this module only does the arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from bakeedit.errors import UnsupportedArchitecture
from bakeedit.models.registry import spec_for, spec_for_model_type, supported_model_types
from bakeedit.models.spec import (
    SHARED_SITES,
    SITE_NAMES_HINT,
    SITES,
    ArchSpec,
    Dim,
    Site,
    SiteMap,
    expert_site,
    is_site,
)

__all__ = ["SITES", "ArchSpec", "Dims", "ModelLayout", "Site", "SiteMap", "spec_for_model_type",
           "supported_model_types"]


@dataclass(frozen=True)
class Dims:
    """The sizes a site can have in one model."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn: int | None
    n_experts: int = 0
    expert_ffn: int | None = None
    shared_ffn: int | None = None

    @property
    def q(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv(self) -> int:
        return self.n_kv_heads * self.head_dim

    def of(self, dim: Dim) -> int:
        size = {"q": self.q, "kv": self.kv, "ffn": self.ffn, "expert_ffn": self.expert_ffn,
                "shared_ffn": self.shared_ffn}[dim]
        if size is None:
            raise UnsupportedArchitecture(f"the model config gives no size for '{dim}'")
        return size


def _dims(config, spec: ArchSpec) -> Dims:
    """Read the block sizes from a transformers config, with the attribute names the spec's family uses."""
    config = getattr(config, "text_config", None) or config
    keys = spec.config_keys
    hidden = getattr(config, keys.hidden)
    heads = getattr(config, keys.n_heads)
    head_dim = getattr(config, keys.head_dim, None) or hidden // heads
    kv_heads = getattr(config, keys.n_kv_heads, None) or heads
    ffn = getattr(config, keys.ffn, None)
    if ffn is None and keys.ffn_multiple is not None:
        ffn = keys.ffn_multiple * hidden
    experts = (getattr(config, keys.n_experts, None) or 0) if spec.expert_sites else 0
    return Dims(getattr(config, keys.n_layers), heads, kv_heads, head_dim, ffn, experts,
                getattr(config, keys.expert_ffn, None) if experts else None,
                getattr(config, keys.shared_ffn, None) if any(s in spec.sites for s in SHARED_SITES) else None)


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
    #: The table named explicitly (``model.arch``) for a type no architecture file claims, else None.
    arch: str | None = None
    _channel_cache: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def for_config(cls, config, arch: str | None = None) -> ModelLayout:
        """The layout of a model with this config; ``arch`` names a table explicitly (``llama-like``) for a
        ``model_type`` no architecture file claims."""
        model_type = (getattr(config, "text_config", None) or config).model_type
        spec = spec_for(model_type, arch)
        return cls(spec=spec, dims=_dims(config, spec), model_type=model_type, arch=arch)

    @classmethod
    def for_model(cls, model: nn.Module, arch: str | None = None) -> ModelLayout:
        """As :meth:`for_config`; an unknown type whose module names match a table is offered that guess."""
        model_type = (getattr(model.config, "text_config", None) or model.config).model_type
        spec = spec_for(model_type, arch, (name for name, _ in model.named_modules()))
        return cls(spec=spec, dims=_dims(model.config, spec), model_type=model_type, arch=arch)

    @property
    def n_layers(self) -> int:
        return self.dims.n_layers

    @property
    def sites(self) -> tuple[str, ...]:
        """The sites every block has (dense, then a shared expert's); routed-expert sites are in
        :meth:`expert_sites`, so methods that scan every site do not scan every expert unasked."""
        return tuple(s for s in SITES + SHARED_SITES if s in self.spec.sites)

    def expert_sites(self) -> tuple[str, ...]:
        """Every routed-expert site of a block (``mlp.experts.E.part``), empty for dense models."""
        return tuple(f"mlp.experts.{e}.{part}" for e in range(self.dims.n_experts) for part in self.spec.expert_sites)

    def site_map(self, site: str) -> SiteMap:
        if not is_site(site):
            raise UnsupportedArchitecture(f"unknown site '{site}'", hint="sites: " + SITE_NAMES_HINT)
        found = expert_site(site)
        if found is not None and found[1] in self.spec.expert_sites:
            expert, part = found
            if expert >= self.dims.n_experts:
                raise UnsupportedArchitecture(f"site '{site}': the model has {self.dims.n_experts} experts per block "
                                              f"(0-{self.dims.n_experts - 1})")
            return replace(self.spec.expert_sites[part], expert=expert)
        if site not in self.spec.sites:
            has = ", ".join(self.sites) + (", mlp.experts.E.{" + ",".join(self.spec.expert_sites) + "}"
                                           if self.spec.expert_sites else "")
            raise UnsupportedArchitecture(
                f"site '{site}' does not exist in {self.spec.name} models", hint=f"{self.spec.name} has: {has}"
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

    def weight_name(self, layer: int, site: str, stored: bool = False) -> str:
        """The state-dict name of the weight that holds the site's channels: ``<module>.weight``, or for a routed
        expert the fused parameter (in memory) or the expert's own tensor (``stored=True``: checkpoint files)."""
        smap = self.site_map(site)
        if smap.param is None:
            return f"{self.module_name(layer, site)}.weight"
        if stored:
            return f"{self.spec.blocks}.{layer}.{smap.stored.format(expert=smap.expert)}.weight"
        return f"{self.module_name(layer, site)}.{smap.param}"

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

    def stored_parts(self, layer: int, relative: str) -> list[str] | None:
        """For a fused routed-experts parameter (``mlp.experts.gate_up_proj``, relative to the block), the stored
        tensor names it is built from when transformers loads a checkpoint, expert-major and in concatenation
        order (``[e0 gate, e0 up, e1 gate, ...]``); None for any other parameter."""
        parts = [(smap.offset, smap.stored) for smap in self.spec.expert_sites.values()
                 if f"{smap.module}.{smap.param}" == relative]
        if not parts:
            return None
        ordered = [stored for _, stored in sorted(parts, key=lambda p: len(p[0]))]
        return [f"{self.spec.blocks}.{layer}.{stored.format(expert=e)}.weight"
                for e in range(self.dims.n_experts) for stored in ordered]

    def describe_channel(self, site: str, index: int) -> str:
        """A human reading of one index: which head and dimension, and which query heads a shared k/v touches."""
        smap = self.site_map(site)
        if smap.size in ("ffn", "expert_ffn", "shared_ffn"):
            return f"neuron {index}"
        hd = self.dims.head_dim
        head, dim = divmod(index, hd)
        if smap.size == "kv" and self.dims.n_kv_heads != self.dims.n_heads:
            group = self.dims.n_heads // self.dims.n_kv_heads
            return f"kv head {head} dim {dim} (shared by query heads {head * group}-{head * group + group - 1})"
        return f"head {head} dim {dim}"
