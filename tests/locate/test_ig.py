"""The batched, prefix-cached integrated gradients against an explicit per-step loop of full forward passes."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from bakeedit.locate.knowbias.ig import answer_probability, frozen_parameters, integrated_gradients
from bakeedit.models.arch import ModelLayout

from tiny_models import ARCHS, probe_ids, tiny_model

CANDIDATE_SITES = ("mlp.gate", "mlp.act", "attn.q", "attn.v")
#: float32 ulps of P(x) below which an IG completeness error is rounding, not Riemann error (measured: up to 2).
NOISE_ULPS = 8

# Where each candidate site lives, written out by hand for the reference (it must not go through ModelLayout or
# the production hooks it checks): block list, then per site the module inside a block, whether the site is that
# module's output ("out") or input ("in"), and the site's channels of that tensor. Tiny models: 4 query heads of 8
# over 2 kv heads (q 32, kv 16), FFN 48; GPT-2 and GPT-NeoX have no GQA (kv 32).
LLAMA_LIKE = {
    "mlp.gate": ("mlp.gate_proj", "out", range(48)),
    "mlp.act": ("mlp.down_proj", "in", range(48)),
    "attn.q": ("self_attn.q_proj", "out", range(32)),
    "attn.v": ("self_attn.v_proj", "out", range(16)),
}
NEOX_QKV = [24 * head + dim for head in range(4) for dim in range(8)]  # per head [q(8) k(8) v(8)]
#: The families whose modules are not Llama's names (the others are recognised by their module names, below).
HAND_SITES: dict[str, tuple[str, dict[str, tuple[str, str, object]]]] = {
    "phi3": ("model.layers", {
        "mlp.gate": ("mlp.gate_up_proj", "out", range(48)),  # [gate | up]
        "mlp.act": ("mlp.down_proj", "in", range(48)),
        "attn.q": ("self_attn.qkv_proj", "out", range(32)),  # [q | k | v]
        "attn.v": ("self_attn.qkv_proj", "out", range(48, 64)),
    }),
    "phi": ("model.layers", {
        "mlp.act": ("mlp.fc2", "in", range(48)),
        "attn.q": ("self_attn.q_proj", "out", range(32)),
        "attn.v": ("self_attn.v_proj", "out", range(16)),
    }),
    "gpt2": ("transformer.h", {
        "mlp.act": ("mlp.c_proj", "in", range(48)),
        "attn.q": ("attn.c_attn", "out", range(32)),  # [q | k | v], 32 each
        "attn.v": ("attn.c_attn", "out", range(64, 96)),
    }),
    "gpt_neox": ("gpt_neox.layers", {
        "mlp.act": ("mlp.dense_4h_to_h", "in", range(48)),
        "attn.q": ("attention.query_key_value", "out", NEOX_QKV),
        "attn.v": ("attention.query_key_value", "out", [c + 16 for c in NEOX_QKV]),
    }),
}


def hand_sites(model, arch: str) -> tuple[str, dict[str, tuple[str, str, object]]]:
    """The block list and site table of ``arch``: its own entry, else the Llama modules the model has (found by
    name in the model itself, so a new llama-like family needs no entry, and Qwen2-MoE, whose MLP is experts, gets
    only the attention sites)."""
    if arch in HAND_SITES:
        return HAND_SITES[arch]
    names = {name for name, _ in model.named_modules()}
    found = {site: where for site, where in LLAMA_LIKE.items() if f"model.layers.0.{where[0]}" in names}
    assert found, f"{arch}: no Llama module names; add its sites to HAND_SITES"
    return "model.layers", found


def test_the_hand_table_covers_every_architecture():
    for arch in ARCHS:
        _, sites = hand_sites(tiny_model(arch), arch)
        assert {"attn.q", "attn.v"} <= set(sites), arch
    assert set(hand_sites(tiny_model("qwen2_moe"), "qwen2_moe")[1]) == {"attn.q", "attn.v"}


@contextmanager
def patched_site(model, arch: str, layer: int, site: str, edit):
    """Replace one module's ``forward`` so that ``edit(x)`` rewrites its input (``in`` sites) or output (``out``)
    restricted to the site's channels; ``edit`` gets and returns ``[batch, seq, n_channels]``."""
    blocks, sites = hand_sites(model, arch)
    name, axis, channels = sites[site]
    module = model.get_submodule(f"{blocks}.{layer}.{name}")
    channels = torch.tensor(list(channels))
    original = module.forward
    had_own = "forward" in vars(module)  # an instance-level forward (an accelerate hook) is put back as it was

    def through(t):
        new = t.clone()
        new[..., channels] = edit(t[..., channels])
        return new

    def forward(x, *args, **kwargs):
        return original(through(x), *args, **kwargs) if axis == "in" else through(original(x, *args, **kwargs))

    module.forward = forward
    try:
        yield
    finally:
        if had_own:
            module.forward = original
        else:
            del module.forward  # the class's forward again


