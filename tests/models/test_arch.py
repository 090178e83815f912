"""The site table: each site of each architecture maps to the weight rows/columns written here by hand."""

from __future__ import annotations

import pytest
import torch

from bakeedit.errors import UnsupportedArchitecture
from bakeedit.models.arch import SITES, ModelLayout, supported_model_types
from bakeedit.models.spec import SHARED_SITES

from tiny_models import probe_ids, tiny_model

# Tiny models: hidden 32, 4 query heads over 2 kv heads (head_dim 8), FFN 48. GPT-2/NeoX have no GQA.
# (arch, site, index) -> (parameter name in block 1, feature axis of the weight, expected channel)
EXPECTED = [
    ("llama", "attn.q", 9, "self_attn.q_proj.weight", 0, 9),
    ("llama", "attn.v", 15, "self_attn.v_proj.weight", 0, 15),
    ("llama", "attn.o_in", 20, "self_attn.o_proj.weight", 1, 20),
    ("llama", "mlp.gate", 40, "mlp.gate_proj.weight", 0, 40),
    ("llama", "mlp.act", 40, "mlp.down_proj.weight", 1, 40),
    ("phi3", "attn.q", 9, "self_attn.qkv_proj.weight", 0, 9),
    ("phi3", "attn.k", 3, "self_attn.qkv_proj.weight", 0, 32 + 3),
    ("phi3", "attn.v", 3, "self_attn.qkv_proj.weight", 0, 32 + 16 + 3),
    ("phi3", "mlp.gate", 5, "mlp.gate_up_proj.weight", 0, 5),
    ("phi3", "mlp.up", 5, "mlp.gate_up_proj.weight", 0, 48 + 5),
    ("gpt2", "attn.q", 9, "attn.c_attn.weight", 1, 9),  # Conv1D: [in, out], output channels are columns
    ("gpt2", "attn.k", 9, "attn.c_attn.weight", 1, 32 + 9),
    ("gpt2", "attn.v", 9, "attn.c_attn.weight", 1, 64 + 9),
    ("gpt2", "attn.o_in", 9, "attn.c_proj.weight", 0, 9),  # input channels are rows
    ("gpt2", "mlp.up", 9, "mlp.c_fc.weight", 1, 9),
    ("gpt2", "mlp.act", 9, "mlp.c_proj.weight", 0, 9),
    # NeoX: query_key_value output is [head0: q(8) k(8) v(8) | head1: ...]; q index 9 = head 1 dim 1.
    ("gpt_neox", "attn.q", 9, "attention.query_key_value.weight", 0, 24 + 1),
    ("gpt_neox", "attn.k", 9, "attention.query_key_value.weight", 0, 24 + 8 + 1),
    ("gpt_neox", "attn.v", 17, "attention.query_key_value.weight", 0, 48 + 16 + 1),
    ("gpt_neox", "mlp.act", 7, "mlp.dense_4h_to_h.weight", 1, 7),
    # Families that are only a data file: phi (phi-like pattern), olmo2/stablelm/cohere (llama-like).
    ("phi", "attn.q", 9, "self_attn.q_proj.weight", 0, 9),
    ("phi", "attn.o_in", 20, "self_attn.dense.weight", 1, 20),
    ("phi", "mlp.up", 40, "mlp.fc1.weight", 0, 40),
    ("phi", "mlp.act", 40, "mlp.fc2.weight", 1, 40),
    ("olmo2", "attn.k", 11, "self_attn.k_proj.weight", 0, 11),
    ("stablelm", "attn.v", 3, "self_attn.v_proj.weight", 0, 3),
    ("cohere", "mlp.up", 7, "mlp.up_proj.weight", 0, 7),
]


