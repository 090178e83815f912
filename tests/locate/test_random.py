"""``random``: the control keeps a reference set's per-(layer, site) histogram exactly, is seeded, and avoids it."""

from __future__ import annotations

import pytest
from coco_helpers import loaded_tiny

from bakeedit.errors import NeuronSetError
from bakeedit.locate import LocateContext, run_locate
from bakeedit.locate.random import random_like
from bakeedit.models.arch import ModelLayout
from bakeedit.neurons import Neuron, NeuronSet
from bakeedit.recipe import LocateSpec


@pytest.fixture(scope="module")
def layout() -> ModelLayout:
    return loaded_tiny("llama").layout  # 3 layers; q 32, kv 16, ffn 48 channels


def reference_set() -> NeuronSet:
    cells = {(0, "attn.q"): [1, 5, 9], (1, "attn.v"): [0, 2, 4, 6, 8, 10], (2, "mlp.act"): list(range(0, 40, 3)),
             (2, "attn.q"): [31], (1, "mlp.gate"): [7, 8]}
    neurons = [Neuron(layer=layer, site=site, index=i, score=0.5) for (layer, site), idx in cells.items() for i in idx]
    return NeuronSet(method="coco", neurons=neurons)


def addresses(ns: NeuronSet) -> set[tuple[int, str, int]]:
    return {n.address for n in ns.neurons}


def test_histogram_is_reproduced_exactly(layout):
    reference = reference_set()
    for seed in range(5):
        control = random_like(reference, layout, seed)
        assert control.histogram() == reference.histogram()
        assert len(addresses(control)) == len(control.neurons)  # no neuron drawn twice
        assert all(n.index < layout.site_size(n.site) for n in control.neurons)


def test_same_seed_same_set_different_seed_different_set(layout):
    reference = reference_set()
    assert random_like(reference, layout, 7).neurons == random_like(reference, layout, 7).neurons
    draws = [addresses(random_like(reference, layout, seed)) for seed in range(6)]
    assert len({frozenset(d) for d in draws}) == 6


def test_avoids_the_reference_neurons_when_it_can(layout):
    reference = reference_set()
    for seed in range(5):
        assert not addresses(random_like(reference, layout, seed)) & addresses(reference)


def test_a_cell_too_full_to_avoid_still_keeps_its_count(layout):
    # 10 of the 16 v channels of layer 0 are taken: only 6 are free, so the 10 are drawn among all 16.
    reference = NeuronSet(method="x", neurons=[Neuron(layer=0, site="attn.v", index=i) for i in range(10)])
    control = random_like(reference, layout, 0)
    assert control.histogram() == reference.histogram()
    assert len(addresses(control)) == 10


def test_a_reference_that_does_not_fit_the_model_is_refused(layout):
    too_deep = NeuronSet(method="x", neurons=[Neuron(layer=3, site="attn.q", index=0)])
    with pytest.raises(NeuronSetError, match="layer 3"):
        random_like(too_deep, layout, 0)
    too_many = NeuronSet(method="x", neurons=[Neuron(layer=0, site="attn.v", index=i) for i in range(17)])
    with pytest.raises(NeuronSetError):
        random_like(too_many, layout, 0)


def test_runs_from_a_recipe_block_with_a_relative_reference(tmp_path):
    reference_set().save(tmp_path / "located.json")
    loaded = loaded_tiny("llama")
    spec = LocateSpec(method="random", reference="located.json", seed=3)
    control = run_locate(spec, loaded, LocateContext(base_dir=tmp_path))
    assert control.method == "random" and control.params["seed"] == 3 and control.params["reference"] == "located.json"
    assert control.histogram() == reference_set().histogram()
    assert control.neurons == random_like(reference_set(), loaded.layout, 3).neurons
