"""``random``: the control every debiasing claim is compared against.

Draws, for a reference NeuronSet, the same number of neurons in every ``(layer, site)`` cell, uniformly among the
channels of that cell that the reference did not pick (so the control never overlaps the located set when it can
avoid it), with a seeded generator: same seed, same set.

Under torchrun it has no items to split: every rank draws the whole set from its own CPU generator seeded alike
(``torch.Generator()`` on the CPU, whatever device the model is on: ``randperm`` on it gives the same sequence in
every process of one installation), from the same reference file, so every rank holds the same NeuronSet
without a collective.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from bakeedit.errors import NeuronSetError
from bakeedit.locate.registry import LocateContext, register
from bakeedit.models.arch import ModelLayout
from bakeedit.models.load import LoadedModel
from bakeedit.models.spec import site_order
from bakeedit.neurons import Neuron, NeuronSet


class RandomParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reference: str = Field(description="path of the NeuronSet whose layer/site histogram is matched")
    seed: int = 0


def random_like(reference: NeuronSet, layout: ModelLayout, seed: int) -> NeuronSet:
    """Neurons with exactly ``reference``'s per-(layer, site) counts, avoiding its own neurons where possible.

    A function of ``reference``, the layout's sizes and ``seed`` alone (a CPU generator, never the global one), so
    every torchrun rank draws the same set."""
    generator = torch.Generator().manual_seed(seed)
    taken = {n.address for n in reference.neurons}
    neurons: list[Neuron] = []
    cells = sorted(reference.histogram().items(), key=lambda kv: (kv[0][0], site_order(kv[0][1])))
    for (layer, site), count in cells:
        size = layout.site_size(site)
        if layer >= layout.n_layers or count > size:
            raise NeuronSetError(f"reference neuron set does not fit this model at layer {layer} {site}")
        free = torch.tensor([i for i in range(size) if (layer, site, i) not in taken], dtype=torch.long)
        pool = free if len(free) >= count else torch.arange(size)
        picks = pool[torch.randperm(len(pool), generator=generator)[:count]]
        neurons.extend(Neuron(layer=layer, site=site, index=int(i)) for i in sorted(picks.tolist()))
    return NeuronSet(method="random", params={"seed": seed, "reference_method": reference.method}, neurons=neurons)


@register("random", RandomParams, "same per-layer/per-site counts as a reference set, drawn at random (seeded)")
def run_random(loaded: LoadedModel, params: RandomParams, ctx: LocateContext) -> NeuronSet:
    path = Path(params.reference)
    reference = NeuronSet.load(path if path.is_absolute() else ctx.base_dir / path)
    return random_like(reference, loaded.layout, params.seed)