@pytest.mark.parametrize(("arch_name", "site", "index", "param", "axis", "channel"), EXPECTED)
def test_fold_touches_exactly_the_expected_weight_slice(arch_name, site, index, param, axis, channel):
    from bakeedit.edit import build_plan, fold_plan
    from bakeedit.neurons import Neuron
    from bakeedit.recipe import EditSpec

    model = tiny_model(arch_name)
    layout = ModelLayout.for_model(model)
    block = layout.blocks(model)[1]
    before = {n: p.detach().clone() for n, p in block.named_parameters()}
    plan = build_plan([Neuron(layer=1, site=site, index=index)], EditSpec.model_validate({"lambda": 3.0}), layout)
    fold_plan(model, layout, plan)
    after = dict(block.named_parameters())
    for name, old in before.items():
        new = after[name].detach()
        if name == param:
            changed = (new != old).nonzero()[:, axis].unique().tolist()
            assert changed == [channel], f"{name}: changed {changed}, expected [{channel}]"
            sl = [slice(None)] * old.dim()
            sl[axis] = channel
            torch.testing.assert_close(new[tuple(sl)], 3.0 * old[tuple(sl)])
        elif name == param.replace(".weight", ".bias") and axis == (1 if arch_name == "gpt2" else 0):
            assert (new != old).nonzero().flatten().tolist() == [channel]  # output-channel bias scaled too
        else:
            assert torch.equal(new, old), f"{name} changed but should not"


def test_qwen2_qkv_bias_is_scaled_with_the_row():
    from bakeedit.edit import build_plan, fold_plan
    from bakeedit.neurons import Neuron
    from bakeedit.recipe import EditSpec

    model = tiny_model("qwen2")
    layout = ModelLayout.for_model(model)
    v = layout.module(model, 2, "attn.v")
    bias = v.bias.detach().clone()
    plan = build_plan([Neuron(layer=2, site="attn.v", index=4)], EditSpec.model_validate({"lambda": 0.5}), layout)
    fold_plan(model, layout, plan)
    assert v.bias[4].item() == pytest.approx(0.5 * bias[4].item())
    assert torch.equal(v.bias[torch.arange(16) != 4], bias[torch.arange(16) != 4])


def test_sizes_follow_gqa():
    layout = ModelLayout.for_model(tiny_model("llama"))
    assert layout.site_size("attn.q") == 32
    assert layout.site_size("attn.k") == layout.site_size("attn.v") == 16
    assert layout.site_size("mlp.act") == 48
    assert "shared by query heads 2-3" in layout.describe_channel("attn.v", 9)


def test_every_site_of_llama_family_is_supported():
    assert ModelLayout.for_model(tiny_model("mistral")).sites == SITES


def test_gpt2_has_no_gate_site_and_says_what_it_has():
    layout = ModelLayout.for_model(tiny_model("gpt2"))
    with pytest.raises(UnsupportedArchitecture, match="does not exist in gpt2") as info:
        layout.site_size("mlp.gate")
    assert "mlp.act" in info.value.hint


def test_unsupported_architecture_lists_supported_ones():
    from transformers import BertConfig, BertLMHeadModel

    model = BertLMHeadModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=16, vocab_size=50, is_decoder=True))
    with pytest.raises(UnsupportedArchitecture, match="unsupported architecture 'bert'") as info:
        ModelLayout.for_model(model)
    for name in ("llama", "qwen2", "gpt2", "gpt_neox", "phi3", "gemma3_text"):
        assert name in info.value.hint
    assert set(supported_model_types()) >= {"llama", "mistral", "qwen2", "gemma", "gemma2", "gemma3_text", "phi3"}


def _renamed_llama(model_type: str):
    """A tiny Llama whose config claims a model type no architecture file names."""
    model = tiny_model("llama")
    model.config.model_type = model_type
    return model


def test_unknown_type_with_a_known_layout_is_offered_the_pattern_as_a_guess():
    with pytest.raises(UnsupportedArchitecture, match="match the llama-like layout") as info:
        ModelLayout.for_model(_renamed_llama("mystery"))
    assert "arch: llama-like" in info.value.hint


