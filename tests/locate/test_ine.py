"""``ine``: value/query scores against explicit references, general neurons, causal masking, data, runs.

The references below spell each architecture's module paths on purpose: they are the slow, obviously-correct
computations the vectorised scores (which only know the ArchSpec) must reproduce.
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from bakeedit.data import package_data_path
from bakeedit.errors import DataError, RecipeError, UnsupportedArchitecture
from bakeedit.io.jsonl import read_jsonl
from bakeedit.locate import LocateContext, run_locate
from bakeedit.locate.ine import method as ine
from bakeedit.locate.ine.causal import MaskProbe, Measurement, select_by_masking
from bakeedit.locate.ine.data import encode_probe, encode_prompts, load_gender_prompts
from bakeedit.locate.ine.parts import discover_parts, head_source_contributions
from bakeedit.locate.ine.scores import Targets, make_batch, query_scores, value_scores
from bakeedit.locate.registry import validate_params
from bakeedit.models import load_model
from bakeedit.models.hookpoints import capture_sites
from bakeedit.recipe import LocateSpec

from tiny_models import save_tiny_checkpoint

ARCH_PATHS = {
    "llama": dict(final="model.norm", block="model.layers", down="mlp.down_proj", o="self_attn.o_proj",
                  attn_norm="input_layernorm", mlp_norm="post_attention_layernorm"),
    "gpt2": dict(final="transformer.ln_f", block="transformer.h", down="mlp.c_proj", o="attn.c_proj",
                 attn_norm="ln_1", mlp_norm="ln_2"),
}
ARCH_PATHS["qwen2"] = ARCH_PATHS["llama"]
TESTED = ("llama", "qwen2", "gpt2")
WORDS = {"t": ["kind", "calm", "loud", "shy"], "p": ["nurse", "pilot", "baker", "judge"]}


def write_data(folder: Path, template: str = "A {word} said ", heldout: tuple[str, ...] = ("shy",)) -> dict:
    """Tiny word list and template (short: the tiny tokenizer is byte-level and GPT-2 has 64 positions)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"word": w, "category": c, "split": "heldout" if w in heldout else "locate"}
            for c, ws in WORDS.items() for w in ws]
    (folder / "words.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    templates = [{"id": "t", "template": template, "categories": [], "female": "she", "male": "he"}]
    (folder / "templates.json").write_text(json.dumps(templates))
    (folder / "probe.txt").write_text("# neutral\nRain fell on the hill.\nTwo and two are four.\nThe bus is late.\n")
    return {"words": str(folder / "words.jsonl"), "templates": str(folder / "templates.json"),
            "probe_sentences": str(folder / "probe.txt")}


@pytest.fixture
def tiny_loaded(tmp_path: Path):
    def make(arch: str, seed: int = 0):
        return load_model(str(save_tiny_checkpoint(arch, tmp_path / f"ckpt-{arch}-{seed}", seed=seed)))

    return make


def setup(loaded, data: dict):
    prompts = load_gender_prompts(Path(data["words"]), Path(data["templates"]), "locate")
    encoded = encode_prompts(loaded.tokenizer, prompts)
    parts = discover_parts(loaded.model, loaded.layout, torch.tensor(encoded[0].ids))
    return encoded, parts, make_batch(encoded, 0)


def column(module: torch.nn.Module, i: int) -> torch.Tensor:
    """What input channel ``i`` of a projection writes: ``W[:, i]`` (Linear) or ``W[i, :]`` (GPT-2 Conv1D)."""
    return (module.weight[i] if type(module).__name__ == "Conv1D" else module.weight[:, i]).detach().double()


def frozen_norm_ref(norm: torch.nn.Module, x: torch.Tensor, frozen_from: torch.Tensor) -> torch.Tensor:
    """The norm of ``x`` with the scale of ``frozen_from``, written out per family (float64)."""
    x, ref = x.double(), frozen_from.double()
    if isinstance(norm, torch.nn.LayerNorm):
        sigma = (ref.var(-1, unbiased=False, keepdim=True) + norm.eps).sqrt()
        return norm.weight.double() * (x - x.mean(-1, keepdim=True)) / sigma + norm.bias.double()
    sigma = (ref.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon).sqrt()
    return norm.weight.double() * x / sigma


def record(module: torch.nn.Module, store: dict, key, output: bool = False):
    if output:
        return module.register_forward_hook(lambda _m, _a, out: store.__setitem__(key, out.detach()))
    return module.register_forward_pre_hook(lambda _m, args: store.__setitem__(key, args[0].detach()))


def explicit_run(model, paths: dict, ids: torch.Tensor, mask: torch.Tensor) -> tuple[dict, object]:
    """Inputs of the final norm, each down/o projection and each pre-norm, outputs of the pre-norms; attention."""
    store: dict = {}
    blocks = model.get_submodule(paths["block"])
    handles = [record(model.get_submodule(paths["final"]), store, "final")]
    for layer, block in enumerate(blocks):
        for name in ("down", "o", "attn_norm", "mlp_norm"):
            handles.append(record(block.get_submodule(paths[name]), store, (name, layer)))
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, output_attentions=True, use_cache=False)
    finally:
        model.set_attn_implementation(before)
        for h in handles:
            h.remove()
    return store, out


