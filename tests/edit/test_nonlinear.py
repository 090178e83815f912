"""Response maps, their routing (linear -> fold, the rest -> module), position scopes and the recipe schema."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from bakeedit.edit import build_plan, runtime_edit
from bakeedit.edit.nonlinear import POSITIONS_ATTR, attached_positions, token_positions
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


R, P = True, False  # readable rows of `last` below: R = the last real token of its sequence, P = not


@pytest.mark.parametrize(("past", "mask", "position_ids", "index", "last"), [
    # one unpadded row, no cache: indices 0.., the last column is last
    (0, None, None, [[0, 1, 2, 3]], [[P, P, P, R]]),
    # a decoding step: one new token after 7 cached ones
    (7, None, None, [[7]], [[R]]),
    # right padding: the last real token, not the last column; indices count real tokens only
    (0, [[1, 1, 1, 1], [1, 1, 0, 0]], None, [[0, 1, 2, 3], [0, 1, 1, 1]], [[P, P, P, R], [P, R, P, P]]),
    # left padding, mask over the cache and the new token: the index skips the row's padding
    (3, [[1, 1, 1, 1], [0, 0, 1, 1]], None, [[3], [1]], [[R], [R]]),
    # position ids win over the mask (generate() passes both; padding gets 0 there)
    (0, [[0, 1, 1]], [[0, 0, 1]], [[0, 0, 1]], [[P, P, R]]),
    # a packed row (4D mask: ignored): a context of 3, then segments of 2 and 3 that restart at position 3
    (0, torch.ones(1, 1, 8, 8), [[0, 1, 2, 3, 4, 3, 4, 5]], [[0, 1, 2, 3, 4, 3, 4, 5]],
     [[P, P, P, P, R, P, P, R]]),
])
def test_token_positions_count_real_tokens_and_find_each_sequences_last(past, mask, position_ids, index, last):
    mask, position_ids = (None if v is None else torch.as_tensor(v) for v in (mask, position_ids))
    got_index, got_last = token_positions((len(index), len(index[0])), past, mask, position_ids)
    assert got_index.tolist() == index
    assert got_last.tolist() == last


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


#: KnowBias's scale at the last real token plus a nonlinear map from token 3 on: both depend on where a row's real
#: tokens are, which padding must not move.
SCOPED = spec(**{"lambda": 5.0, "positions": "last", "overrides": [
    {"sites": ["attn.v"], "map": "tanh_gain", "params": {"alpha": 2.0, "s": 0.05}, "positions": "all", "start": 3}]})
SCOPED_NEURONS = [Neuron(layer=layer, site=site, index=i) for layer in range(3) for site in ("mlp.gate", "attn.v")
                  for i in range(0, 16, 3)]


def padded(rows: list[list[int]], side: str) -> dict[str, torch.Tensor]:
    """A batch of ``rows`` padded on ``side``; left padding gets the position ids ``generate()`` would give."""
    width = max(map(len, rows))
    ids, mask = torch.zeros(len(rows), width, dtype=torch.long), torch.zeros(len(rows), width, dtype=torch.long)
    for k, row in enumerate(rows):
        cols = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        ids[k, cols], mask[k, cols] = torch.tensor(row), 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if side == "left":
        batch["position_ids"] = (mask.cumsum(1) - 1).clamp(min=0)
    return batch


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_moves_neither_the_last_position_nor_start(llama, side):
    model, layout = llama
    plan = build_plan(SCOPED_NEURONS, SCOPED, layout)
    rows = [probe_ids(batch=1, seq=9, seed=3)[0].tolist(), probe_ids(batch=1, seq=5, seed=4)[0].tolist()]
    batch = padded(rows, side)
    with torch.no_grad():
        base = [model(torch.tensor([row])).logits[0] for row in rows]
        with runtime_edit(model, layout, plan):
            alone = [model(torch.tensor([row])).logits[0] for row in rows]
            together = model(**batch).logits
    for k in range(len(rows)):
        cols = torch.nonzero(batch["attention_mask"][k]).flatten()
        assert torch.allclose(together[k, cols], alone[k], atol=1e-5), k
        assert (alone[k][-1] - base[k][-1]).abs().max() > 1e-2  # the edit does act on each row's last token


@pytest.mark.parametrize("use_cache", [True, False])
def test_left_padded_batched_generation_equals_each_row_alone(llama, use_cache):
    """The prefill edits each row's last prompt token and every step the new token, at real indices."""
    model, layout = llama
    plan = build_plan(SCOPED_NEURONS, SCOPED, layout)
    rows = [probe_ids(batch=1, seq=8, seed=6)[0].tolist(), probe_ids(batch=1, seq=3, seed=7)[0].tolist()]
    batch = {k: v for k, v in padded(rows, "left").items() if k != "position_ids"}
    options = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False, "use_cache": use_cache}
    with torch.no_grad(), runtime_edit(model, layout, plan):
        together = model.generate(**batch, **options)[:, -6:]
        alone = [model.generate(torch.tensor([row]), **options)[0, -6:] for row in rows]
    with torch.no_grad():
        unedited = model.generate(**batch, **options)[:, -6:]
    assert together.tolist() == [a.tolist() for a in alone]
    assert not torch.equal(together, unedited)


def test_runtime_edit_announces_its_position_scopes(llama):
    """The scorer reads ``bakeedit_positions`` to refuse the modes that cannot reproduce a last-position edit."""
    model, layout = llama
    assert attached_positions(model) == frozenset()
    with runtime_edit(model, layout, build_plan(SCOPED_NEURONS, SCOPED, layout)):
        assert attached_positions(model) == {"last", "all"}
        with runtime_edit(model, layout, build_plan(SCOPED_NEURONS[:1], spec(**{"lambda": 2.0}), layout)):
            assert attached_positions(model) == {"last", "all"}  # a folded-only plan adds nothing
    assert not hasattr(model, POSITIONS_ATTR)


def test_a_shared_expert_that_sees_flattened_tokens_gets_each_rows_positions():
    """Qwen2-MoE runs its shared expert on ``[batch * seq, channels]``: each row's last real token and real indices
    still decide, not the flattened order."""
    model = tiny_model("qwen2_moe")
    layout = ModelLayout.for_model(model)
    shared = [Neuron(layer=layer, site=site, index=i) for layer in range(3) for site in ("mlp.shared.gate",
              "mlp.shared.act") for i in range(0, 40, 3)]
    edit = spec(**{"lambda": 8.0, "positions": "last", "overrides": [
        {"sites": ["mlp.shared.act"], "map": "tanh_gain", "params": {"alpha": 2.0, "s": 0.05}, "positions": "all",
         "start": 3}]})
    plan = build_plan(shared, edit, layout)
    assert {g.site for g in plan.module_groups} == {"mlp.shared.gate", "mlp.shared.act"}
    rows = [probe_ids(batch=1, seq=9, seed=3)[0].tolist(), probe_ids(batch=1, seq=5, seed=4)[0].tolist()]
    batch = padded(rows, "right")
    with torch.no_grad():
        base = [model(torch.tensor([row])).logits[0] for row in rows]
        with runtime_edit(model, layout, plan):
            alone = [model(torch.tensor([row])).logits[0] for row in rows]
            together = model(**batch).logits
    for k in range(len(rows)):
        assert torch.allclose(together[k, :len(rows[k])], alone[k], atol=1e-5), k
        assert (alone[k][-1] - base[k][-1]).abs().max() > 1e-2
