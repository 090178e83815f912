"""Plan validation happens before any tensor moves, and names the offending neuron."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from bakeedit.edit import build_plan
from bakeedit.errors import NeuronSetError
from bakeedit.models.arch import ModelLayout
from bakeedit.neurons import Neuron
from bakeedit.recipe import EditSpec

from tiny_models import tiny_model


@pytest.fixture(scope="module")
def layout() -> ModelLayout:
    return ModelLayout.for_model(tiny_model("llama"))


def spec(**kw) -> EditSpec:
    return EditSpec.model_validate(kw)


def test_index_out_of_range_names_the_neuron_and_the_range(layout):
    neurons = [Neuron(layer=0, site="mlp.act", index=3), Neuron(layer=1, site="attn.v", index=16)]
    with pytest.raises(NeuronSetError, match=r"neurons\[1\]\.index: 16 is out of range for attn.v.*\(0-15\)"):
        build_plan(neurons, spec(), layout)


def test_layer_out_of_range(layout):
    with pytest.raises(NeuronSetError, match=r"neurons\[0\]\.layer: 3 is out of range; the model has layers 0-2"):
        build_plan([Neuron(layer=3, site="attn.q", index=0)], spec(), layout)


def test_site_missing_in_architecture():
    gpt2 = ModelLayout.for_model(tiny_model("gpt2"))
    with pytest.raises(NeuronSetError, match=r"neurons\[0\]\.site: site 'mlp.gate' does not exist in gpt2"):
        build_plan([Neuron(layer=0, site="mlp.gate", index=0)], spec(), gpt2)


def test_same_neuron_with_two_lambdas_is_refused(layout):
    neurons = [Neuron(layer=0, site="attn.q", index=2, **{"lambda": 2.0}), Neuron(layer=0, site="attn.q", index=2)]
    with pytest.raises(NeuronSetError, match="listed twice with different lambdas"):
        build_plan(neurons, spec(**{"lambda": 0.0}), layout)


def test_same_neuron_with_same_lambda_is_merged(layout):
    neurons = [Neuron(layer=0, site="attn.q", index=2), Neuron(layer=0, site="attn.q", index=2)]
    plan = build_plan(neurons, spec(), layout)
    assert plan.n_neurons == 1


def test_lambda_precedence_neuron_then_last_override_then_global(layout):
    edit = spec(**{"lambda": 2.0, "overrides": [{"sites": ["attn.v"], "lambda": 0.0},
                                                {"sites": ["attn.v"], "layers": [2], "lambda": 3.0}]})
    neurons = [
        Neuron(layer=0, site="attn.q", index=0),
        Neuron(layer=1, site="attn.v", index=0),
        Neuron(layer=2, site="attn.v", index=0),
        Neuron(layer=2, site="attn.v", index=1, **{"lambda": 0.5}),
    ]
    plan = build_plan(neurons, edit, layout)
    got = {(g.layer, g.site, i): lam for g in plan.groups for i, lam in zip(g.indices, g.lambdas, strict=True)}
    assert got == {(0, "attn.q", 0): 2.0, (1, "attn.v", 0): 0.0, (2, "attn.v", 0): 3.0, (2, "attn.v", 1): 0.5}


def test_groups_are_sorted_by_layer_then_site(layout):
    neurons = [Neuron(layer=2, site="mlp.act", index=1), Neuron(layer=0, site="mlp.act", index=5),
               Neuron(layer=0, site="attn.q", index=9), Neuron(layer=0, site="attn.q", index=1)]
    plan = build_plan(neurons, spec(), layout)
    assert [(g.layer, g.site, g.indices) for g in plan.groups] == [
        (0, "attn.q", [1, 9]), (0, "mlp.act", [5]), (2, "mlp.act", [1])]


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_lambda_is_rejected_at_parse_time(bad):
    with pytest.raises(ValidationError, match="finite"):
        Neuron.model_validate({"layer": 0, "site": "attn.q", "index": 0, "lambda": bad})
    with pytest.raises(ValidationError, match="finite"):
        EditSpec.model_validate({"lambda": bad})
