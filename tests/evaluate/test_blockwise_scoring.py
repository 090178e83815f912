"""Scoring a blockwise (lazy) model: the packed scorer gives the in-memory model's log-likelihoods, reads each block
once per batch, and says how long the rest will take before it goes on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from bakeedit.cli import main
from bakeedit.evaluate.engine import Scorer
from bakeedit.models.lazy import lazy_state
from bakeedit.models.load import LoadedModel, load_model
from bakeedit.neurons import Neuron, NeuronSet

from tiny_models import tiny_model, tiny_tokenizer

# Different lengths: shared contexts with several options, an empty context, a one-token continuation, and a context
# longer than gemma3_text's 16-token sliding window (its packed scorer falls back to the KV cache for those).
REQUESTS = [("Question: what is 2+2?\nAnswer:", " four"), ("Question: what is 2+2?\nAnswer:", " five hundred"),
            ("", "Hello there"), ("x", "y"), ("A longer context that goes on a bit further than that", " and ends"),
            ("Pick:", " A"), ("Pick:", " B")]


def pair(arch: str, folder: Path) -> tuple[LoadedModel, LoadedModel]:
    tiny_model(arch).save_pretrained(folder, max_shard_size="20KB")
    tiny_tokenizer().save_pretrained(folder)
    return load_model(str(folder)), load_model(str(folder), execution="blockwise")


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3_text", "qwen2_moe"])
def test_blockwise_scoring_equals_the_packed_scorer_in_memory(arch, tmp_path):
    memory, blockwise = pair(arch, tmp_path / arch)
    want = Scorer(memory.model, memory.tokenizer, batch_size=3).loglikelihood(REQUESTS)
    notes: list[str] = []
    scorer = Scorer(blockwise.model, blockwise.tokenizer, batch_size=3, notice=notes.append)
    assert scorer.mode == "packed" and scorer.device == torch.device("cpu")
    got = scorer.loglikelihood(REQUESTS)
    assert [g.n_tokens for g in got] == [w.n_tokens for w in want] and len({w.n_tokens for w in want}) > 3
    for g, w in zip(got, want, strict=True):
        assert g.logprob == pytest.approx(w.logprob, rel=1e-5, abs=1e-5)
        assert g.is_greedy == w.is_greedy
    assert len(notes) == 1 and notes[0].startswith("blockwise loglikelihood: the first batch (")


def test_each_block_is_read_once_per_forward_and_the_estimate_comes_first(tmp_path):
    _, blockwise = pair("llama", tmp_path / "ck")
    model, state = blockwise.model, lazy_state(blockwise.model)
    forwards, events = [], []
    model.register_forward_pre_hook(lambda *_: forwards.append(1))
    scorer = Scorer(model, blockwise.tokenizer, batch_size=2,
                    notice=lambda line: events.append(("notice", line, len(forwards))),
                    progress=lambda _d, done, total: events.append(("batch", done, total)))
    before = state.loads
    scorer.loglikelihood(REQUESTS)
    assert len(forwards) > 1
    assert state.loads - before == len(forwards) * len(state.units)  # every unit once per forward, no more
    batches = [e for e in events if e[0] == "batch"]
    notices = [e for e in events if e[0] == "notice"]
    assert len(notices) == 1 and notices[0][2] == 1  # measured on the first forward, before the second
    assert "took" in notices[0][1] and "will take about" in notices[0][1]
    assert len(batches) > 1 and batches[-1][1] == batches[-1][2]


def test_generation_on_a_blockwise_model_matches(tmp_path):
    memory, blockwise = pair("qwen2", tmp_path / "ck")
    prompts = ["Once upon", "The answer is"]
    want = Scorer(memory.model, memory.tokenizer, batch_size=1).generate(prompts, max_new_tokens=4)
    got = Scorer(blockwise.model, blockwise.tokenizer, batch_size=1, notice=lambda _l: None).generate(
        prompts, max_new_tokens=4)
    assert got == want


def test_eval_cli_blockwise_gives_the_in_memory_results(tmp_path, tiny_checkpoint, shared_data):
    """``bakeedit eval --execution blockwise``: same metrics for the model, its baseline and a runtime-edit control
    (hooks on the blockwise base); each model's path is printed, and the estimate line."""
    ckpt = tiny_checkpoint("qwen2")
    control = tmp_path / "control.json"
    NeuronSet(method="random", neurons=[Neuron(layer=1, site="mlp.act", index=5), Neuron(layer=2, site="attn.v",
                                                                                            index=3)]).save(control)
    raws = {}
    for execution in ("in-memory", "blockwise"):
        out = tmp_path / execution
        result = CliRunner().invoke(main, [
            "eval", str(ckpt), "--baseline", str(ckpt), "--tasks", "crows_pairs", "--limit", "6", "--batch-size", "4",
            "--data-dir", str(shared_data), "-o", str(out), "--control", str(control), "--control-lambda", "0",
            "--execution", execution])
        assert result.exit_code == 0, result.output
        word = "blockwise" if execution == "blockwise" else "in memory"
        assert f"base: execution {word}: requested" in result.stderr
        assert f"edited: execution {word}: requested" in result.stderr
        assert ("blockwise loglikelihood: the first batch" in result.stderr) == (execution == "blockwise")
        raws[execution] = json.loads((out / "results.json").read_text())["results"]
    for label in ("base", "control", "edited"):
        for got, want in zip(raws["blockwise"][label], raws["in-memory"][label], strict=True):
            for name, metric in want["metrics"].items():
                assert got["metrics"][name]["value"] == pytest.approx(metric["value"], rel=1e-5, abs=1e-6), name
    assert raws["blockwise"]["control"][0]["metrics"] != raws["blockwise"]["base"][0]["metrics"]
