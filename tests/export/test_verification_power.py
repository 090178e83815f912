"""Verification that can fail: the logit leg must have the power to see the edit, and the exact leg must find the
fold of the base's own tensors in the saved files (docs/verification.md).

The "unfolded" checkpoint of these tests is the base folder copied as it is, as if the fold had written nothing:
for three masked ``mlp.act`` neurons its logits differ from the hooked model's by the edit's effect, which in
bf16 is below the dtype bound (2^-4 x max |logit|), so the bound alone passed it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from bakeedit.edit import build_plan, fold_plan
from bakeedit.export.verify import (
    NOT_APPLICABLE,
    ExactCheck,
    compare_logits,
    conclude,
    fold_exact_check,
    power_status,
    probe_inputs,
)
from bakeedit.models.arch import ModelLayout
from bakeedit.models.load import load_model
from bakeedit.models.reference import ModelSpec
from bakeedit.neurons import Neuron
from bakeedit.recipe import EditSpec
from bakeedit.workflows.apply import take_probe, verify_against_runtime

from tiny_models import CONFIGS, save_tiny_checkpoint, tiny_tokenizer

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
RECORDED = {"bf16": "bfloat16", "fp16": "float16"}  # how bakeedit.json spells them
#: The tensor each family's ``mlp.act`` neurons of layer 1 are folded into (its columns; GPT-2's Conv1D: rows).
EDITED = {"gpt2": "transformer.h.1.mlp.c_proj.weight", "llama": "model.layers.1.mlp.down_proj.weight"}


def masked(lam: float = 0.0) -> list[Neuron]:
    return [Neuron(layer=1, site="mlp.act", index=i, **{"lambda": lam}) for i in (2, 7, 11)]


def correct_bake(base: Path, out: Path, neurons: list[Neuron], dtype: torch.dtype) -> Path:
    """Fold in the stored dtype and save with plain transformers: what either bake path must produce."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).eval()
    layout = ModelLayout.for_model(model)
    fold_plan(model, layout, build_plan(neurons, EditSpec(), layout))
    model.save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    return out


def verify(base: Path, folder: Path, neurons: list[Neuron], stored: torch.dtype, runtime: str = "auto"):
    loaded = load_model(ModelSpec(id=str(base), dtype=runtime))
    plan = build_plan(neurons, EditSpec(), loaded.layout)
    result, _ = verify_against_runtime(take_probe(loaded, plan, None), folder, loaded, plan, None, stored,
                                       "in-memory")
    return result


@pytest.fixture(params=["gpt2", "llama"])
def family(request) -> str:
    return request.param


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_unfolded_checkpoint_fails_both_legs(tmp_path, family, dtype_name):
    dtype = DTYPES[dtype_name]
    base = save_tiny_checkpoint(family, tmp_path / "base", dtype=dtype)
    unfolded = Path(shutil.copytree(base, tmp_path / "unfolded"))
    result = verify(base, unfolded, masked(), dtype)  # the model runs in float32 on CPU
    assert not result.passed
    assert result.power == "failed" and result.max_abs_logit_delta == result.edit_effect > 0
    assert result.exact == "failed" and result.exact_mismatched == [EDITED[family]]
    if dtype == torch.bfloat16:
        assert result.within_tolerance, "the bf16 bound alone passes this checkpoint: the bug the power rule fixes"
    assert any("1/4 of the edit's own effect" in r for r in result.failures())


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_correct_bake_passes_both_legs(tmp_path, family, dtype_name):
    dtype = DTYPES[dtype_name]
    base = save_tiny_checkpoint(family, tmp_path / "base", dtype=dtype)
    for lam in (0.0, 2.5):
        baked = correct_bake(base, tmp_path / f"baked-{lam}", masked(lam), dtype)
        result = verify(base, baked, masked(lam), dtype)
        assert result.passed, result
        assert result.power == "passed" and result.exact == "passed" and result.exact_mismatched == []
        assert result.runtime_dtype == "float32" and result.dtype == RECORDED[dtype_name]


