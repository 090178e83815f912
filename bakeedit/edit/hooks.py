"""The runtime form of an :class:`EditPlan`: hooks on the unmodified model (peft's wrapper, before ``merge``).

Used to check a fold or a custom module (the saved checkpoint must reproduce the hooked model) and by evaluations
of a plan without saving. Linear groups scale their channels; module groups apply their response map at their
positions (``edit/nonlinear.py``), with the cache length, attention mask and position ids of each call read by a
pre-hook on the base model. While the hooks are on, the model's ``bakeedit_positions`` attribute names the position
scopes of its module groups, as the saved custom module's does, so that the scorer can refuse a batching mode that
cannot reproduce a ``last`` edit.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from bakeedit.edit.nonlinear import POSITIONS_ATTR, PositionTracker, attached_positions, response_fn
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


def _chain(fns: list[SiteFn]) -> SiteFn:
    """Several edits of one site, applied in turn (their channels are disjoint, so the order does not matter)."""
    if len(fns) == 1:
        return fns[0]

    def apply(act: torch.Tensor) -> torch.Tensor | None:
        out = act
        for fn in fns:
            new = fn(out)
            out = out if new is None else new
        return None if out is act else out

    return apply


@contextmanager
def _announced(model: nn.Module, positions: frozenset[str]) -> Iterator[None]:
    """Add ``positions`` to the model's ``bakeedit_positions`` for the block; what was there before comes back."""
    if not positions:
        yield
        return
    before = model.__dict__.get(POSITIONS_ATTR)
    setattr(model, POSITIONS_ATTR, attached_positions(model) | positions)
    try:
        yield
    finally:
        if before is None:
            delattr(model, POSITIONS_ATTR)
        else:
            setattr(model, POSITIONS_ATTR, before)


@contextmanager
def runtime_edit(model: nn.Module, layout: ModelLayout, plan: EditPlan) -> Iterator[None]:
    """Apply ``plan`` with hooks for the duration of a ``with`` block; the weights are not touched."""
    per_site: dict[tuple[int, str], list[SiteFn]] = defaultdict(list)
    for g in plan.groups:
        per_site[(g.layer, g.site)].append(_scaler(scale_vector(g, layout.site_size(g.site))))
    tracker = PositionTracker()
    for r in plan.module_groups:
        per_site[(r.layer, r.site)].append(response_fn(r.map, r.indices, r.params, r.positions, r.start, tracker))
    handle = tracker.attach(model) if plan.module_groups else None
    try:
        with (
            site_hooks(model, layout, {address: _chain(fns) for address, fns in per_site.items()}),
            _announced(model, frozenset(r.positions for r in plan.module_groups)),
        ):
            yield
    finally:
        if handle is not None:
            handle.remove()
