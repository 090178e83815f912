"""Fold a linear :class:`EditPlan` into the weights (peft's ``merge``), so the checkpoint needs no custom code.

Scaling output channel ``i`` of a projection is scaling row ``i`` of its weight *and* ``bias[i]`` (as peft's IA3
merge has done since peft 0.6; before it left the bias alone, and Qwen2's q/k/v biases make that matter).
Scaling input channel ``j`` of a projection is scaling column ``j`` of its weight. GPT-2's Conv1D stores
``[in, out]``, so rows and columns swap. The product is taken in float32 and cast back to the weight's dtype once;
channels with lambda 1 are left bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bakeedit.edit.hooks import scale_vector
from bakeedit.edit.plan import EditPlan, ScaleGroup
from bakeedit.errors import EditError, UnsupportedArchitecture
from bakeedit.models.arch import ModelLayout
from bakeedit.models.lazy import is_lazy


@dataclass(frozen=True)
class FoldedTensor:
    """One weight or bias the fold changed, with how many of its rows/columns."""

    name: str
    axis: int
    n_channels: int


@dataclass(frozen=True)
class FoldTarget:
    """A tensor one :class:`ScaleGroup` scales: its state-dict name and the dimension indexing the site's channels.

    Shared by the in-memory fold and the streaming fold (``export/stream.py``), which has no module to look at:
    everything here comes from the :class:`ModelLayout` (config + ArchSpec) alone.
    """

    name: str
    axis: int


def feature_axis(layout: ModelLayout, site: str, stored: bool = False) -> int:
    """The weight dimension that indexes the site's channels (``[in, out]`` Conv1D weights swap rows and columns;
    a routed expert's fused ``[experts, out, in]`` parameter has them one further, its stored tensor does not)."""
    smap = layout.site_map(site)
    if smap.param is not None and not stored:
        return 1 if smap.axis == "out" else 2
    transposed = layout.spec.transposed_weights
    if smap.axis == "out":
        return 1 if transposed else 0
    return 0 if transposed else 1


def fold_targets(layout: ModelLayout, group: ScaleGroup, has_bias: bool, stored: bool = False) -> list[FoldTarget]:
    """The weight (and, for an output-channel site whose module has one, the bias) that ``group`` scales.

    ``stored=True`` names the tensors as checkpoint files hold them (a routed expert's own 2D weight rather than
    the fused parameter transformers builds on load); the streaming fold and block verification use that.
    """
    smap = layout.site_map(group.site)
    name = layout.weight_name(group.layer, group.site, stored)
    targets = [FoldTarget(name, feature_axis(layout, group.site, stored))]
    if smap.axis == "out" and has_bias and smap.param is None:
        targets.append(FoldTarget(f"{layout.module_name(group.layer, group.site)}.bias", 0))
    return targets


def channel_factors(layout: ModelLayout, group: ScaleGroup, width: int, stored: bool = False) -> torch.Tensor:
    """A float32 vector over a tensor's feature axis of length ``width``: the group's lambdas at its physical
    channels (fused tensors hold other sites' channels too), 1 everywhere else.

    For a routed expert's fused parameter it is a ``[experts, width]`` matrix, ones except the expert's row; for
    its stored tensor (``stored=True``) the channels are the indices themselves (that tensor holds one part).
    """
    smap = layout.site_map(group.site)
    factors = scale_vector(group, layout.site_size(group.site))[torch.tensor(group.indices)]
    channels = torch.tensor(group.indices) if smap.param is not None and stored else layout.channels(
        group.site, group.indices)
    full = torch.ones(width, dtype=torch.float32)
    full[channels] = factors
    if smap.param is None or stored:
        return full
    per_expert = torch.ones(layout.dims.n_experts, width, dtype=torch.float32)
    per_expert[smap.expert] = full
    return per_expert


