"""Disturbance (mean KL from the base on neutral text) and the matched control built on it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bakeedit.edit import build_plan
from bakeedit.evaluate.disturbance import Disturbance, neutral_texts
from bakeedit.locate.random import random_like
from bakeedit.models.arch import ModelLayout
from bakeedit.neurons import Neuron, NeuronSet
from bakeedit.recipe import EditSpec
from bakeedit.workflows.apply_eval import control_matching, with_plan_lambdas
from bakeedit.workflows.matched_control import match_control, scaled_plan

from tiny_models import tiny_model, tiny_tokenizer

TEXTS = ["Water boils at one hundred degrees.", "The bridge is old.", "Two plus two is four, and three is odd."]


@pytest.fixture
def llama():
    model = tiny_model("llama")
    return model, ModelLayout.for_model(model)


def _plan(layout, neurons, lam):
    return build_plan(neurons, EditSpec.model_validate({"lambda": lam}), layout)


def test_kl_is_the_mean_over_real_positions_of_a_hand_computed_kl(llama):
    model, layout = llama
    tok = tiny_tokenizer()
    measure = Disturbance(model, layout, tok, TEXTS, batch_size=2)
    plan = _plan(layout, [Neuron(layer=1, site="mlp.act", index=4), Neuron(layer=0, site="attn.v", index=3)], 0.0)
    expected, n = 0.0, 0
    with torch.no_grad():
        for text in TEXTS:  # one unpadded sequence at a time, the edit written out as a plain weight change
            ids = torch.tensor([tok(text)["input_ids"]])
            base = torch.log_softmax(model(ids).logits[0].float(), -1)
            edited_model = tiny_model("llama")
            edited_model.model.layers[1].mlp.down_proj.weight[:, 4] = 0
            edited_model.model.layers[0].self_attn.v_proj.weight[3] = 0
            edited = torch.log_softmax(edited_model(ids).logits[0].float(), -1)
            expected += float((base.exp() * (base - edited)).sum())
            n += ids.shape[1]
    assert measure.n_positions == n
    assert measure.kl(plan) == pytest.approx(expected / n, rel=1e-4)
    assert measure.kl(_plan(layout, [Neuron(layer=1, site="mlp.act", index=4)], 1.0)) == pytest.approx(0, abs=1e-7)


def test_the_shipped_neutral_text_mentions_no_people():
    texts = neutral_texts()
    assert len(texts) >= 40
    words = {w.strip(".,:;").lower() for t in texts for w in t.split()}
    assert not words & {"he", "she", "his", "her", "him", "man", "woman", "men", "women", "people", "person"}


def test_matched_control_disturbs_as_much_as_the_edit(llama):
    model, layout = llama
    measure = Disturbance(model, layout, tiny_tokenizer(), TEXTS)
    located = NeuronSet(method="explicit", neurons=[Neuron(layer=layer, site="mlp.act", index=i)
                                                    for layer in range(3) for i in (1, 5, 9, 13)])
    edit = EditSpec.model_validate({"lambda": 3.0})
    edit_plan = build_plan(located.neurons, edit, layout)
    control = random_like(located, layout, seed=0)
    matched = match_control(measure, edit_plan, control, build_plan(control.neurons, edit, layout))
    assert matched.matched
    assert matched.kl_control == pytest.approx(matched.kl_edit, rel=0.05)
    assert matched.kl_control == pytest.approx(measure.kl(matched.plan), rel=1e-9)  # the plan reported is the one
    assert [g.lambdas for g in matched.plan.groups] == [[1 + matched.scale * 2.0] * len(g.indices)
                                                        for g in matched.plan.groups]
    assert {(n.layer, n.site) for n in matched.neurons.neurons} == {(n.layer, n.site) for n in located.neurons}


def test_scaled_plan_moves_every_lambda_towards_or_away_from_one(llama):
    _, layout = llama
    plan = _plan(layout, [Neuron(layer=0, site="attn.q", index=1), Neuron(layer=2, site="mlp.up", index=3)], 0.0)
    assert [g.lambdas for g in scaled_plan(plan, 0.5).groups] == [[0.5], [0.5]]
    assert [g.lambdas for g in scaled_plan(plan, 2.0).groups] == [[-1.0], [-1.0]]
    assert scaled_plan(plan, 1.0) == plan


def test_a_position_scoped_edit_gets_a_kl_matched_control(llama):
    """KnowBias's last-position edit has no folded part: its control's lambdas must still be scaled (a matcher that
    scales only ``groups`` returns t = 1 and a control of another strength)."""
    model, layout = llama
    measure = Disturbance(model, layout, tiny_tokenizer(), TEXTS)
    located = NeuronSet(method="explicit", neurons=[Neuron(layer=layer, site="mlp.act", index=i)
                                                    for layer in range(3) for i in (1, 5, 9, 13)])
    edit = EditSpec.model_validate({"lambda": 3.0, "positions": "last"})
    # the edit at lambda 9: its control, starting from lambda 3, must be scaled well away from t = 1 to match it
    edit_plan = build_plan(located.neurons, EditSpec.model_validate({"lambda": 9.0, "positions": "last"}), layout)
    control = random_like(located, layout, seed=0)
    control_plan = build_plan(control.neurons, edit, layout)
    assert not control_plan.groups and control_plan.module_groups  # nothing folds: all of it is position-scoped
    matched = match_control(measure, edit_plan, control, control_plan)
    assert matched.scalable and matched.matched
    assert matched.scale > 1.5 and matched.kl_same_lambda < 0.5 * matched.kl_edit
    assert matched.kl_control == pytest.approx(matched.kl_edit, rel=0.05)
    assert matched.kl_control == pytest.approx(measure.kl(matched.plan), rel=1e-9)
    assert all(g.positions == "last" and g.params["lambda"] == [1 + matched.scale * 2.0] * len(g.indices)
               for g in matched.plan.module_groups)
    # the control set written beside the report rebuilds the scaled plan exactly
    rebuilt = build_plan(with_plan_lambdas(control, matched.plan).neurons, edit, layout)
    assert rebuilt.module_groups == matched.plan.module_groups


def test_a_nonlinear_control_is_reported_as_not_scalable(llama):
    model, layout = llama
    measure = Disturbance(model, layout, tiny_tokenizer(), TEXTS)
    located = NeuronSet(method="explicit", neurons=[Neuron(layer=1, site="mlp.act", index=i) for i in (2, 6)])
    edit = EditSpec.model_validate({"type": "nonlinear", "map": "tanh_gain", "params": {"alpha": 1.5, "s": 0.5}})
    control = random_like(located, layout, seed=0)
    control_plan = build_plan(control.neurons, edit, layout)
    matched = match_control(measure, build_plan(located.neurons, edit, layout), control, control_plan)
    assert not matched.scalable and matched.scale == 1.0 and matched.plan == control_plan
    assert matched.matched == (abs(matched.kl_control - matched.kl_edit) <= 0.05 * matched.kl_edit)
    assert "not KL-matched" in control_matching(matched) or matched.matched
    # a nonlinear control that lands within the tolerance says it did so by chance, never that it was matched
    for close in (True, False):
        text = control_matching(dataclasses.replace(matched, matched=close))
        assert ("by chance" in text) == close and ("not KL-matched" in text) != close
        assert "so the control is KL-matched" not in text


def test_scaled_plan_moves_position_scoped_lambdas_and_keeps_nonlinear_maps(llama):
    _, layout = llama
    edit = EditSpec.model_validate({"lambda": 0.0, "positions": "last", "overrides": [
        {"layers": [2], "type": "nonlinear", "map": "tanh_gain", "params": {"alpha": 1.5, "s": 0.5}}]})
    plan = build_plan([Neuron(layer=0, site="mlp.act", index=1), Neuron(layer=2, site="mlp.act", index=3)], edit,
                      layout)
    scaled = scaled_plan(plan, 0.5)
    assert [(g.map, g.params) for g in scaled.module_groups] == [
        ("scale", {"lambda": [0.5]}), ("tanh_gain", plan.module_groups[1].params)]


def test_a_control_that_cannot_reach_the_edit_stops_at_the_largest_scale_and_says_so(llama):
    """Random channels far weaker than the located ones (KnowBias's on Gemma-3-270M): no t up to MAX_SCALE reaches
    the edit's KL; the closest (t = MAX_SCALE, not beyond it) is kept and reported as not matched."""
    from bakeedit.workflows.matched_control import MAX_SCALE

    model, layout = llama
    measure = Disturbance(model, layout, tiny_tokenizer(), TEXTS)
    strong = [Neuron(layer=layer, site="mlp.act", index=i) for layer in range(3) for i in range(12)]
    edit_plan = _plan(layout, strong, -3.0)
    weak = NeuronSet(method="explicit", neurons=[Neuron(layer=2, site="mlp.act", index=0)])
    matched = match_control(measure, edit_plan, weak, _plan(layout, weak.neurons, 1.0001))
    assert not matched.matched and matched.scalable
    assert matched.scale == MAX_SCALE and matched.kl_control < 0.5 * matched.kl_edit
    assert "the closest reachable: not KL-matched" in control_matching(matched)
