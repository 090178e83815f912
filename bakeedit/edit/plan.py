"""``EditPlan``: which channels of which site get which lambda, validated against one model before anything moves.

Like mergekit's plan, it is built and checked in full (indices in range, lambdas finite, no neuron given two
lambdas) before a tensor is touched; the runtime hooks (``edit/hooks.py``) and the fold (``edit/fold.py``) both
execute the same plan, which is what makes the baked-vs-runtime verification meaningful.
"""

from __future__ import annotations

import math
from collections import defaultdict

from pydantic import BaseModel, ConfigDict, Field

from bakeedit.errors import EditError, NeuronSetError, UnsupportedArchitecture
from bakeedit.models.arch import SITES, ModelLayout
from bakeedit.neurons import Neuron
from bakeedit.recipe import EditSpec


class ScaleGroup(BaseModel):
    """Channels ``indices`` of ``site`` in block ``layer`` scaled by ``lambdas`` (same length)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layer: int
    site: str
    indices: list[int]
    lambdas: list[float]


class EditPlan(BaseModel):
    """A linear edit: one :class:`ScaleGroup` per ``(layer, site)``, sorted by layer then site."""

    model_config = ConfigDict(extra="forbid")

    kind: str = "scale"
    groups: list[ScaleGroup] = Field(default_factory=list)

    @property
    def n_neurons(self) -> int:
        return sum(len(g.indices) for g in self.groups)

    def lambdas_used(self) -> list[float]:
        return sorted({lam for g in self.groups for lam in g.lambdas})


def build_plan(neurons: list[Neuron], edit: EditSpec, layout: ModelLayout, source: str = "neurons") -> EditPlan:
    """Validate ``neurons`` against the model and attach each one's lambda.

    Errors name ``source`` and the neuron's position in the list, e.g. ``neurons[3].index``.
    """
    chosen: dict[tuple[int, str, int], float] = {}
    for i, neuron in enumerate(neurons):
        where = f"{source}[{i}]"
        if neuron.layer >= layout.n_layers:
            raise NeuronSetError(
                f"{where}.layer: {neuron.layer} is out of range; the model has layers 0-{layout.n_layers - 1}"
            )
        try:
            size = layout.site_size(neuron.site)
        except UnsupportedArchitecture as exc:
            raise NeuronSetError(f"{where}.site: {exc}", hint=exc.hint) from exc
        if neuron.index >= size:
            raise NeuronSetError(
                f"{where}.index: {neuron.index} is out of range for {neuron.site}, which has {size} channels "
                f"(0-{size - 1})"
            )
        lam = edit.lambda_for(neuron)
        if not math.isfinite(lam):
            raise EditError(f"{where}: lambda must be finite (got {lam})")
        previous = chosen.get(neuron.address)
        if previous is not None and previous != lam:
            raise NeuronSetError(
                f"{where}: layer {neuron.layer} {neuron.site} {neuron.index} is listed twice with different "
                f"lambdas ({previous} and {lam})",
                hint="list each neuron once, or give both entries the same lambda",
            )
        chosen[neuron.address] = lam

    grouped: dict[tuple[int, str], list[tuple[int, float]]] = defaultdict(list)
    for (layer, site, index), lam in chosen.items():
        grouped[(layer, site)].append((index, lam))
    groups = []
    for layer, site in sorted(grouped, key=lambda k: (k[0], SITES.index(k[1]))):
        pairs = sorted(grouped[(layer, site)])
        groups.append(
            ScaleGroup(layer=layer, site=site, indices=[i for i, _ in pairs], lambdas=[lam for _, lam in pairs])
        )
    return EditPlan(groups=groups)
