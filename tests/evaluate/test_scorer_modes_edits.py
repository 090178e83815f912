"""Every scorer mode scores an edited model as a plain per-example loop does, or refuses to.

The loop below is the definition (docs/nonlinear.md "Scoring with position-scoped edits"): one unpadded forward of
``ctx + cont[:-1]`` per request under the edit, the log-probability of each continuation token read at the position
before it. A ``positions: last`` edit then reaches the last token of that sequence. The requests mix one-token and
longer continuations of shared contexts, contexts of different lengths (padding) and a one-token context, with
batch size 2 so that groups are split and batches mix lengths.
"""

from __future__ import annotations

import pytest
import torch

from bakeedit.edit import build_plan, runtime_edit
from bakeedit.errors import EditError
from bakeedit.evaluate.batching import TokenRequest
from bakeedit.evaluate.engine import MODES, Scorer
from bakeedit.models.arch import ModelLayout
from bakeedit.neurons import Neuron
from bakeedit.recipe import EditSpec

from tiny_models import VOCAB, tiny_model, tiny_tokenizer

#: name -> the edit, on mlp.up and attn.v channels of every layer (sites every family has).
EDITS = {
    "linear_all": {"lambda": 5.0},
    "last_scale": {"lambda": 5.0, "positions": "last"},
    "tanh_gain_all": {"type": "nonlinear", "map": "tanh_gain", "params": {"alpha": 2.0, "s": 0.05}},
    "start_4": {"lambda": 5.0, "start": 4},
}
ARCHS = ("llama", "gpt2")  # rotary positions; learned absolute positions and Conv1D (fused q|k|v)


def neurons() -> list[Neuron]:
    return [Neuron(layer=layer, site=site, index=i) for layer in range(3) for site in ("mlp.up", "attn.v")
            for i in range(0, 16, 3)]


def requests() -> list[TokenRequest]:
    g = torch.Generator().manual_seed(3)

    def tokens(n: int) -> list[int]:
        return torch.randint(3, VOCAB, (n,), generator=g).tolist()

    out: list[TokenRequest] = []
    for ctx in (tokens(9), tokens(4), tokens(1), tokens(13)):
        for n in (1, 3, 5):
            out.append(TokenRequest(len(out), ctx, tokens(n), n))
    out.append(TokenRequest(len(out), tokens(6), tokens(2), 2))
    return out


@torch.no_grad()
def per_example(model, reqs: list[TokenRequest]) -> list[float]:
    """The reference: one unpadded sequence at a time, no batching, no shared context, no cache."""
    out = []
    for r in reqs:
        logits = model(torch.tensor([r.ctx + r.cont[:-1]])).logits[0].float()
        logp = torch.log_softmax(logits[len(r.ctx) - 1:], dim=-1)
        out.append(sum(logp[j, token].item() for j, token in enumerate(r.cont)))
    return out


def max_delta(ref: list[float], got) -> float:
    return max(abs(a - b.logprob) for a, b in zip(ref, got, strict=True))


@pytest.fixture(scope="module", params=ARCHS)
def edited(request):
    """Per edit: the model with the plan, its plan, and the per-example reference with and without the edit."""
    model = tiny_model(request.param)
    layout = ModelLayout.for_model(model)
    reqs = requests()
    base = per_example(model, reqs)
    cases = {}
    for name, edit in EDITS.items():
        plan = build_plan(neurons(), EditSpec.model_validate(edit), layout)
        with runtime_edit(model, layout, plan):
            cases[name] = (plan, per_example(model, reqs))
    return model, layout, reqs, base, cases


def exact_modes(edit_name: str) -> tuple[str, ...]:
    return ("packed", "flat") if EDITS[edit_name].get("positions") == "last" else MODES


@pytest.mark.parametrize("edit_name", EDITS)
def test_every_exact_mode_equals_the_per_example_loop(edited, edit_name):
    model, layout, reqs, base, cases = edited
    plan, ref = cases[edit_name]
    assert max(abs(a - b) for a, b in zip(ref, base, strict=True)) > 1e-2, "the edit must change the scores"
    with runtime_edit(model, layout, plan):
        for mode in (*exact_modes(edit_name), None):  # None: the scorer's default for this model
            got = Scorer(model, tiny_tokenizer(), batch_size=2, mode=mode).score_tokens(reqs)
            assert max_delta(ref, got) <= 1e-4, mode


