"""Fold a linear :class:`EditPlan` into the weights (peft's ``merge``), so the checkpoint needs no custom code.

Scaling output channel ``i`` of a projection is scaling row ``i`` of its weight *and* ``bias[i]`` (IA3's merge in
peft forgets the bias; Qwen2's q/k/v biases make that matter). Scaling input channel ``j`` of a projection is
scaling column ``j`` of its weight. GPT-2's Conv1D stores ``[in, out]``, so rows and columns swap. The product is
taken in float32 and cast back to the weight's dtype once; channels with lambda 1 are left bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bakeedit.edit.hooks import scale_vector
from bakeedit.edit.plan import EditPlan
from bakeedit.errors import EditError
from bakeedit.models.arch import ModelLayout


@dataclass(frozen=True)
class FoldedTensor:
    """One weight or bias the fold changed, with how many of its rows/columns."""

    name: str
    axis: int
    n_channels: int


def _feature_axis(module: nn.Module, site_axis: str) -> int:
    """The weight dimension that indexes the site's channels."""
    conv1d = type(module).__name__ == "Conv1D"
    if site_axis == "out":
        return 1 if conv1d else 0
    return 0 if conv1d else 1


def _shared_parameter_names(model: nn.Module) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(param.data_ptr(), []).append(name)
    return names


def _scale_along(tensor: torch.Tensor, axis: int, channels: torch.Tensor, factors: torch.Tensor) -> None:
    """``tensor[..channels..] *= factors`` along ``axis``, computed in float32, written back in place."""
    shape = [1] * tensor.dim()
    shape[axis] = -1
    full = torch.ones(tensor.shape[axis], dtype=torch.float32, device=tensor.device)
    full[channels.to(tensor.device)] = factors.to(tensor.device)
    tensor.copy_((tensor.float() * full.view(shape)).to(tensor.dtype))


@torch.no_grad()
def fold_plan(model: nn.Module, layout: ModelLayout, plan: EditPlan) -> list[FoldedTensor]:
    """Bake ``plan`` into ``model``'s weights in place; returns what was changed, for provenance."""
    shared = _shared_parameter_names(model)
    folded: list[FoldedTensor] = []
    for group in plan.groups:
        module = layout.module(model, group.layer, group.site)
        smap = layout.site_map(group.site)
        channels = layout.channels(group.site, group.indices)
        factors = scale_vector(group, layout.site_size(group.site))[torch.tensor(group.indices)]
        axis = _feature_axis(module, smap.axis)
        module_name = layout.module_name(group.layer, group.site)
        targets = [("weight", axis)]
        if smap.axis == "out" and getattr(module, "bias", None) is not None:
            targets.append(("bias", 0))
        for attr, dim in targets:
            tensor = getattr(module, attr)
            aliases = shared.get(tensor.data_ptr(), [])
            if len(aliases) > 1:
                raise EditError(
                    f"{module_name}.{attr} shares its storage with {', '.join(a for a in aliases[1:])}; "
                    "folding into it would edit the other tensor too",
                    hint="untie the weights first, or edit a different site",
                )
            _scale_along(tensor.data, dim, channels, factors)
            folded.append(FoldedTensor(f"{module_name}.{attr}", dim, len(group.indices)))
    return folded
