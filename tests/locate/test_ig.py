"""The batched, prefix-cached integrated gradients against an explicit per-step loop of full forward passes."""

from __future__ import annotations

import pytest
import torch

from bakeedit.locate.knowbias.ig import answer_probability, frozen_parameters, integrated_gradients
from bakeedit.models.arch import ModelLayout
from bakeedit.models.hookpoints import site_hooks

from tiny_models import ARCHS, probe_ids, tiny_model

CANDIDATE_SITES = ("mlp.gate", "mlp.act", "attn.q", "attn.v")
#: float32 ulps of P(x) below which an IG completeness error is rounding, not Riemann error (measured: up to 2).
NOISE_ULPS = 8


def _full_probability(model, prompt: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    ids = torch.cat([prompt, answer[:-1]]).unsqueeze(0)
    logits = model(ids).logits[:, len(prompt) - 1 :]
    probs = logits.softmax(-1)[0, torch.arange(len(answer)), answer]
    return probs.mean()


def reference_ig(model, layout, prompt, answer, layer, site, steps) -> torch.Tensor:
    """IG the slow, obvious way: one alpha at a time, the whole sequence re-run, no cache, no batching."""
    last = len(prompt) - 1
    dtype = next(model.parameters()).dtype
    total = torch.zeros(layout.site_size(site), dtype=dtype)
    h = None
    for k in range(1, steps + 1):
        alpha = k / steps
        z = torch.zeros(layout.site_size(site), dtype=dtype, requires_grad=True)
        store = {}

        def scale(act, alpha=alpha, z=z, store=store):
            store["h"] = act[0, last].detach().clone()
            new = act.clone()
            new[0, last] = alpha * act[0, last] + z
            return new

        with site_hooks(model, layout, {(layer, site): scale}):
            p = _full_probability(model, prompt, answer)
        (grad,) = torch.autograd.grad(p, z)
        total += grad
        h = store["h"]
    return h * total / steps


def _zeroed_probability(model, layout, prompt, answer, layer, site) -> float:
    last = len(prompt) - 1

    def zero(act):
        new = act.clone()
        new[0, last] = 0
        return new

    with torch.no_grad(), site_hooks(model, layout, {(layer, site): zero}):
        return float(_full_probability(model, prompt, answer))


def _compare(arch_name: str, answer_len: int, dtype: torch.dtype, steps: int = 4) -> dict[bool, float]:
    """Worst relative difference fast vs reference, per ``share_lower`` setting (reference computed once)."""
    model = tiny_model(arch_name, dtype=dtype)
    layout = ModelLayout.for_model(model)
    ids = probe_ids(batch=1, seq=9 + answer_len, seed=3)[0]
    prompt, answer = ids[:9], ids[9:]
    sites = [s for s in CANDIDATE_SITES if s in layout.sites]
    cells = [(layer, site) for layer in range(layout.n_layers) for site in sites]
    with frozen_parameters(model):
        slow = {c: reference_ig(model, layout, prompt, answer, *c, steps=steps) for c in cells}
    scale = max(float(v.abs().max()) for v in slow.values())
    assert scale > 0  # a vacuous all-zero comparison would prove nothing
    worst = {}
    for share_lower in (True, False):
        fast = integrated_gradients(model, layout, prompt, answer, cells, steps=steps, share_lower=share_lower)
        with torch.no_grad():
            assert fast.probability == pytest.approx(float(_full_probability(model, prompt, answer)), rel=1e-5)
        if dtype == torch.float64:  # cell by cell, relative to the cell's own largest attribution
            worst[share_lower] = max(
                float((fast.attributions[c].double() - slow[c]).abs().max() / slow[c].abs().max()) for c in cells
            )
        else:  # float32 noise is ~1e-7 of the largest value; tiny cells (attn.q of a random model) are all noise
            worst[share_lower] = max(float((fast.attributions[c] - slow[c]).abs().max()) for c in cells) / scale
    return worst


@pytest.mark.parametrize("arch_name", ARCHS)
def test_batched_cached_ig_equals_per_step_loop_float64(arch_name: str):
    for answer_len in (1, 3):
        worst = _compare(arch_name, answer_len, torch.float64)
        assert max(worst.values()) <= 1e-5, (arch_name, answer_len, worst)


@pytest.mark.parametrize("arch_name", ["llama", "qwen2", "gpt2", "gpt_neox"])
def test_batched_cached_ig_equals_per_step_loop_float32(arch_name: str):
    """In float32, equal within 1e-5 of the question's largest attribution (the scale tau is applied on)."""
    worst = _compare(arch_name, 1, torch.float32)
    assert max(worst.values()) <= 1e-5, (arch_name, worst)


def test_prompt_longer_than_a_sliding_window():
    """Gemma 3's sliding-window cache layers (window 16 in the tiny config) survive copying and batch expansion."""
    model = tiny_model("gemma3_text", dtype=torch.float64)
    layout = ModelLayout.for_model(model)
    ids = probe_ids(batch=1, seq=40, seed=4)[0]
    prompt, answer = ids[:38], ids[38:]
    cells = [(layer, "mlp.gate") for layer in range(layout.n_layers)]
    fast = integrated_gradients(model, layout, prompt, answer, cells, steps=4)
    for cell in cells:
        with frozen_parameters(model):
            slow = reference_ig(model, layout, prompt, answer, *cell, steps=4)
        assert float((fast.attributions[cell].double() - slow).abs().max() / slow.abs().max()) <= 1e-5


@pytest.mark.parametrize("arch_name", ["llama", "gpt2"])
def test_completeness_within_riemann_error(arch_name: str):
    """sum_i Attr_i ~ P(x) - P(site zeroed at the last position); the right-Riemann error shrinks with m."""
    model = tiny_model(arch_name, seed=2)
    layout = ModelLayout.for_model(model)
    ids = probe_ids(batch=1, seq=12, seed=5)[0]
    prompt, answer = ids[:11], ids[11:]
    site = "mlp.act"
    with torch.no_grad():
        p_x = float(_full_probability(model, prompt, answer))
    # Both sides are float32 sums at the scale of P(x): errors below a few ulps of P(x) are rounding, and their
    # order says nothing (gpt2 went 9.4e-10, 1.0e-10, 2.1e-10 on one machine). Compare only above that floor.
    floor = NOISE_ULPS * torch.finfo(torch.float32).eps * p_x
    converging_layers = 0
    for layer in range(layout.n_layers):
        delta = p_x - _zeroed_probability(model, layout, prompt, answer, layer, site)
        errors = {}
        for steps in (5, 50, 500):
            res = integrated_gradients(model, layout, prompt, answer, [(layer, site)], steps=steps)
            errors[steps] = abs(float(res.attributions[(layer, site)].sum()) - delta)
        assert abs(delta) > 1e-6, "the site must matter for the property to say anything"
        # Right Riemann sums of a smooth path converge as O(1/m): 10x the steps, ~10x less error.
        for coarse, fine in ((5, 50), (50, 500)):
            if errors[coarse] > floor:
                assert errors[fine] < errors[coarse], (errors, floor)
        converging_layers += errors[5] > floor
        assert errors[500] <= 0.02 * abs(delta) + floor, (errors, delta)
    assert converging_layers, "no layer's 5-step error was above the rounding floor: the test would show nothing"


def test_answer_probability_is_mean_over_answer_tokens():
    logits = torch.randn(2, 3, 10)
    answer = torch.tensor([4, 1, 7])
    probs = logits.softmax(-1)
    expected = torch.stack([probs[b, torch.arange(3), answer].mean() for b in range(2)])
    torch.testing.assert_close(answer_probability(logits, answer), expected)


def test_parameters_stay_untouched():
    model = tiny_model("llama")
    layout = ModelLayout.for_model(model)
    flags = [p.requires_grad for p in model.parameters()]
    ids = probe_ids(batch=1, seq=6)[0]
    integrated_gradients(model, layout, ids[:5], ids[5:], [(1, "mlp.gate")], steps=3)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


def test_rejects_a_one_token_prompt():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="at least 2 tokens"):
        layout = ModelLayout.for_model(model)
        integrated_gradients(model, layout, torch.tensor([5]), torch.tensor([6]), [(0, "mlp.act")])