def test_the_kv_mode_cannot_reproduce_a_last_position_edit_and_refuses_it(edited):
    model, layout, reqs, _, cases = edited
    plan, _ = cases["last_scale"]
    with runtime_edit(model, layout, plan):
        with pytest.raises(EditError, match=r"Scorer\(mode='kv'\) cannot score .*'positions: last'") as info:
            Scorer(model, tiny_tokenizer(), mode="kv")
        assert "mode='packed'" in info.value.hint
        assert Scorer(model, tiny_tokenizer()).mode == "packed"
    scorer = Scorer(model, tiny_tokenizer(), mode="kv")  # made before the edit is hooked in: refused when scoring
    with runtime_edit(model, layout, plan), pytest.raises(EditError, match="kv"):
        scorer.score_tokens(reqs)


def test_a_packed_last_edit_gives_mixed_contexts_a_copy_of_their_last_token(edited, monkeypatch):
    """Without the copy (every option read at the context's own last token), the packed row scores the one-token
    options of a context that also has longer ones without the edit: the test above would fail."""
    from bakeedit.evaluate import strategies

    model, layout, reqs, _, cases = edited
    plan, ref = cases["last_scale"]
    assert any(strategies._needs_last_copy([r for r in reqs if r.ctx == q.ctx]) for q in reqs)
    monkeypatch.setattr(strategies, "_needs_last_copy", lambda group: False)
    with runtime_edit(model, layout, plan):
        got = Scorer(model, tiny_tokenizer(), batch_size=2).score_tokens(reqs)
    assert max_delta(ref, got) > 1e-3


def test_a_last_edit_falls_back_to_flat_where_packing_is_not_possible(edited):
    """A sliding window (or an attention kernel without 4D masks) sends packed rows to ``kv``, which cannot score a
    ``last`` edit; under one they go to ``flat`` instead."""
    model, layout, reqs, _, cases = edited
    plan, ref = cases["last_scale"]
    with runtime_edit(model, layout, plan):
        scorer = Scorer(model, tiny_tokenizer(), batch_size=2)
        scorer.sliding_window = 2  # every request of the test is longer than half of it
        assert max_delta(ref, scorer.score_tokens(reqs)) <= 1e-4
        scorer.sliding_window, scorer.supports_4d_mask = None, False
        assert max_delta(ref, scorer.score_tokens(reqs)) <= 1e-4


def test_a_saved_module_announces_its_positions_to_the_scorer(edited):
    """The custom module sets the same attribute as the runtime hooks (tests/export/test_custom_module.py pins
    that it does); the scorer needs nothing else."""
    model = edited[0]
    model.bakeedit_positions = frozenset({"last"})
    try:
        assert Scorer(model, tiny_tokenizer()).mode == "packed"
        with pytest.raises(EditError, match="kv"):
            Scorer(model, tiny_tokenizer(), mode="kv")
    finally:
        del model.bakeedit_positions


def test_batched_generation_with_a_shared_prefix_equals_one_prompt_at_a_time_under_a_last_edit():
    """Few-shot prompts share a long prefix, which the generator runs once as its own call; under a ``positions:
    last`` edit that call's last token would be edited, which one prompt alone never has. Such models prefill each
    prompt whole, so the first generated token's distribution of each row is that prompt's own."""
    from bakeedit.evaluate.generation import MIN_SHARED_PREFIX, _prefill

    model = tiny_model("llama")
    layout = ModelLayout.for_model(model)
    tok = tiny_tokenizer()
    shots = "Q: one plus one\nA: two\nQ: two plus two\nA: four\n"
    prompts = [tok(shots + f"Q: {q}\nA:")["input_ids"] for q in ("five plus five", "one", "six plus six plus six")]
    assert len(shots) > MIN_SHARED_PREFIX  # the byte tokenizer: a token per character, so the prefix is shared
    plan = build_plan(neurons(), EditSpec.model_validate(EDITS["last_scale"]), layout)
    with torch.no_grad(), runtime_edit(model, layout, plan):
        scorer = Scorer(model, tok, batch_size=3)
        batched = _prefill(scorer, prompts)[0].logits[:, -1].float()
        alone = torch.cat([_prefill(scorer, [p])[0].logits[:, -1].float() for p in prompts])
        one_forward = torch.cat([model(torch.tensor([p])).logits[:, -1].float() for p in prompts])
    torch.testing.assert_close(batched, alone, atol=1e-4, rtol=0)
    torch.testing.assert_close(alone, one_forward, atol=1e-4, rtol=0)  # alone = one plain forward