def gap_ref(model, paths: dict, x: torch.Tensor, frozen_from: torch.Tensor, f: int, m: int) -> torch.Tensor:
    y = frozen_norm_ref(model.get_submodule(paths["final"]), x, frozen_from)
    logp = torch.log_softmax(y @ model.get_output_embeddings().weight.double().t(), -1)
    return logp[..., f] - logp[..., m]


# --- value neurons --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", TESTED)
def test_value_scores_equal_explicit_patching(arch, tiny_loaded, tmp_path):
    """Imp of every mlp.act and attn.o_in neuron = the log-prob gap change when its vector is added to the final
    residual (frozen final-norm scale), computed one neuron at a time with full log-softmaxes."""
    loaded = tiny_loaded(arch)
    model, paths = loaded.model, ARCH_PATHS[arch]
    encoded, parts, batch = setup(loaded, write_data(tmp_path / "d"))
    vs = value_scores(model, loaded.layout, parts, batch)
    store, _ = explicit_run(model, paths, batch.ids, batch.mask)
    blocks = model.get_submodule(paths["block"])
    for b, p in enumerate(encoded[:3]):
        t = len(p.ids) - 1
        x = store["final"][b, t]
        base = gap_ref(model, paths, x, x, p.female_id, p.male_id)
        sign = 1.0 if base >= 0 else -1.0
        assert vs.gap[b].item() == pytest.approx(base.item(), abs=1e-5)
        for layer, block in enumerate(blocks):
            for kind, name in (("ffn", "down"), ("attn", "o")):
                module = block.get_submodule(paths[name])
                act = store[(name, layer)][b, t]
                vectors = torch.stack([act[i].double() * column(module, i) for i in range(len(act))])
                ref = sign * (gap_ref(model, paths, x + vectors, x.expand_as(vectors), p.female_id, p.male_id) - base)
                got = getattr(vs, kind)[b, layer].double()
                torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", TESTED)
def test_attention_sources_sum_to_the_head_output(arch, tiny_loaded, tmp_path):
    """Per source position and head dimension, the contributions of one head sum to what that head adds through
    o_proj; and the attn.o_in scores of the head sum to that output projected on the gap direction."""
    loaded = tiny_loaded(arch)
    model, paths, layout = loaded.model, ARCH_PATHS[arch], loaded.layout
    encoded, parts, batch = setup(loaded, write_data(tmp_path / "d"))
    vs = value_scores(model, layout, parts, batch)
    store, out = explicit_run(model, paths, batch.ids, batch.mask)
    hd = layout.dims.head_dim
    values: dict = {}
    with torch.no_grad(), capture_sites(model, layout, [(1, "attn.v")]) as acts:
        model(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False)
        values = acts[(1, "attn.v")]
    o_proj = model.get_submodule(paths["block"])[1].get_submodule(paths["o"])
    for b, p in enumerate(encoded[:3]):
        t = len(p.ids) - 1
        contrib = head_source_contributions(out.attentions[1][b, :, t, : t + 1], values[b, : t + 1], layout)
        for head in range(layout.dims.n_heads):
            cols = range(head * hd, (head + 1) * hd)
            decomposed = sum(contrib[s, j].double() * column(o_proj, j) for s in range(t + 1) for j in cols)
            o_in = store[("o", 1)][b, t]
            head_out = sum(o_in[j].double() * column(o_proj, j) for j in cols)
            torch.testing.assert_close(decomposed, head_out, atol=1e-5, rtol=1e-4)
            direction = vs.direction[b].double()
            assert vs.attn[b, 1, cols.start: cols.stop].double().sum().item() == pytest.approx(
                float(direction @ head_out), abs=1e-5)


