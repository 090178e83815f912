"""Response maps, their routing (linear -> fold, the rest -> module), position scopes and the recipe schema."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from bakeedit.edit import build_plan, runtime_edit
from bakeedit.edit.nonlinear import first_position
from bakeedit.errors import EditError, NeuronSetError, RecipeError
from bakeedit.maps import MAPS, apply_map, linear_lambda
from bakeedit.models.arch import ModelLayout
from bakeedit.models.hookpoints import capture_sites
from bakeedit.neurons import Neuron
from bakeedit.recipe import EditSpec, parse_recipe

from tiny_models import probe_ids, tiny_model


@pytest.fixture(scope="module")
def llama():
    model = tiny_model("llama")
    return model, ModelLayout.for_model(model)


def spec(**kw) -> EditSpec:
    return EditSpec.model_validate(kw)


def ones(values: dict[str, float]) -> dict[str, torch.Tensor]:
    return {k: torch.tensor([v]) for k, v in values.items()}


@pytest.mark.parametrize(
    ("map_name", "params", "a", "expected"),
    [
        ("tanh_gain", {"alpha": 2.0, "s": 0.5}, 1.0, 1.0 + 2.0 * math.tanh(2.0)),
        ("tanh_gain", {"alpha": 2.0, "s": 0.5}, -30.0, -32.0),  # saturates: adds at most |alpha|
        ("sigmoid_gain", {"alpha": 3.0, "beta": 4.0, "theta": 0.5}, -2.0, -2.0 * (1 + 3.0 / (1 + math.exp(-6.0)))),
        ("power", {"p": 0.5}, -4.0, -2.0),
        ("power", {"p": 2.0}, 3.0, 9.0),
        ("power", {"p": 0.3}, 0.0, 0.0),
        ("scale", {"lambda": -1.5}, 2.0, -3.0),
    ],
)
def test_maps_compute_their_formula(map_name, params, a, expected):
    out = apply_map(map_name, torch.tensor([[a]]), ones(params))
    assert out.item() == pytest.approx(expected, rel=1e-6)


def test_maps_keep_the_input_dtype_and_compute_in_float32():
    a = torch.tensor([[0.3, -0.7]], dtype=torch.bfloat16)
    out = apply_map("tanh_gain", a, {"alpha": torch.tensor([1.0, 1.0]), "s": torch.tensor([0.1, 0.1])})
    assert out.dtype == torch.bfloat16
    reference = (a.float() + torch.tanh(a.float() / 0.1)).to(torch.bfloat16)
    assert torch.equal(out, reference)


@pytest.mark.parametrize(
    ("map_name", "params", "lam"),
    [
        ("tanh_gain", {"alpha": 0.0, "s": 3.0}, 1.0),
        ("sigmoid_gain", {"alpha": 0.0, "beta": 2.0}, 1.0),
        ("sigmoid_gain", {"alpha": 3.0, "beta": 0.0, "theta": 1.0}, 2.5),
        ("power", {"p": 1.0}, 1.0),
        ("tanh_gain", {"alpha": 1.0}, None),
        ("power", {"p": 1.01}, None),
    ],
)
def test_linear_degenerate_cases_are_recognised(map_name, params, lam):
    assert linear_lambda(map_name, params) == lam
    if lam is not None:  # and they really are that scale
        a = torch.linspace(-3, 3, 13)[None]
        full = {k: torch.tensor([v]) for k, v in (MAPS[map_name].defaults | params).items()}
        assert torch.allclose(apply_map(map_name, a, full), lam * a, atol=1e-6)


def test_linear_cases_fold_and_the_rest_goes_to_the_module(llama):
    _, layout = llama
    neurons = [Neuron(layer=0, site="attn.q", index=1), Neuron(layer=1, site="attn.v", index=2),
               Neuron(layer=2, site="mlp.act", index=3), Neuron(layer=2, site="mlp.up", index=4),
               Neuron(layer=1, site="mlp.act", index=5, **{"lambda": 0.0})]
    edit = spec(type="nonlinear", map="sigmoid_gain", params={"alpha": 2.0, "beta": 3.0},
                overrides=[{"sites": ["attn.v"], "params": {"alpha": 2.0, "beta": 0.0}},  # linear: 1 + 2/2
                           {"sites": ["mlp.up"], "lambda": 1.5},
                           {"sites": ["mlp.act"], "layers": [2], "positions": "last"}])
    plan = build_plan(neurons, edit, layout)
    assert [(g.layer, g.site, g.indices, g.lambdas) for g in plan.groups] == [
        (1, "attn.v", [2], [2.0]), (1, "mlp.act", [5], [0.0]), (2, "mlp.up", [4], [1.5])]
    assert [(g.layer, g.site, g.map, g.positions) for g in plan.module_groups] == [
        (0, "attn.q", "sigmoid_gain", "all"), (2, "mlp.act", "sigmoid_gain", "last")]
    assert plan.module_groups[0].params == {"alpha": [2.0], "beta": [3.0], "theta": [0.0]}  # defaults filled in
    assert plan.kind == "mixed" and plan.edit_form == "mixed" and plan.n_neurons == 5


def test_describe_lists_each_distinct_edit_with_its_value_range(llama):
    _, layout = llama
    neurons = [Neuron(layer=0, site="attn.q", index=i) for i in range(3)] + [
        Neuron(layer=1, site="mlp.gate", index=1), Neuron(layer=2, site="mlp.gate", index=2),
        Neuron(layer=2, site="mlp.act", index=4)]
    edit = spec(type="nonlinear", map="tanh_gain", params={"alpha": -0.25, "s": [0.5, 1.0, 0.5]},
                overrides=[{"sites": ["mlp.gate"], "lambda": 2.0, "positions": "last", "start": 2},
                           {"sites": ["mlp.act"], "lambda": 0.0}])
    assert build_plan(neurons, edit, layout).describe() == [
        "scale(lambda=0) folded", "tanh_gain(alpha=-0.25, s=0.5..1) at all positions",
        "scale(lambda=2) at the last position from token 2"]
    assert build_plan([], spec(), layout).describe() == []


def test_scale_at_last_position_goes_to_the_module_and_all_positions_fold(llama):
    _, layout = llama
    neurons = [Neuron(layer=0, site="mlp.gate", index=1), Neuron(layer=1, site="mlp.gate", index=1)]
    plan = build_plan(neurons, spec(**{"lambda": 2.0, "positions": "last"}), layout)
    assert not plan.groups and plan.edit_form == "custom_module"
    assert [g.params for g in plan.module_groups] == [{"lambda": [2.0]}] * 2
    plan = build_plan(neurons, spec(**{"lambda": 2.0, "start": 3}), layout)
    assert not plan.groups and plan.module_groups[0].start == 3
    assert build_plan(neurons, spec(**{"lambda": 2.0}), layout).edit_form == "folded"


def test_per_neuron_parameter_vectors_follow_the_neuron_order(llama):
    _, layout = llama
    neurons = [Neuron(layer=0, site="attn.q", index=9), Neuron(layer=0, site="attn.q", index=2),
               Neuron(layer=0, site="attn.k", index=1)]
    edit = spec(type="nonlinear", map="power", params={"p": [2.0, 0.5]},
                overrides=[{"sites": ["attn.k"], "map": "tanh_gain", "params": {"alpha": [0.7]}}])
    plan = build_plan(neurons, edit, layout)
    q = next(g for g in plan.module_groups if g.site == "attn.q")
    assert q.indices == [2, 9] and q.params == {"p": [0.5, 2.0]}  # sorted by index, values moved along
    with pytest.raises(EditError, match=r"edit\.params\.p: 3 values, but the rule applies to 2 neuron"):
        build_plan(neurons, edit.model_copy(update={"params": {"p": [2.0, 0.5, 3.0]}}), layout)
    with pytest.raises(EditError, match=r"edit\.params\.p: 1 values for more neurons"):
        build_plan(neurons, edit.model_copy(update={"params": {"p": [2.0]}}), layout)


def test_a_neuron_listed_twice_with_different_edits_is_refused(llama):
    _, layout = llama
    neurons = [Neuron(layer=0, site="attn.q", index=2), Neuron(layer=0, site="attn.q", index=2, **{"lambda": 2.0})]
    with pytest.raises(NeuronSetError, match=r"listed twice with different edits \(tanh_gain\(alpha=1, s=1\)"):
        build_plan(neurons, spec(type="nonlinear", map="tanh_gain"), layout)


def test_map_parameters_out_of_range_are_refused_per_neuron(llama):
    _, layout = llama
    with pytest.raises(ValidationError, match=r"params\.p must be > 0"):
        spec(type="nonlinear", map="power", params={"p": [2.0, -1.0]})
    # a fit grid bypasses the schema (model_copy): the plan builder checks again and names the neuron
    edit = spec(type="nonlinear", map="power").model_copy(update={"params": {"p": [2.0, -1.0]}})
    neurons = [Neuron(layer=0, site="attn.q", index=1), Neuron(layer=0, site="attn.q", index=2)]
    with pytest.raises(EditError, match=r"neurons\[1\] \(edit\): params\.p must be > 0 for power"):
        build_plan(neurons, edit, layout)


RECIPE_ERRORS = [
    ({"type": "nonlinear"}, r"edit: .*type nonlinear needs a 'map'"),
    ({"map": "power"}, r"map 'power' needs type: nonlinear"),
    ({"type": "nonlinear", "map": "tanh"}, r"edit\.map: Input should be 'tanh_gain'"),
    ({"type": "nonlinear", "map": "tanh_gain", "params": {"p": 2}}, r"'p' is not a parameter of tanh_gain"),
    ({"type": "nonlinear", "map": "tanh_gain", "params": {"s": 0}}, r"params\.s must be > 0"),
    ({"type": "nonlinear", "map": "power", "params": {"p": ".nan"}}, r"params\.p must be a finite number"),
    ({"positions": "first"}, r"edit\.positions: Input should be 'all' or 'last'"),
    ({"start": -1}, r"edit\.start: Input should be greater than or equal to 0"),
    ({"overrides": [{"sites": ["attn.q"]}]}, r"an override must set at least one of"),
    ({"overrides": [{"type": "nonlinear"}]}, r"overrides\.0: type nonlinear needs a 'map'"),
    ({"overrides": [{"params": {"alpha": 2}}]}, r"overrides\.0: 'params' belong to a nonlinear map"),
    ({"type": "nonlinear", "map": "power", "overrides": [{"layers": [0], "params": {"alpha": 2}}]},
     r"overrides\.0: 'alpha' is not a parameter of power"),
    ({"type": "nonlinear", "map": "power", "fit": {"grid": {"alpha": [1.0]}}}, r"fit\.grid: alpha is not a parameter"),
    ({"fit": {"grid": {"lambda": []}}}, r"grid\.lambda: give at least one candidate value"),
]


@pytest.mark.parametrize(("edit", "message"), RECIPE_ERRORS)
def test_recipe_errors_name_the_field(edit, message):
    raw = {"name": "x", "model": "embedded", "neurons": [{"layer": 0, "site": "attn.q", "index": 1}], "edit": edit}
    if edit.get("params", {}).get("p") == ".nan":
        edit["params"]["p"] = float("nan")
    with pytest.raises(RecipeError, match=message):
        parse_recipe(raw, "r.yaml")


def test_old_recipes_still_mean_a_folded_scale():
    edit = parse_recipe({"name": "x", "model": "embedded", "neurons": [], "edit": {
        "lambda": 2.5, "overrides": [{"sites": ["attn.v"], "lambda": 0.0}]}}, "r.yaml").edit
    assert edit.rule.type == "scale" and edit.rule.positions == "all" and edit.rule.start == 0
    assert edit.rule_for(Neuron(layer=0, site="attn.v", index=1))[1].lambda_ == 0.0


def test_override_inherits_map_params_and_positions():
    edit = spec(type="nonlinear", map="tanh_gain", params={"alpha": 3.0}, positions="last",
                overrides=[{"layers": [1], "start": 4}, {"sites": ["mlp.act"], "map": "power"}])
    _, r1 = edit.rule_for(Neuron(layer=1, site="attn.q", index=0))
    assert (r1.type, r1.map, r1.params, r1.positions, r1.start) == ("nonlinear", "tanh_gain", {"alpha": 3.0}, "last", 4)
    _, r2 = edit.rule_for(Neuron(layer=0, site="mlp.act", index=0))
    assert (r2.map, r2.params, r2.positions) == ("power", {}, "last")  # params only inherited with the same map


@pytest.mark.parametrize(("seq", "positions", "start", "offset", "first"), [
    (5, "all", 0, 0, 0), (5, "last", 0, 0, 4), (5, "all", 3, 0, 3), (1, "last", 0, 7, 0), (1, "all", 9, 7, 1),
    (5, "last", 9, 0, 5), (1, "all", 3, 7, 0)])
def test_first_position(seq, positions, start, offset, first):
    assert first_position(seq, positions, start, offset) == first


def captured(model, layout, plan, ids, address):
    with torch.no_grad(), runtime_edit(model, layout, plan), capture_sites(model, layout, [address]) as store:
        logits = model(ids).logits
    return store[address], logits


def test_positions_last_and_start_edit_only_those_positions(llama):
    model, layout = llama
    ids = probe_ids(batch=2, seq=9)
    neurons = [Neuron(layer=1, site="attn.q", index=i) for i in range(16)]
    base_act, base_logits = captured(model, layout, build_plan([], spec(), layout), ids, (1, "attn.q"))
    for positions, start, edited in (("last", 0, [8]), ("all", 6, [6, 7, 8]), ("last", 9, [])):
        edit = spec(type="nonlinear", map="tanh_gain", params={"alpha": 1.0, "s": 0.1}, positions=positions,
                    start=start)
        act, logits = captured(model, layout, build_plan(neurons, edit, layout), ids, (1, "attn.q"))
        changed = [t for t in range(9) if not torch.equal(act[:, t], base_act[:, t])]
        assert changed == edited
        untouched = min(edited, default=9)  # causal: positions before the first edit see the base model
        assert torch.equal(logits[:, :untouched], base_logits[:, :untouched])
        if edited:
            assert (logits[:, untouched:] - base_logits[:, untouched:]).abs().amax().item() > 1e-3


def test_start_counts_cached_tokens_under_incremental_decoding(llama):
    """With ``start``, a cached incremental pass must give the same logits as one pass over the whole sequence."""
    model, layout = llama
    ids = probe_ids(batch=1, seq=10)
    neurons = [Neuron(layer=0, site="mlp.act", index=i) for i in range(0, 48, 3)]
    plan = build_plan(neurons, spec(type="nonlinear", map="power", params={"p": 0.5}, start=6), layout)
    with torch.no_grad(), runtime_edit(model, layout, plan):
        whole = model(ids).logits
        out = model(ids[:, :4], use_cache=True)
        steps = [out.logits]
        for t in range(4, 10):
            out = model(ids[:, t:t + 1], cache=out.cache, use_cache=True)
            steps.append(out.logits)
    assert torch.allclose(torch.cat(steps, dim=1), whole, atol=1e-5)
    with torch.no_grad():
        assert (model(ids).logits[:, 6:] - whole[:, 6:]).abs().amax() > 1e-3  # the edit did act from position 6