def _full_probability(model, prompt: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """P(answer | prompt) = prod_j P(a_j | prompt, a_<j), one unpadded forward of the whole sequence."""
    ids = torch.cat([prompt, answer[:-1]]).unsqueeze(0)
    logits = model(ids).logits[:, len(prompt) - 1 :]
    probs = logits.softmax(-1)[0, torch.arange(len(answer)), answer]
    return probs.prod()


def reference_ig(model, arch, prompt, answer, layer, site, steps) -> torch.Tensor:
    """IG the slow, obvious way: one alpha at a time, the whole sequence re-run, no cache, no batching, the site
    scaled by patching its module's forward (``patched_site``), not by the hooks the engine uses."""
    last = len(prompt) - 1
    dtype = next(model.parameters()).dtype
    total, h = None, None
    for k in range(1, steps + 1):
        alpha = k / steps
        store = {}

        def scale(act, alpha=alpha, store=store):
            if "z" not in store:  # the first call: the site's width is known only now
                store["h"] = act[0, last].detach().clone()
                store["z"] = torch.zeros(act.shape[-1], dtype=dtype, requires_grad=True)
            new = act.clone()
            new[0, last] = alpha * act[0, last] + store["z"]
            return new

        with patched_site(model, arch, layer, site, scale):
            p = _full_probability(model, prompt, answer)
        (grad,) = torch.autograd.grad(p, store["z"])
        total = grad if total is None else total + grad
        h = store["h"]
    return h * total / steps


def _zeroed_probability(model, arch, prompt, answer, layer, site) -> float:
    last = len(prompt) - 1

    def zero(act):
        new = act.clone()
        new[0, last] = 0
        return new

    with torch.no_grad(), patched_site(model, arch, layer, site, zero):
        return float(_full_probability(model, prompt, answer))


def _compare(arch_name: str, answer_len: int, dtype: torch.dtype, steps: int = 4) -> dict[bool, float]:
    """Worst relative difference fast vs reference, per ``share_lower`` setting (reference computed once)."""
    model = tiny_model(arch_name, dtype=dtype)
    layout = ModelLayout.for_model(model)
    ids = probe_ids(batch=1, seq=9 + answer_len, seed=3)[0]
    prompt, answer = ids[:9], ids[9:]
    sites = [s for s in CANDIDATE_SITES if s in hand_sites(model, arch_name)[1]]
    cells = [(layer, site) for layer in range(layout.n_layers) for site in sites]
    with frozen_parameters(model):
        slow = {c: reference_ig(model, arch_name, prompt, answer, *c, steps=steps) for c in cells}
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
            slow = reference_ig(model, "gemma3_text", prompt, answer, *cell, steps=4)
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
        delta = p_x - _zeroed_probability(model, arch_name, prompt, answer, layer, site)
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


def test_answer_probability_is_the_product_over_answer_tokens():
    """A multi-token answer's target is the probability of the whole answer, not the mean of its tokens'."""
    # Logits chosen so that softmax gives round numbers: row b, position j puts log(p) on the answer token.
    probs = torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]], [[0.2, 0.2, 0.6], [0.5, 0.25, 0.25]]])
    answer = torch.tensor([0, 1])
    got = answer_probability(probs.log(), answer)
    torch.testing.assert_close(got, torch.tensor([0.5 * 0.8, 0.2 * 0.25]))
    # one token: the softmax probability itself (KnowBias's target)
    torch.testing.assert_close(answer_probability(probs[:, :1].log(), answer[:1]), torch.tensor([0.5, 0.2]))


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