def scaled(tensor: torch.Tensor, axis: int, full: torch.Tensor) -> torch.Tensor:
    """``tensor * full`` broadcast along ``axis``, computed in float32 and cast back to ``tensor.dtype``.

    The one place the fold's arithmetic lives: the streaming fold calls it on row blocks of a tensor, the in-memory
    fold on the whole tensor; the product is elementwise, so both give the same bytes. A 2D ``full``
    (``[experts, width]``) scales a fused expert parameter per expert: its first axis is the tensor's first.
    """
    shape = [1] * tensor.dim()
    if full.dim() == 2:
        shape[0] = full.shape[0]
        shape[axis] = full.shape[1]
    else:
        shape[axis] = -1
    work = tensor.to(torch.float32, copy=True)  # a copy even for float32 input, so the product can be in place
    return work.mul_(full.to(tensor.device).view(shape)).to(tensor.dtype)


def _shared_parameter_names(model: nn.Module) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(param.data_ptr(), []).append(name)
    return names


def _refuse_offloaded(model: nn.Module) -> None:
    """An accelerate-offloaded model (``device_map`` with ``"disk"``, ``cpu_offload``) keeps its weights on the meta
    device and loads them per forward pass: a fold would write into nothing, and every meta tensor has the same
    ``data_ptr()``, so the aliasing check would be meaningless too."""
    offloaded = [name for name, param in model.named_parameters() if param.device.type == "meta"]
    disk = [name for name, where in (getattr(model, "hf_device_map", None) or {}).items() if where == "disk"]
    if offloaded or disk:
        where = f"{len(offloaded)} parameter(s) on the meta device, e.g. {offloaded[0]}" if offloaded else (
            f"{len(disk)} module(s) offloaded to disk, e.g. {disk[0]}")
        raise EditError(
            f"cannot fold into an offloaded model ({where}): use the streaming bake (bakeedit apply without "
            "--in-memory, or bakeedit.export.stream)",
            hint="the streaming bake reads and writes the checkpoint tensor by tensor, without loading the model",
        )


@torch.no_grad()
def fold_plan(model: nn.Module, layout: ModelLayout, plan: EditPlan) -> list[FoldedTensor]:
    """Bake ``plan`` into ``model``'s weights in place; returns what was changed, for provenance.

    Refuses an offloaded model (:func:`_refuse_offloaded`) and a blockwise one (its weights stay in the shards; an
    in-place scale of the copy read on access would change nothing): neither holds its weights where the fold
    writes."""
    if is_lazy(model):
        raise EditError("a blockwise model keeps its weights on disk and cannot be folded in memory",
                        hint="bake it by streaming (bakeedit apply streams a linear plan), or load it in memory")
    _refuse_offloaded(model)
    shared = _shared_parameter_names(model)
    folded: list[FoldedTensor] = []
    for group in plan.groups:
        module = layout.module(model, group.layer, group.site)
        if (type(module).__name__ == "Conv1D") != layout.spec.transposed_weights:
            raise UnsupportedArchitecture(
                f"{layout.module_name(group.layer, group.site)} is a {type(module).__name__}, which the "
                f"{layout.spec.name} ArchSpec does not expect (transposed_weights={layout.spec.transposed_weights})"
            )
        has_bias = getattr(module, "bias", None) is not None
        # Reported under the names checkpoints store (a routed expert's own tensor, not the fused parameter), so
        # provenance reads the same whichever path baked the folder.
        stored_targets = fold_targets(layout, group, has_bias, stored=True)
        for target, stored in zip(fold_targets(layout, group, has_bias), stored_targets, strict=True):
            tensor = getattr(module, target.name.rsplit(".", 1)[1])
            aliases = shared.get(tensor.data_ptr(), [])
            if len(aliases) > 1:
                raise EditError(
                    f"{target.name} shares its storage with {', '.join(a for a in aliases[1:])}; "
                    "folding into it would edit the other tensor too",
                    hint="untie the weights first, or edit a different site",
                )
            full = channel_factors(layout, group, tensor.shape[target.axis])
            tensor.data.copy_(scaled(tensor.data, target.axis, full))
            folded.append(FoldedTensor(stored.name, stored.axis, len(group.indices)))
    return folded