# --- query neurons --------------------------------------------------------------------------------------------


def mlp_coefficients(block, arch: str, x: torch.Tensor) -> torch.Tensor:
    """FFN coefficients m(x) of a block's MLP, in float64, written out per family."""
    mlp = copy.deepcopy(block.mlp).double()
    if arch == "gpt2":
        return mlp.act(mlp.c_fc(x))
    return mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)


def v_rows(block, arch: str, layout, channels: list[int]) -> torch.Tensor:
    """Rows of the value projection (float64) producing the given attn.v channels."""
    if arch == "gpt2":
        hidden = block.attn.c_attn.weight.shape[0]
        return block.attn.c_attn.weight[:, [2 * hidden + c for c in channels]].t().double()
    return block.self_attn.v_proj.weight[channels].double()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_query_scores_equal_the_direct_first_order_effect(arch, tiny_loaded, tmp_path):
    """Query score of FFN neuron q (layer l', position s) = d/de of sum_n c_n a_n when e * m_q(s) W_down[:, q] is
    added to the residual that each target layer reads, through the frozen pre-norm and the target's own input
    weights only (finite differences through the real MLP for FFN targets; attention pattern fixed for attention
    targets)."""
    loaded = tiny_loaded(arch)
    model, paths, layout = loaded.model, ARCH_PATHS[arch], loaded.layout
    encoded, parts, batch = setup(loaded, write_data(tmp_path / "d"))
    vs = value_scores(model, layout, parts, batch)
    targets = Targets({1: torch.tensor([3, 7]), 2: torch.tensor([0, 5, 40])}, {1: torch.tensor([2]),
                                                                              2: torch.tensor([9, 30])})
    got, _ = query_scores(model, layout, parts, batch, vs.direction, targets)
    store, out = explicit_run(model, paths, batch.ids, batch.mask)
    blocks = model.get_submodule(paths["block"])
    group = layout.dims.n_heads // layout.dims.n_kv_heads
    hd = layout.dims.head_dim
    eps = 1e-4
    for b, p in enumerate(encoded[:2]):
        t = len(p.ids) - 1
        direction = vs.direction[b].double()
        assert got[b, 2].abs().max() == 0  # nothing above the last layer
        for low in (0, 1):
            down = blocks[low].get_submodule(paths["down"])
            m = store[("down", low)][b]  # [T, ffn]
            ref = torch.zeros(m.shape[1], dtype=torch.float64)
            for layer in (layer for layer in (1, 2) if layer > low):
                block = blocks[layer]
                for i in targets.ffn.get(layer, []).tolist():
                    c = direction @ column(block.get_submodule(paths["down"]), i)
                    r = store[("mlp_norm", layer)][b, t]
                    vq = m[t].double().unsqueeze(1) * torch.stack([column(down, q) for q in range(m.shape[1])])
                    plus = mlp_coefficients(block, arch, frozen_norm_ref(block.get_submodule(paths["mlp_norm"]),
                                                                         r + eps * vq, r))[:, i]
                    minus = mlp_coefficients(block, arch, frozen_norm_ref(block.get_submodule(paths["mlp_norm"]),
                                                                          r - eps * vq, r))[:, i]
                    ref += c * (plus - minus) / (2 * eps)
                for j in targets.attn.get(layer, []).tolist():
                    head = j // hd
                    c = direction @ column(block.get_submodule(paths["o"]), j)
                    row = v_rows(block, arch, layout, [(head // group) * hd + j % hd])[0]
                    norm = block.get_submodule(paths["attn_norm"])
                    for s in range(t + 1):
                        r = store[("attn_norm", layer)][b, s]
                        vq = m[s].double().unsqueeze(1) * torch.stack([column(down, q) for q in range(m.shape[1])])
                        zero = frozen_norm_ref(norm, torch.zeros_like(r), r)  # the LayerNorm bias cancels
                        dv = (frozen_norm_ref(norm, vq, r) - zero) @ row
                        ref += c * out.attentions[layer][b, head, t, s].double() * dv
            torch.testing.assert_close(got[b, low].double(), ref, atol=1e-5, rtol=1e-3)


# --- general neurons ------------------------------------------------------------------------------------------


def craft_start_neuron(loaded) -> list[int]:
    """Make kv head 0, dim 0 of layer 0 read a value only at the start token 'Z', and make it push the gap towards
    'she': every query head on that kv head then has its important position at the start. Returns the attn.o_in
    channels (query heads x dim 0) of those neurons."""
    model, layout, tok = loaded.model, loaded.layout, loaded.tokenizer
    z, s, h = (tok.convert_tokens_to_ids(c) for c in ("Z", "s", "h"))
    hd, group = layout.dims.head_dim, layout.dims.n_heads // layout.dims.n_kv_heads
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, 0] = 0.0
        emb[z] = 0.0
        emb[z, 0] = 1.0
        attn = model.model.layers[0].self_attn
        attn.v_proj.weight[0] = 0.0
        attn.v_proj.weight[0, 0] = 20.0
        push = model.lm_head.weight[s] - model.lm_head.weight[h]
        channels = [head * hd for head in range(group)]
        for j in channels:
            attn.o_proj.weight[:, j] = 5.0 * push / push.norm()
    return channels


def test_general_neurons_are_flagged_and_excluded(tiny_loaded, tmp_path):
    loaded = tiny_loaded("llama")
    general = craft_start_neuron(loaded)
    data = write_data(tmp_path / "d", template="Z{word} said ")
    _, parts, batch = setup(loaded, data)
    vs = value_scores(loaded.model, loaded.layout, parts, batch)
    assert bool(vs.attn_start[:, 0, general].all())
    assert (vs.gap > 0).all() and (vs.attn[:, 0, general] > 0).all()  # the crafted neurons raise the bias
    # every flag against an explicit argmax over source positions of |A[h, t, s] * v_proj(x_s)[kv(h), d]|
    values: dict = {}
    blocks = loaded.model.model.layers
    handles = [blocks[layer].self_attn.v_proj.register_forward_hook(
        lambda _m, _a, out, layer=layer: values.__setitem__(layer, out.detach())) for layer in range(3)]
    _, out = explicit_run(loaded.model, ARCH_PATHS["llama"], batch.ids, batch.mask)
    for h in handles:
        h.remove()
    hd, group = loaded.layout.dims.head_dim, 2
    for b, t in enumerate(batch.last.tolist()):
        for layer in range(3):
            for j in range(32):
                head, d = divmod(j, hd)
                size = [abs(float(out.attentions[layer][b, head, t, s] * values[layer][b, s, (head // group) * hd + d]))
                        for s in range(t + 1)]
                assert bool(vs.attn_start[b, layer, j]) == (max(range(t + 1), key=size.__getitem__) == 0)

    base = dict(data, k=2, candidates=6, sites=["attn.o_in"], include_query_neurons=False, loss_tolerance=10.0)
    kept = ine.locate_ine(loaded, ine.IneParams(**base), LocateContext())
    flagged = {c.address for c in kept.general}
    assert {(0, "attn.o_in", j) for j in general} <= flagged
    assert all(c.start_share >= 0.5 for c in kept.general)
    assert not flagged & {n.address for n in kept.neuron_set.neurons}
    assert not flagged & kept.causal.screened_neurons()  # never even masked

    loose = ine.locate_ine(loaded, ine.IneParams(**base, exclude_general=False), LocateContext())
    assert flagged <= loose.causal.screened_neurons()  # without the exclusion they compete


# --- causal masking -------------------------------------------------------------------------------------------


def additive_oracle(effects: dict, costs: dict, base=(10.0, 2.0), pair_penalty=None):
    calls: list[list] = []

    def measure(addresses):
        calls.append(list(addresses))
        bias = base[0] - sum(effects[a] for a in addresses)
        loss = base[1] + sum(costs[a] for a in addresses)
        if pair_penalty and set(pair_penalty[0]) <= set(addresses):
            loss += pair_penalty[1]
        return Measurement(bias, loss)

    return measure, calls


def test_masking_one_at_a_time_keeps_the_k_best_within_the_tolerance():
    names = [(1, "mlp.act", i) for i in range(8)]
    effects = dict(zip(names, [1.0, 0.5, 3.0, -0.2, 2.0, 0.1, 4.0, 0.7], strict=True))
    costs = dict(zip(names, [0.0, 0.01, 0.02, 0.0, 0.01, 0.0, 0.5, 0.0], strict=True))  # #6 breaks the probe
    measure, calls = additive_oracle(effects, costs)
    result = select_by_masking(names, measure, k=3, tolerance=0.05, group_size=1)
    assert result.kept == [names[2], names[4], names[0]]  # by bias reduction; #6 rejected although it helps most
    assert (result.final.bias, result.final.loss) == pytest.approx((10.0 - 6.0, 2.0 + 0.03))
    assert result.screened_neurons() == set(names)
    assert len(calls) == 1 + 8 + 3


def test_masking_in_groups_splits_costly_groups_and_respects_the_cumulative_tolerance():
    names = [(0, "attn.o_in", i) for i in range(8)]
    effects = dict(zip(names, [5.0, 4.0, 3.0, 2.0, 1.0, 1.5, -1.0, 0.5], strict=True))
    costs = dict(zip(names, [0.03, 0.03, 0.0, 0.0, 0.01, 0.2, 0.0, 0.0], strict=True))
    measure, calls = additive_oracle(effects, costs, base=(20.0, 2.0))
    result = select_by_masking(names, measure, k=4, tolerance=0.05, group_size=2)
    # group (0, 1) helps but costs 0.06 > 0.05: split, both pass alone; (4, 5) helps but breaks the probe: split, #5
    # out; (6, 7) raises the bias as a group: dropped whole, #7 is never tried alone
    assert [members for members, _ in result.screened] == [
        names[0:2], [names[0]], [names[1]], names[2:4], names[4:6], [names[4]], [names[5]], names[6:8]]
    # accumulation, lowest screened bias first (ties in screening order): #0, {2, 3}, then #1 would push the
    # loss rise to 0.06: rejected; then #4
    assert result.kept == [names[0], names[2], names[3], names[4]]
    assert result.final.loss - result.base.loss <= 0.05 + 1e-12
    assert any(t["add"] == [list(names[1])] and not t["kept"] for t in result.trials)
    assert names[5] not in result.kept and [names[5]] in calls and [names[7]] not in calls


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mask_probe_replays_the_unmasked_lower_blocks(arch, tiny_loaded, tmp_path):
    """Blocks below the lowest masked layer return their unmasked outputs instead of running: same numbers."""
    loaded = tiny_loaded(arch)
    data = write_data(tmp_path / "d")
    encoded = encode_prompts(loaded.tokenizer, load_gender_prompts(Path(data["words"]), Path(data["templates"])))
    probe = encode_probe(loaded.tokenizer, ["Rain fell on the hill.", "Two and two are four."], 60)
    fast = MaskProbe(loaded.model, loaded.layout, encoded, probe, pad_id=0, batch_size=3)
    slow = MaskProbe(loaded.model, loaded.layout, encoded, probe, pad_id=0, batch_size=3, reuse_lower=False)
    runs = []
    handle = loaded.layout.module(loaded.model, 0, "mlp.act").register_forward_pre_hook(lambda *_: runs.append(1))
    try:
        assert fast([]) == slow([])
        for mask in ([(2, "mlp.act", 5)], [(1, "attn.o_in", 3), (2, "mlp.act", 7)], [(0, "mlp.act", 1)]):
            before = len(runs)
            got = fast(mask)
            assert (len(runs) > before) == (mask[0][0] == 0)  # block 0 only runs when it is masked
            want = slow(mask)
            assert got.bias == pytest.approx(want.bias, abs=1e-6) and got.loss == pytest.approx(want.loss, abs=1e-6)
    finally:
        handle.remove()
    assert "forward" not in vars(loaded.layout.blocks(loaded.model)[0])  # the replay left no patch behind


def test_masking_rejects_a_neuron_that_breaks_the_probe_on_a_real_model(tiny_loaded, tmp_path):
    loaded = tiny_loaded("qwen2")
    data = write_data(tmp_path / "d")
    encoded = encode_prompts(loaded.tokenizer, load_gender_prompts(Path(data["words"]), Path(data["templates"])))
    probe = encode_probe(loaded.tokenizer, ["Rain fell on the hill.", "Two and two are four."])
    measure = MaskProbe(loaded.model, loaded.layout, encoded, probe, pad_id=0, batch_size=4)
    base = measure([])
    pool = [(layer, "mlp.act", i) for layer in range(3) for i in range(0, 48, 3)]
    singles = {a: measure([a]) for a in pool}
    helpful = [a for a in pool if singles[a].bias < base.bias and singles[a].loss > base.loss + 1e-4]
    assert helpful, "the seed should give at least one debiasing neuron that costs probe loss"
    neuron = max(helpful, key=lambda a: singles[a].loss)
    rise = singles[neuron].loss - base.loss
    assert select_by_masking([neuron], measure, k=1, tolerance=rise * 0.9, group_size=1).kept == []
    assert select_by_masking([neuron], measure, k=1, tolerance=rise * 1.1, group_size=1).kept == [neuron]

    # MaskProbe's numbers against a hand-made zeroing hook and per-prompt logits
    layer, _, index = neuron
    down = loaded.model.model.layers[layer].mlp.down_proj

    def zero(_m, args):
        act = args[0].clone()
        act[..., index] = 0
        return (act,)

    handle = down.register_forward_pre_hook(zero)
    try:
        with torch.no_grad():
            gaps = []
            for p in encoded:
                logits = loaded.model(torch.tensor([p.ids])).logits[0, -1]
                gaps.append(abs(float(logits[p.female_id] - logits[p.male_id])))
            nll = [torch.nn.functional.cross_entropy(loaded.model(torch.tensor([ids])).logits[0, :-1],
                                                     torch.tensor(ids[1:]), reduction="sum") for ids in probe]
    finally:
        handle.remove()
    assert singles[neuron].bias == pytest.approx(sum(gaps) / len(gaps), abs=1e-5)
    assert singles[neuron].loss == pytest.approx(float(sum(nll)) / sum(len(ids) - 1 for ids in probe), abs=1e-5)


# --- runs -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", TESTED)
def test_locate_runs_and_respects_k_and_tolerance(arch, tiny_loaded, tmp_path):
    loaded = tiny_loaded(arch)
    data = write_data(tmp_path / "d")
    params = ine.IneParams(**data, k=4, candidates=6, group_size=2, loss_tolerance=0.02)
    result = ine.locate_ine(loaded, params, LocateContext())
    neurons = result.neuron_set.neurons
    assert 0 < len(neurons) <= 4
    pool = {c.address: c for c in result.pool}
    assert all(n.address in pool and n.score == pytest.approx(pool[n.address].score, abs=1e-6) for n in neurons)
    assert Counter(c.kind for c in result.pool) <= Counter({"ffn_value": 6, "attn_value": 6, "ffn_query": 6})
    # independent re-measurement of the kept set
    encoded = result.prompts[: params.causal_prompts]
    probe = encode_probe(loaded.tokenizer, ["Rain fell on the hill.", "Two and two are four.", "The bus is late."])
    measure = MaskProbe(loaded.model, loaded.layout, encoded, probe, pad_id=0)
    base, final = measure([]), measure([n.address for n in neurons])
    assert final.loss - base.loss <= 0.02 + 1e-6
    assert final.bias < base.bias


def test_locate_resumes_from_the_cache_and_registers(tiny_loaded, tmp_path, monkeypatch):
    loaded = tiny_loaded("llama")
    data = write_data(tmp_path / "d")
    spec = LocateSpec(method="ine", **data, k=2, candidates=4, report=str(tmp_path / "report.json"))
    ctx = LocateContext(cache_dir=tmp_path / "cache")
    first = run_locate(spec, loaded, ctx)
    assert first.method == "ine" and first.params["k"] == 2
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["prompts"] == 7 and set(report["pool"]) == {"ffn_value", "attn_value", "ffn_query"}
    kept = [tuple(k["neuron"]) for k in report["kept"]]
    assert sorted(kept) == sorted(n.address for n in first.neurons)  # one entry per kept neuron, no repeats
    assert all(set(k["kinds"]) <= {"ffn_value", "attn_value", "ffn_query"} and k["kinds"] for k in report["kept"])

    def fail(*_a, **_k):
        raise AssertionError("recomputed a cached item")

    for name in ("value_scores", "query_scores"):
        monkeypatch.setattr(ine, name, fail)
    monkeypatch.setattr(MaskProbe, "__call__", fail)
    second = run_locate(spec, loaded, ctx)
    assert second.neurons == first.neurons


def test_params_are_strict():
    with pytest.raises(RecipeError, match=r"locate\.top_k: Extra inputs"):
        validate_params(LocateSpec(method="ine", top_k=3))
    with pytest.raises(RecipeError, match=r"locate\.sites"):
        validate_params(LocateSpec(method="ine", sites=["attn.q"]))


@pytest.mark.parametrize("arch", ["gemma2", "gemma3_text"])
def test_unsupported_architectures_say_why(arch, tiny_loaded, tmp_path):
    loaded = tiny_loaded(arch)
    with pytest.raises(UnsupportedArchitecture, match=r"soft-capping|norms"):
        setup(loaded, write_data(tmp_path / "d"))


def test_pairs_with_the_same_first_token_are_rejected(tiny_loaded, tmp_path):
    loaded = tiny_loaded("llama")
    data = write_data(tmp_path / "d")
    Path(data["templates"]).write_text(json.dumps(
        [{"id": "bad", "template": "A {word} is a ", "categories": [], "female": "woman", "male": "wizard"}]))
    with pytest.raises(DataError, match="same token"):
        ine.locate_ine(loaded, ine.IneParams(**data), LocateContext())


# --- the package data -----------------------------------------------------------------------------------------


def test_common_words_and_templates():
    rows = read_jsonl(package_data_path("common_words.jsonl"), ("word", "category", "split"))
    cats = Counter(r["category"] for r in rows)
    assert set(cats) == {"traits", "actions", "professions", "hobbies", "colours"}
    assert len(rows) >= 500 and min(cats.values()) >= 100
    assert len({r["word"] for r in rows}) == len(rows)
    for cat, n in cats.items():
        held = sum(r["split"] == "heldout" for r in rows if r["category"] == cat)
        assert abs(held / n - 1 / 3) < 0.03, cat
    templates = json.loads(package_data_path("gender_word_templates.json").read_text())
    covered = Counter(c for t in templates for c in t["categories"])
    assert set(covered) == set(cats) and min(covered.values()) >= 2
    for t in templates:
        assert t["template"].count("{word}") == 1 and not t["template"].endswith(" ")
        assert (t["female"], t["male"]) in {(" she", " he"), (" woman", " man")}
    locate = load_gender_prompts()
    assert {p.word for p in locate}.isdisjoint({r["word"] for r in rows if r["split"] == "heldout"})


@pytest.mark.slow
def test_smollm2_scores_and_pairs(smollm2):
    """On the real model every template pair is two distinct single tokens, and the vectorised FFN scores equal
    explicit patching for a few neurons of two prompts."""
    tok = smollm2.tokenizer
    templates = json.loads(package_data_path("gender_word_templates.json").read_text())
    for t in templates:
        ids = [tok(w, add_special_tokens=False)["input_ids"] for w in (t["female"], t["male"])]
        assert all(len(i) == 1 for i in ids) and ids[0] != ids[1]
    prompts = load_gender_prompts()[:2]
    encoded = encode_prompts(tok, prompts)
    model, layout = smollm2.model, smollm2.layout
    parts = discover_parts(model, layout, torch.tensor(encoded[0].ids))
    batch = make_batch(encoded, 0)
    vs = value_scores(model, layout, parts, batch)
    store, _ = explicit_run(model, ARCH_PATHS["llama"], batch.ids, batch.mask)
    for b, p in enumerate(encoded):
        t = len(p.ids) - 1
        x = store["final"][b, t]
        base = gap_ref(model, ARCH_PATHS["llama"], x, x, p.female_id, p.male_id)
        sign = 1.0 if base >= 0 else -1.0
        for layer in (5, 29):
            down = model.model.layers[layer].mlp.down_proj
            act = store[("down", layer)][b, t]
            top = vs.ffn[b, layer].abs().topk(3).indices.tolist()
            vectors = torch.stack([act[i].double() * column(down, i) for i in top])
            ref = sign * (gap_ref(model, ARCH_PATHS["llama"], x + vectors, x.expand_as(vectors), p.female_id,
                                  p.male_id) - base)
            torch.testing.assert_close(vs.ffn[b, layer, top].double(), ref, atol=1e-4, rtol=1e-3)
