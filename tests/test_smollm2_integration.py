"""Integration on the real embedded SmolLM2-135M-Instruct: the quickstart recipe, bf16, the GGUF cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from bakeedit.cli import main
from bakeedit.edit import build_plan, fold_plan, runtime_edit
from bakeedit.export.verify import default_tolerance, probe_inputs, probe_logits
from bakeedit.models import load_model
from bakeedit.neurons import Neuron
from bakeedit.recipe import load_recipe

pytestmark = pytest.mark.slow
QUICKSTART = Path(__file__).parent.parent / "recipes" / "quickstart.yaml"


def test_quickstart_recipe_bakes_a_verified_plain_checkpoint(tmp_path, smollm2):
    out = tmp_path / "quickstart"
    result = CliRunner().invoke(main, ["apply", str(QUICKSTART), "-o", str(out), "--no-eval"])
    assert result.exit_code == 0, result.output
    prov = json.loads((out / "bakeedit.json").read_text())
    assert prov["verification"]["passed"]
    assert prov["base_model"]["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert prov["base_model"]["license"] == "apache-2.0"

    edited = AutoModelForCausalLM.from_pretrained(out).eval()
    inputs = probe_inputs(smollm2.tokenizer, None, smollm2.model.config)
    base_logits = probe_logits(smollm2.model, inputs)
    edited_logits = probe_logits(edited, inputs)
    assert (edited_logits - base_logits).abs().max() > 1e-2, "the quickstart edit must change the model"
    assert edited.config.tie_word_embeddings
    assert torch.equal(edited.get_input_embeddings().weight, smollm2.model.get_input_embeddings().weight)


def test_bf16_fold_stays_within_the_documented_bound(tmp_path):
    lr = load_recipe(QUICKSTART)
    loaded = load_model(lr.recipe.model.model_copy(update={"dtype": "bfloat16"}))
    assert loaded.dtype == torch.bfloat16
    sites = [(20, "mlp.act", 11), (22, "mlp.act", 1024), (25, "mlp.act", 300), (27, "attn.q", 70), (28, "attn.v", 5)]
    neurons = [Neuron(layer=layer, site=site, index=index, lambda_=1.37)  # 1.37 is not exact in bf16
               for layer, site, index in sites]
    plan = build_plan(neurons, lr.recipe.edit, loaded.layout)
    inputs = probe_inputs(loaded.tokenizer, None, loaded.model.config)
    with runtime_edit(loaded.model, loaded.layout, plan):
        reference = probe_logits(loaded.model, inputs)
    fold_plan(loaded.model, loaded.layout, plan)
    loaded.model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    delta = (probe_logits(reloaded, inputs) - reference).abs().max().item()
    assert delta <= default_tolerance(torch.bfloat16, reference.abs().max().item())


def test_gguf_conversion_is_cached(smollm2):
    from bakeedit.models.embedded import embedded_gguf_path, gguf_to_safetensors

    folder = gguf_to_safetensors(embedded_gguf_path())
    assert folder == smollm2.source.path
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert smollm2.layout.n_layers == 30 and smollm2.layout.site_size("attn.v") == 3 * 64