def test_in_a_reduced_precision_runtime_the_exact_leg_decides(tmp_path, family):
    """Run in bf16, the logits themselves are rounded to 8 bits: three masked neurons are within that noise, so the
    power rule does not apply, and the exact leg alone tells the bake from the unedited base."""
    base = save_tiny_checkpoint(family, tmp_path / "base", dtype=torch.bfloat16)
    good = verify(base, correct_bake(base, tmp_path / "baked", masked(), torch.bfloat16), masked(), torch.bfloat16,
                  runtime="bfloat16")
    assert good.passed and good.power == NOT_APPLICABLE and good.exact == "passed"
    assert good.edit_effect <= good.power_floor
    bad = verify(base, Path(shutil.copytree(base, tmp_path / "unfolded")), masked(), torch.bfloat16,
                 runtime="bfloat16")
    assert not bad.passed and bad.exact == "failed"


def test_an_edit_without_effect_is_decided_by_the_exact_leg(tmp_path):
    """lambda 1 everywhere: hooked == base, so no logit comparison can see anything; the copy of the base *is*
    the fold then, and any changed byte is still found."""
    base = save_tiny_checkpoint("llama", tmp_path / "base", dtype=torch.bfloat16)
    copy = Path(shutil.copytree(base, tmp_path / "copy"))
    result = verify(base, copy, masked(1.0), torch.bfloat16)
    assert result.edit_effect == 0.0 and result.power == NOT_APPLICABLE
    assert result.passed and result.exact == "passed"

    from safetensors.torch import load_file, save_file

    weights = load_file(copy / "model.safetensors")
    weights["model.norm.weight"][0] = -weights["model.norm.weight"][0] + 1  # untouched by the plan, yet changed
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    tampered = verify(base, copy, masked(1.0), torch.bfloat16)
    assert not tampered.passed and tampered.exact_mismatched == ["model.norm.weight"]


def test_power_rule_and_conclusion():
    assert power_status(effect=0.0, delta=0.0, floor=0.0) == NOT_APPLICABLE
    assert power_status(effect=1.0, delta=0.25, floor=0.1) == "failed"  # a quarter is not "below a quarter"
    assert power_status(effect=1.0, delta=0.125, floor=0.1) == "passed"
    assert power_status(effect=0.1, delta=0.0, floor=0.1) == NOT_APPLICABLE

    reference, base = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.0]])
    unfolded = compare_logits(reference, base, torch.bfloat16, None, 1, "d", base=base, runtime_dtype=torch.float32)
    assert unfolded.within_tolerance is False and unfolded.power == "failed" and unfolded.edit_effect == 0.5
    same = compare_logits(reference, reference, torch.float32, None, 1, "d", base=reference)
    assert same.power == NOT_APPLICABLE and same.passed  # the logit leg alone does not fail it...
    assert not conclude(same, ExactCheck("not run", note="no safetensors")).passed  # ...but nothing proved it
    assert conclude(same, ExactCheck("passed", 3)).passed
    assert not conclude(same, ExactCheck("passed", 3, decisive=False)).passed  # a custom module is no weight
    assert any("nothing showed" in r for r in conclude(same, ExactCheck("not run", note="x")).failures())


def test_exact_leg_maps_short_base_names_to_the_saved_ones(tmp_path):
    """GPT-2 on the Hub stores ``h.0...``; save_pretrained writes ``transformer.h.0...``: the names are matched, and
    every tensor is still compared."""
    from safetensors.torch import load_file, save_file

    base = save_tiny_checkpoint("gpt2", tmp_path / "base", dtype=torch.bfloat16)
    state = load_file(base / "model.safetensors")
    save_file({k.removeprefix("transformer."): v for k, v in state.items()}, base / "model.safetensors",
              metadata={"format": "pt"})
    baked = correct_bake(base, tmp_path / "baked", masked(2.5), torch.bfloat16)
    loaded = load_model(ModelSpec(id=str(base)))
    check = fold_exact_check(base, baked, loaded.layout, build_plan(masked(2.5), EditSpec(), loaded.layout))
    assert check.status == "passed" and check.compared == len(load_file(baked / "model.safetensors"))


def test_probing_leaves_the_tokenizer_as_it_was():
    tok = tiny_tokenizer()
    tok.pad_token = None
    side = tok.padding_side
    prompts = ["a", "a longer prompt"]
    inputs = probe_inputs(tok, prompts, CONFIGS["llama"])
    assert tok.pad_token is None and tok.padding_side == side
    for row, prompt in enumerate(prompts):  # right-padded: each prompt's own ids first, then masked padding
        ids = tok(prompt)["input_ids"]
        assert inputs["input_ids"][row, : len(ids)].tolist() == ids
        padding = inputs["input_ids"].shape[1] - len(ids)
        assert inputs["attention_mask"][row].tolist() == [1] * len(ids) + [0] * padding
