"""Mixture-of-experts sites (Qwen2-MoE): routed experts ``mlp.experts.E.{gate,up,act}`` and the shared expert.

transformers 5 fuses a block's experts into 3D parameters and runs them with ``grouped_mm``; bakeedit reaches one
expert's channels by swapping in a per-expert loop (``models/expert_hooks.py``). These tests pin that loop to the
model's own forward, the hooked edit to a direct edit of the weights written out here by hand, and the bake
(in memory and streamed per-expert tensors) through the CLI.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from bakeedit.cli import main
from bakeedit.edit import build_plan, runtime_edit
from bakeedit.errors import NeuronSetError, UnsupportedArchitecture
from bakeedit.models.arch import ModelLayout
from bakeedit.models.hookpoints import site_hooks
from bakeedit.neurons import Neuron
from bakeedit.recipe import EditSpec

from tiny_models import probe_ids, save_tiny_checkpoint, tiny_model


@pytest.fixture
def moe():
    return tiny_model("qwen2_moe")


def test_layout_lists_shared_sites_and_addresses_every_expert(moe):
    layout = ModelLayout.for_model(moe)
    assert layout.sites == ("attn.q", "attn.k", "attn.v", "attn.o_in", "mlp.shared.gate", "mlp.shared.up",
                            "mlp.shared.act")
    assert layout.dims.n_experts == 4 and layout.site_size("mlp.experts.3.act") == 24
    assert layout.site_size("mlp.shared.act") == 40
    assert len(layout.expert_sites()) == 12
    assert layout.weight_name(1, "mlp.experts.2.up") == "model.layers.1.mlp.experts.gate_up_proj"
    assert layout.weight_name(1, "mlp.experts.2.up", stored=True) == "model.layers.1.mlp.experts.2.up_proj.weight"
    with pytest.raises(UnsupportedArchitecture, match="4 experts per block"):
        layout.site_size("mlp.experts.4.act")
    with pytest.raises(UnsupportedArchitecture, match="does not exist in qwen2_moe"):
        layout.site_size("mlp.act")  # no dense MLP: mlp.gate is the router there


def test_the_per_expert_loop_computes_the_models_own_forward(moe):
    """With a site function that changes nothing installed, the loop replaces the fused kernel: same logits."""
    layout = ModelLayout.for_model(moe)
    ids = probe_ids(batch=3, seq=10)
    calls = []
    with torch.no_grad():
        native = moe(ids).logits
        with site_hooks(moe, layout, {(layer, "mlp.experts.1.act"): lambda a: calls.append(a.shape) or None
                                      for layer in range(layout.n_layers)}):
            looped = moe(ids).logits
        after = moe(ids).logits
    assert calls, "the loop must have run"
    torch.testing.assert_close(looped, native, atol=1e-5, rtol=0)
    assert torch.equal(after, native)  # the fused forward is back
    assert "forward" not in vars(layout.module(moe, 0, "mlp.experts.1.act"))


@pytest.mark.parametrize(("site", "param", "index"), [
    ("mlp.experts.2.act", "down_proj", 5),
    ("mlp.experts.0.gate", "gate_up_proj", 7),
    ("mlp.experts.3.up", "gate_up_proj", 11),
])
def test_a_hooked_expert_edit_equals_editing_that_experts_weights_by_hand(site, param, index):
    hooked_model, manual = tiny_model("qwen2_moe"), tiny_model("qwen2_moe")
    layout = ModelLayout.for_model(hooked_model)
    layer, lam = 1, 2.5
    plan = build_plan([Neuron(layer=layer, site=site, index=index)], EditSpec.model_validate({"lambda": lam}),
                      layout)
    expert = int(site.split(".")[2])
    weights = getattr(manual.model.layers[layer].mlp.experts, param)
    with torch.no_grad():  # the reference: the raw tensor, rows [gate | up] of gate_up_proj, columns of down_proj
        if site.endswith(".act"):
            weights[expert, :, index] *= lam
        else:
            row = index + (24 if site.endswith(".up") else 0)
            weights[expert, row, :] *= lam
    ids = probe_ids(batch=3, seq=10)
    with torch.no_grad():
        base = hooked_model(ids).logits
        with runtime_edit(hooked_model, layout, plan):
            hooked = hooked_model(ids).logits
        expected = manual(ids).logits
    assert (hooked - base).abs().max() > 1e-4, "the expert must be routed to and the edit must matter"
    torch.testing.assert_close(hooked, expected, atol=1e-5, rtol=0)


def test_position_scoped_edits_of_a_routed_expert_are_refused(moe):
    layout = ModelLayout.for_model(moe)
    with pytest.raises(NeuronSetError, match="routed expert"):
        build_plan([Neuron(layer=0, site="mlp.experts.1.act", index=2)],
                   EditSpec.model_validate({"lambda": 2.0, "positions": "last"}), layout)
    build_plan([Neuron(layer=0, site="mlp.shared.act", index=2)],
               EditSpec.model_validate({"lambda": 2.0, "positions": "last"}), layout)  # the shared expert may


MOE_NEURONS = """neurons:
  - {layer: 0, site: mlp.experts.1.act, index: 3}
  - {layer: 1, site: mlp.experts.3.gate, index: 5, lambda: 0}
  - {layer: 2, site: mlp.experts.0.up, index: 20, lambda: 0.5}
  - {layer: 1, site: mlp.shared.act, index: 30}
  - {layer: 2, site: attn.v, index: 4}
"""


@pytest.mark.parametrize("path", ["stream", "in-memory"])
def test_apply_bakes_and_verifies_expert_edits(tmp_path, path):
    base = save_tiny_checkpoint("qwen2_moe", tmp_path / "base")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: moe\nmodel: {base}\nedit: {{lambda: 2.5}}\n{MOE_NEURONS}")
    args = ["apply", str(recipe), "-o", str(tmp_path / "out")] + (["--in-memory"] if path == "in-memory" else [])
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    prov = json.loads((tmp_path / "out" / "bakeedit.json").read_text())
    assert prov["verification"]["passed"] and prov["verification"]["max_abs_logit_delta"] <= 1e-4
    assert "model.layers.0.mlp.experts.1.down_proj.weight" in prov["folded_tensors"]
    baked = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    original = AutoModelForCausalLM.from_pretrained(base).eval()
    fused = baked.model.layers[1].mlp.experts.gate_up_proj
    assert torch.equal(fused[3, 5], torch.zeros_like(fused[3, 5]))  # expert 3's gate row 5 masked
    untouched = original.model.layers[1].mlp.experts.gate_up_proj
    assert torch.equal(fused[[0, 1, 2]], untouched[[0, 1, 2]])  # other experts bit-identical


def test_a_position_scoped_edit_of_a_moe_model_is_refused_before_any_work(tmp_path):
    """A custom module under ``bakeedit_qwen2_moe`` would load its experts uninitialised (transformers fuses the
    per-expert tensors only for its own model_type): refused at plan time, naming the alternative."""
    base = save_tiny_checkpoint("qwen2_moe", tmp_path / "base")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: moe\nmodel: {base}\nedit: {{lambda: 2.5, positions: last}}\n"
                      "neurons:\n  - {layer: 0, site: attn.q, index: 3}\n")
    result = CliRunner().invoke(main, ["apply", str(recipe), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1, result.output
    assert "mixture of experts" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
