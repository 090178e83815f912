"""The runtime form of an :class:`EditPlan`: hooks on the unmodified model (peft's wrapper, before ``merge``).

Used to check a fold (baked weights must reproduce the hooked model) and by evaluations of a plan without saving.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from bakeedit.edit.plan import EditPlan, ScaleGroup
from bakeedit.models.arch import ModelLayout
from bakeedit.models.hookpoints import SiteFn, site_hooks


def scale_vector(group: ScaleGroup, size: int) -> torch.Tensor:
    """A float32 vector over the site's channels: ``lambda`` at the group's indices, 1 elsewhere."""
    scale = torch.ones(size, dtype=torch.float32)
    scale[torch.tensor(group.indices, dtype=torch.long)] = torch.tensor(group.lambdas, dtype=torch.float32)
    return scale


def _scaler(scale: torch.Tensor) -> SiteFn:
    cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def apply(act: torch.Tensor) -> torch.Tensor:
        key = (act.device, act.dtype)
        if key not in cache:
            cache[key] = scale.to(device=act.device, dtype=act.dtype)
        return act * cache[key]

    return apply


@contextmanager
def runtime_edit(model: nn.Module, layout: ModelLayout, plan: EditPlan) -> Iterator[None]:
    """Apply ``plan`` with hooks for the duration of a ``with`` block; the weights are not touched."""
    fns = {
        (g.layer, g.site): _scaler(scale_vector(g, layout.site_size(g.site))) for g in plan.groups
    }
    with site_hooks(model, layout, fns):
        yield
