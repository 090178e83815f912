"""Every linear edit exists twice (runtime hooks, folded weights); saved and reloaded with bare transformers,
the folded checkpoint must reproduce the hooked base model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from bakeedit.edit import build_plan, fold_plan, runtime_edit
from bakeedit.errors import EditError
from bakeedit.export.verify import default_tolerance
from bakeedit.models.arch import ModelLayout
from bakeedit.neurons import Neuron
from bakeedit.recipe import EditSpec

from tiny_models import every_site_neurons, probe_ids, tiny_model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_saved_fold_matches_runtime_hooks(arch, dtype, tmp_path):
    model = tiny_model(arch, dtype=dtype)
    layout = ModelLayout.for_model(model)
    plan = build_plan(every_site_neurons(layout), EditSpec(), layout)
    ids = probe_ids(batch=3, seq=12)
    with torch.no_grad():
        base = model(ids).logits.float()
        with runtime_edit(model, layout, plan):
            hooked = model(ids).logits.float()
    assert (hooked - base).abs().max() > 1e-3, "the edit must change the output, or the comparison proves nothing"

    fold_plan(model, layout, plan)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype).eval()
    with torch.no_grad():
        baked = reloaded(ids).logits.float()
    tolerance = default_tolerance(dtype, float(hooked.abs().max()))
    assert (baked - hooked).abs().max() <= tolerance
    if dtype == torch.float32:
        assert tolerance == 1e-4


def test_hooks_are_removed_after_the_block(tiny):
    layout = ModelLayout.for_model(tiny)
    plan = build_plan(every_site_neurons(layout), EditSpec(), layout)
    ids = probe_ids()
    with torch.no_grad():
        before = tiny(ids).logits
        with runtime_edit(tiny, layout, plan):
            pass
        assert torch.equal(tiny(ids).logits, before)


def test_tied_embeddings_are_left_alone(tmp_path):
    model = tiny_model("gemma3_text")  # ties lm_head to the embedding
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    embed = model.get_input_embeddings().weight.detach().clone()
    layout = ModelLayout.for_model(model)
    fold_plan(model, layout, build_plan(every_site_neurons(layout), EditSpec(), layout))
    assert torch.equal(model.get_input_embeddings().weight, embed)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.get_input_embeddings().weight.data_ptr()


def test_fold_refuses_a_weight_shared_with_another_parameter():
    model = tiny_model("llama")
    layout = ModelLayout.for_model(model)
    # Tie layer 1's down projection to layer 0's: folding into one would silently edit the other.
    layout.blocks(model)[1].mlp.down_proj.weight = layout.blocks(model)[0].mlp.down_proj.weight
    plan = build_plan([Neuron(layer=0, site="mlp.act", index=1)], EditSpec(), layout)
    with pytest.raises(EditError, match="shares its storage"):
        fold_plan(model, layout, plan)


def test_lambda_one_leaves_weights_bit_identical():
    model = tiny_model("phi3", dtype=torch.bfloat16)
    layout = ModelLayout.for_model(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    neurons = [Neuron(layer=0, site="attn.k", index=3, **{"lambda": 1.0})]
    fold_plan(model, layout, build_plan(neurons, EditSpec(), layout))
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name


def _masked_plan(layout):
    return build_plan([Neuron(layer=1, site="mlp.act", index=i, **{"lambda": 0.0}) for i in (2, 7)], EditSpec(), layout)


def test_fold_refuses_a_model_on_the_meta_device():
    """Weights on the meta device (as accelerate leaves offloaded ones) hold nothing to fold into, and all share
    ``data_ptr()`` 0: the refusal must come before the aliasing check, and point at the streaming bake."""
    from tiny_models import CONFIGS

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(CONFIGS["llama"])
    layout = ModelLayout.for_model(model)
    with pytest.raises(EditError, match=r"offloaded model .*meta device.*use the streaming bake .*without --in-memory"):
        fold_plan(model, layout, _masked_plan(layout))


def test_fold_refuses_an_accelerate_offloaded_model():
    accelerate = pytest.importorskip("accelerate")
    model = tiny_model("llama")
    layout = ModelLayout.for_model(model)
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    assert layout.blocks(model)[1].mlp.down_proj.weight.device.type == "meta"
    with pytest.raises(EditError, match="use the streaming bake"):
        fold_plan(model, layout, _masked_plan(layout))


def test_fold_refuses_a_device_map_with_disk_offload(tmp_path):
    pytest.importorskip("accelerate")
    tiny_model("llama").save_pretrained(tmp_path / "base")
    device_map = {"model.embed_tokens": "cpu", "model.layers": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu",
                  "lm_head": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", device_map=device_map,
                                                 offload_folder=tmp_path / "offload")
    assert model.hf_device_map["model.layers"] == "disk"
    layout = ModelLayout.for_model(model)
    with pytest.raises(EditError, match=r"offloaded model .*use the streaming bake"):
        fold_plan(model, layout, _masked_plan(layout))