def test_an_explicit_pattern_edits_an_unknown_type_like_its_family():
    from bakeedit.edit import build_plan, fold_plan, runtime_edit
    from bakeedit.neurons import Neuron
    from bakeedit.recipe import EditSpec

    model = _renamed_llama("mystery")
    layout = ModelLayout.for_model(model, arch="llama-like")
    assert layout.spec.model_types == ("mystery",) and layout.spec.pattern is None
    assert layout.module_name(1, "mlp.act") == "model.layers.1.mlp.down_proj"
    ids = probe_ids()
    plan = build_plan([Neuron(layer=1, site="mlp.act", index=5), Neuron(layer=0, site="attn.v", index=2)],
                      EditSpec.model_validate({"lambda": 3.0}), layout)
    with torch.no_grad():
        base = model(ids).logits
        with runtime_edit(model, layout, plan):
            hooked = model(ids).logits
        fold_plan(model, layout, plan)
        folded = model(ids).logits
    assert (hooked - base).abs().max() > 1e-3  # the edit does something
    torch.testing.assert_close(folded, hooked, atol=1e-5, rtol=0)


def test_unknown_arch_name_lists_the_known_tables():
    with pytest.raises(UnsupportedArchitecture, match="unknown architecture 'llama-ish'") as info:
        ModelLayout.for_model(tiny_model("llama"), arch="llama-ish")
    assert "llama-like" in info.value.hint and "phi-like" in info.value.hint


def test_every_family_file_reads_and_claims_its_own_types():
    from bakeedit.models.registry import families, patterns

    names = [spec.name for spec in families()]
    assert len(names) == len(set(names))
    assert {"olmo2", "granite", "stablelm", "cohere", "phi", "smollm3", "qwen2_moe"} <= set(names)
    assert set(patterns()) == {"llama-like", "phi-like"}
    for spec in families():
        assert spec.sites and spec.blocks, spec.source
        assert set(spec.sites) <= set(SITES + SHARED_SITES), spec.source


def test_a_malformed_family_file_is_one_line_naming_the_file():
    from bakeedit.models import registry

    bad = {"name": "broken", "model_types": ["broken"], "pattern": "llama-like", "sites": {"mlp.act": {"module": "x"}}}
    with pytest.raises(UnsupportedArchitecture, match=r"broken.json: sites.mlp.act: give module, axis, size"):
        registry._build(bad, "architectures/broken.json", registry.patterns()["llama-like"])


def test_apply_offers_the_matching_pattern_and_bakes_with_it(tmp_path):
    """OLMo (v1) has no architecture file, but its module names are Llama's: apply refuses with the guess, before
    any weight loads, and with ``model.arch: llama-like`` bakes, verifies and inspects like a known family."""
    from click.testing import CliRunner
    from transformers import AutoModelForCausalLM, OlmoConfig

    from bakeedit.cli import main

    from tiny_models import _COMMON, tiny_tokenizer

    base = tmp_path / "olmo"
    AutoModelForCausalLM.from_config(OlmoConfig(**_COMMON)).save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    neurons = "neurons:\n  - {layer: 0, site: attn.q, index: 3}\n  - {layer: 2, site: mlp.act, index: 7, lambda: 0}\n"
    guess = tmp_path / "guess.yaml"
    guess.write_text(f"name: olmo\nmodel: {base}\n{neurons}")
    refused = CliRunner().invoke(main, ["apply", str(guess), "-o", str(tmp_path / "refused")])
    assert refused.exit_code == 1, refused.output
    assert "unsupported architecture 'olmo'" in refused.stderr and "arch: llama-like" in refused.stderr
    assert not (tmp_path / "refused").exists()

    told = tmp_path / "told.yaml"
    told.write_text(f"name: olmo\nmodel: {{id: {base}, arch: llama-like}}\n{neurons}")
    out = tmp_path / "out"
    baked = CliRunner().invoke(main, ["apply", str(told), "-o", str(out)])
    assert baked.exit_code == 0, baked.output
    assert CliRunner().invoke(main, ["verify", str(out)]).exit_code == 0
    shown = CliRunner().invoke(main, ["inspect", str(out), "--neurons"])
    assert shown.exit_code == 0 and "mlp.act" in shown.stderr


def test_a_gguf_source_is_described_by_its_file_and_quantization(tmp_path):
    """What the card says of a GGUF base: the file, its quantization type (GGUF's general.file_type), de-quantized."""
    import gguf
    import numpy as np

    from bakeedit.models.embedded import gguf_weights_note

    path = tmp_path / "tiny.Q8_0.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert gguf_weights_note(path) == "tiny.Q8_0.gguf (Q8_0, de-quantized to float32)"
