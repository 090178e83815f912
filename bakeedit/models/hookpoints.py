"""Named hook points: read or replace the activations of a site, whatever the architecture's layout.

Locating (attribution, ablation, patching) and runtime edits all address a neuron the same way, as
``(layer, site)`` plus an index; this module turns that into a forward hook (output sites) or forward pre-hook
(input sites) on the right module and gathers/scatters the site's channels out of fused tensors. A hook function
receives the site's activations, shape ``[batch, seq, site_size]``, and returns a replacement or ``None``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from bakeedit.models.arch import ModelLayout
from bakeedit.models.expert_hooks import ExpertHookHandle, register_expert_hook

SiteFn = Callable[[torch.Tensor], "torch.Tensor | None"]


def _through(t: torch.Tensor, fn: SiteFn, phys: torch.Tensor, whole: bool) -> torch.Tensor:
    if whole:
        out = fn(t)
        return t if out is None else out
    phys = phys.to(t.device)
    out = fn(t.index_select(-1, phys))
    if out is None:
        return t
    # Out of place so that autograd (integrated gradients) sees the replacement.
    return t.index_copy(-1, phys, out.to(t.dtype))


def register_site_hook(
    model: nn.Module, layout: ModelLayout, layer: int, site: str, fn: SiteFn
) -> RemovableHandle | ExpertHookHandle:
    """Attach ``fn`` to the activations of ``site`` in block ``layer``; returns the handle to remove it."""
    module = layout.module(model, layer, site)
    phys = layout.channels(site)
    smap = layout.site_map(site)
    if smap.expert is not None:  # a routed expert: no module of its own (models/expert_hooks.py)
        return register_expert_hook(module, smap.expert, smap.axis, phys, fn)
    weight = module._parameters.get("weight")  # dict.get: a blockwise model's meta entry, read from no shard
    weight = module.weight if weight is None else weight
    width = weight.shape[0 if smap.axis == "out" else 1]
    if type(module).__name__ == "Conv1D":  # GPT-2 stores weights [in, out]
        width = weight.shape[1 if smap.axis == "out" else 0]
    whole = len(phys) == width and bool((phys == torch.arange(width)).all())

    if smap.axis == "out":

        def forward_hook(_mod: nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
            return _through(output, fn, phys, whole)

        return module.register_forward_hook(forward_hook)

    def pre_hook(_mod: nn.Module, args: tuple) -> tuple | None:
        new = _through(args[0], fn, phys, whole)
        return None if new is args[0] else (new, *args[1:])

    return module.register_forward_pre_hook(pre_hook)


@contextmanager
def site_hooks(
    model: nn.Module, layout: ModelLayout, fns: Mapping[tuple[int, str], SiteFn]
) -> Iterator[None]:
    """Hooks on several ``(layer, site)`` addresses for the duration of a ``with`` block."""
    handles = [register_site_hook(model, layout, layer, site, fn) for (layer, site), fn in fns.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def capture_sites(
    model: nn.Module, layout: ModelLayout, addresses: list[tuple[int, str]],
    keep: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[dict[tuple[int, str], torch.Tensor]]:
    """Record the activations of each address during the forward passes run inside the block. ``keep`` selects
    what is kept of each activation as it is recorded (e.g. the last positions of each prompt), so that a deep
    model's full activations are never all held at once."""
    store: dict[tuple[int, str], torch.Tensor] = {}

    def recorder(address: tuple[int, str]) -> SiteFn:
        def record(act: torch.Tensor) -> None:
            store[address] = act.detach() if keep is None else keep(act.detach())

        return record

    with site_hooks(model, layout, {a: recorder(a) for a in addresses}):
        yield store
