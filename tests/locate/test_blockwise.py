"""Blockwise locate: COCO, INE and KnowBias on the lazy model (one block at a time from the shards) find the same
neurons with the same scores as on the in-memory model, for every family; ``locate.execution`` chooses the path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from coco_helpers import write_contrast_file
from test_ine import write_data

import bakeedit.models.lazy as lazy
from bakeedit.cli import main
from bakeedit.errors import UnsupportedArchitecture
from bakeedit.locate import LocateContext, run_locate
from bakeedit.locate.knowbias.ig import integrated_gradients
from bakeedit.models.lazy import is_lazy, lazy_state
from bakeedit.models.load import LoadedModel, load_model
from bakeedit.neurons import NeuronSet
from bakeedit.recipe import LocateSpec

from tiny_models import ARCHS, tiny_model, tiny_tokenizer

QUESTIONS = [("g1", "gender", "causal_rejection", "Is X ok?", "Yes"),
             ("g2", "gender", "bias_recognition", "Is Y bad?", "No"),
             ("r1", "race_ethnicity", "causal_rejection", "Is W ok?", "No"),
             ("r2", "race_ethnicity", "bias_recognition", "Is V bad?", "Yes")]
#: ine's own checks refuse these families (tests/locate/test_ine.py says why); blockwise must refuse them the same way.
INE_REFUSED = {"gemma2": "soft-capping", "gemma3_text": "norms", "olmo2": "cannot tell", "granite": "logits",
               "cohere": "norms", "phi": "norms", "qwen2_moe": "mlp.up"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    write_contrast_file(folder / "contrast.jsonl", per_category=3)
    (folder / "questions.jsonl").write_text("".join(
        json.dumps({"id": i, "dimension": d, "kind": k, "question": q, "answer": a, "split": "locate"}) + "\n"
        for i, d, k, q, a in QUESTIONS))
    write_data(folder / "ine")
    return folder


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """``pair(arch)`` -> (in-memory, blockwise) LoadedModels of one sharded tiny checkpoint (built once per arch)."""
    made: dict[str, tuple[LoadedModel, LoadedModel]] = {}

    def make(arch: str) -> tuple[LoadedModel, LoadedModel]:
        if arch not in made:
            folder = tmp_path_factory.mktemp(arch)
            tiny_model(arch).save_pretrained(folder, max_shard_size="20KB")
            tiny_tokenizer().save_pretrained(folder)
            made[arch] = (load_model(str(folder)), load_model(str(folder), execution="blockwise"))
            assert is_lazy(made[arch][1].model) and not is_lazy(made[arch][0].model)
        return made[arch]

    return make


def assert_same_neurons(memory: NeuronSet, blockwise: NeuronSet) -> None:
    want = {n.address: n.score for n in memory.neurons}
    got = {n.address: n.score for n in blockwise.neurons}
    assert want, "an empty selection would prove nothing"
    assert set(got) == set(want)
    for address, score in want.items():
        assert got[address] == pytest.approx(score, rel=1e-5, abs=1e-7), address


def both(spec: LocateSpec, pair_of: tuple[LoadedModel, LoadedModel], base: Path) -> tuple[NeuronSet, NeuronSet]:
    return tuple(run_locate(spec, loaded, LocateContext(base_dir=base)) for loaded in pair_of)  # type: ignore[return-value]


@pytest.mark.parametrize("arch", ARCHS)
def test_coco_blockwise_equals_in_memory(arch, pair, data):
    spec = LocateSpec(method="coco", prompts=str(data / "contrast.jsonl"), answer_format="raw", top_fraction=0.05,
                      null_permutations=0, batch_size=2)
    assert_same_neurons(*both(spec, pair(arch), data))


@pytest.mark.parametrize("arch", ARCHS)
def test_knowbias_blockwise_equals_in_memory(arch, pair, data):
    """Integrated gradients through the checkpointed lazy blocks (KV-cached prefix, alpha batch broadcast at the
    attributed block) give the in-memory attributions."""
    memory, _ = pair(arch)
    mlp = [s for s in ("mlp.gate", "mlp.act") if s in memory.layout.sites] or ["attn.q"]  # MoE: no dense MLP site
    spec = LocateSpec(method="knowbias", steps=3, sites=[mlp[0], "attn.v"], answer_format="raw", system_prompt="",
                      instruction="", questions=str(data / "questions.jsonl"))
    assert_same_neurons(*both(spec, pair(arch), data))


@pytest.mark.parametrize("arch", ARCHS)
def test_ine_blockwise_equals_in_memory(arch, pair, data):
    """Value scores (weights read outside a forward), query scores (gradients through one recomputed block) and the
    masking trials (lower blocks replayed); families ine refuses are refused with the same message."""
    spec = LocateSpec(method="ine", **write_data(data / "ine"), k=6, candidates=5, group_size=2)
    if arch in INE_REFUSED:
        messages = []
        for loaded in pair(arch):
            with pytest.raises(UnsupportedArchitecture, match=INE_REFUSED[arch]) as refused:
                run_locate(spec, loaded, LocateContext(base_dir=data))
            messages.append(str(refused.value))
        assert messages[0] == messages[1]
        return
    assert_same_neurons(*both(spec, pair(arch), data))


@pytest.mark.parametrize(("arch", "cells"), [
    ("llama", [(0, "mlp.gate"), (1, "attn.v"), (2, "mlp.act")]),
    ("qwen2_moe", [(1, "attn.v"), (2, "attn.q"), (0, "attn.q")]),  # IG attributes no expert site (test_ig.py)
])
def test_ig_backward_recomputes_one_block_at_a_time(arch, cells, pair, monkeypatch):
    """Memory of blockwise IG is one block plus boundary activations: every load (in the forward and in backward's
    recomputation) finds no other unit loaded, and backward does recompute blocks."""
    memory, blockwise = pair(arch)
    tok = memory.tokenizer
    prompt, answer = torch.tensor(tok.encode("Is X ok? A:")), torch.tensor(tok.encode(" Yes"))
    state = lazy_state(blockwise.model)
    phase, loads = ["forward"], []
    state.on_load.append(lambda _u: loads.append((phase[0], sum(u.loaded for u in state.units))))
    grad = torch.autograd.grad

    def flagged(*args, **kwargs):
        phase[0] = "backward"
        try:
            return grad(*args, **kwargs)
        finally:
            phase[0] = "forward"

    monkeypatch.setattr(torch.autograd, "grad", flagged)
    try:
        got = integrated_gradients(blockwise.model, blockwise.layout, prompt, answer, cells, steps=4)
    finally:
        state.on_load.clear()
    want = integrated_gradients(memory.model, memory.layout, prompt, answer, cells, steps=4)
    assert {n for _, n in loads} == {1}
    assert sum(p == "backward" for p, _ in loads) >= len(cells)
    assert got.probability == pytest.approx(want.probability, rel=1e-6)
    for cell in cells:
        torch.testing.assert_close(got.attributions[cell], want.attributions[cell], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------- the CLI and recipe


def coco_recipe(folder: Path, model: Path, execution: str | None) -> Path:
    write_contrast_file(folder / "contrast.jsonl")
    extra = f", execution: {execution}" if execution else ""
    path = folder / f"coco-{execution}.yaml"
    path.write_text(f"name: tiny-coco\nmodel: {model}\nlocate: {{method: coco, prompts: contrast.jsonl, "
                    f"answer_format: raw, batch_size: 4, top_fraction: 0.05, layer_range: [2, 2]{extra}}}\n")
    return path


def locate(recipe: Path, out: Path, *extra: str):
    result = CliRunner().invoke(main, ["locate", str(recipe), "-o", str(out), "--cache-dir", str(out.parent / "c"),
                                       *extra])
    assert result.exit_code == 0, result.output
    return result, NeuronSet.load(out)


def test_recipe_execution_blockwise_makes_locate_run_blockwise(tmp_path, tiny_checkpoint, monkeypatch):
    model = tiny_checkpoint("qwen2")
    recipe = coco_recipe(tmp_path, model, "blockwise")
    built = []
    real = lazy.lazy_model
    monkeypatch.setattr("bakeedit.models.load.lazy_model", lambda *a, **k: built.append(1) or real(*a, **k))
    result, blockwise = locate(recipe, tmp_path / "a" / "neurons.json")
    assert "execution: blockwise: requested" in result.stderr and built == [1]
    result, memory = locate(recipe, tmp_path / "b" / "neurons.json", "--execution", "in-memory")
    assert "execution: in memory: requested" in result.stderr and built == [1]
    assert_same_neurons(memory, blockwise)
    assert {n.layer for n in blockwise.neurons} == {2}  # the side report's spec kept layer_range and execution


def test_auto_locates_blockwise_when_the_checkpoint_does_not_fit(tmp_path, tiny_checkpoint, monkeypatch):
    recipe = coco_recipe(tmp_path, tiny_checkpoint("llama"), None)  # locate.execution defaults to auto
    monkeypatch.setattr(lazy, "available_memory", lambda: 64 << 10)  # 64 KiB "free": the tiny model does not fit

    def no_full_model(*_a, **_k):
        raise AssertionError("the whole model was loaded")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_full_model)
    result, _ = locate(recipe, tmp_path / "a" / "neurons.json")
    assert "execution: blockwise: the checkpoint needs" in result.stderr
    assert "of memory is available" in result.stderr
