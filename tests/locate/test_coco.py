"""``coco``: the InfoNCE score against an explicit-loop reference, a planted neuron, every architecture, caching."""

from __future__ import annotations

import json
import math

import pytest
import torch
from coco_helpers import loaded_tiny, write_contrast_file

import bakeedit.locate.coco.responses as responses_mod
from bakeedit.data.contrast import ContrastItem
from bakeedit.errors import RecipeError, UnsupportedArchitecture
from bakeedit.locate import LocateContext, run_locate
from bakeedit.locate.cache import ItemCache
from bakeedit.locate.coco.responses import RecordItem, record_last_tokens, render_ids, tensor_name
from bakeedit.locate.coco.score import chance_loss, cohens_d, infonce_loss, score_site
from bakeedit.locate.coco.select import score_categories
from bakeedit.models.hookpoints import capture_sites, site_hooks
from bakeedit.recipe import LocateSpec

# ------------------------------------------------------------------------------------------- slow references


def reference_infonce(x: torch.Tensor, y: torch.Tensor, tau: float) -> list[float]:
    """The definition, one neuron and one pair at a time, in plain Python floats."""
    n_x, t, n_neurons = x.shape
    losses = []
    for c in range(n_neurons):
        responses = [[float(x[i, p, c]) for p in range(t)] for i in range(n_x)]
        responses += [[float(y[i, p, c]) for p in range(t)] for i in range(len(y))]
        labels = [0] * n_x + [1] * len(y)
        n = len(responses)
        means = [sum(responses[i][p] for i in range(n)) / n for p in range(t)]
        centred = [[responses[i][p] - means[p] for p in range(t)] for i in range(n)]
        sigma = math.sqrt(sum(v * v for row in centred for v in row) / (n * t))
        z = [[v / sigma for v in row] for row in centred]

        def sim(i: int, j: int, z=z) -> float:
            return -sum((z[i][p] - z[j][p]) ** 2 for p in range(t)) / t / tau

        total, pairs = 0.0, 0
        for i in range(n):
            negatives = [j for j in range(n) if labels[j] != labels[i]]
            for p in range(n):
                if p == i or labels[p] != labels[i]:
                    continue
                numerator = math.exp(sim(i, p))
                denominator = numerator + sum(math.exp(sim(i, j)) for j in negatives)
                total += -math.log(numerator / denominator)
                pairs += 1
        losses.append(total / pairs)
    return losses


def test_infonce_matches_explicit_loops():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 7, generator=g, dtype=torch.float64)
    y = torch.randn(4, 3, 7, generator=g, dtype=torch.float64) + torch.linspace(-2, 2, 7, dtype=torch.float64)
    for tau in (0.5, 1.0, 2.0):
        fast = infonce_loss(x, y, tau)
        assert fast.tolist() == pytest.approx(reference_infonce(x, y, tau), rel=1e-10, abs=1e-12)


def test_cohens_d_matches_textbook_formula():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 4, 3, generator=g) + 1.0, torch.randn(5, 4, 3, generator=g)
    got = cohens_d(x, y)
    for c in range(3):
        mx = [float(x[i, :, c].double().mean()) for i in range(6)]
        my = [float(y[i, :, c].double().mean()) for i in range(5)]
        ax, ay = sum(mx) / 6, sum(my) / 5
        var_x = sum((v - ax) ** 2 for v in mx) / 5
        var_y = sum((v - ay) ** 2 for v in my) / 4
        pooled = math.sqrt((5 * var_x + 4 * var_y) / 9)
        assert float(got[c]) == pytest.approx((ax - ay) / pooled, rel=1e-6)


def test_loss_is_chance_for_constant_and_near_zero_for_separated_neurons():
    g = torch.Generator().manual_seed(2)
    n, t = 6, 4
    noise = 1e-3 * torch.randn(2 * n, t, 1, generator=g)
    constant = torch.full((2 * n, t, 1), 3.0)
    separated = torch.cat([torch.full((n, t, 1), 1.0), torch.full((n, t, 1), -1.0)]) + noise
    x = torch.cat([constant[:n], separated[:n]], dim=-1)
    y = torch.cat([constant[n:], separated[n:]], dim=-1)
    scores = score_site(x, y, temperature=0.25)
    assert scores.degenerate.tolist() == [True, False]
    assert float(scores.loss[0]) == pytest.approx(chance_loss(n, n)) == pytest.approx(math.log(1 + n))
    # z = +-1: within-set distance ~0, across-set distance 4 -> l = log(1 + n e^{-4/tau})
    assert float(scores.loss[1]) == pytest.approx(math.log1p(n * math.exp(-4 / 0.25)), rel=1e-2)
    assert float(scores.score[1]) > 0.99 and float(scores.score[0]) == pytest.approx(0.0, abs=1e-12)
    assert float(scores.cohens_d[1]) > 100


def test_loss_does_not_depend_on_the_neurons_scale_or_offset():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(5, 4, 2, generator=g), torch.randn(5, 4, 2, generator=g) + 0.7
    base = infonce_loss(x, y)
    assert infonce_loss(1e3 * x - 5, 1e3 * y - 5).tolist() == pytest.approx(base.tolist(), rel=1e-6)


def test_selection_keeps_k_per_category_and_unites_them():
    """Category a separates channels 0 (strongly) and 1; category b channels 1 (strongly) and 2."""
    g = torch.Generator().manual_seed(4)
    n, t, channels = 6, 3, 50
    strength = {"a": {0: 3.0, 1: 1.5}, "b": {1: 3.0, 2: 1.5}}
    responses, groups = {}, {}
    for category, shifts in strength.items():
        groups[category] = [ContrastItem(f"{category}{i}", category, "c", "q", "nq", {}, "locate") for i in range(n)]
        for item in groups[category]:
            x, y = torch.randn(t, channels, generator=g), torch.randn(t, channels, generator=g)
            for channel, shift in shifts.items():
                x[:, channel] += shift
                y[:, channel] -= shift
            responses[item.id] = {tensor_name("x", 0, "attn.q"): x, tensor_name("y", 0, "attn.q"): y}
    result = score_categories(responses, groups, 1, ["attn.q"], 1.0, top_fraction=0.04)
    assert {c: r["k"] for c, r in result.categories.items()} == {"a": 2, "b": 2}
    assert set(result.selected) == {(0, "attn.q", 0), (0, "attn.q", 1), (0, "attn.q", 2)}
    both = result.selected[(0, "attn.q", 1)]
    assert both["categories"] == ["a", "b"]
    single = {c: score_site(*(torch.stack([responses[it.id][tensor_name(p, 0, "attn.q")] for it in groups[c]])
                              for p in "xy"), 1.0) for c in "ab"}
    assert both["score"] == pytest.approx(max(float(single[c].score[1]) for c in "ab"))
    assert result.neuron_set().neurons[1].score == pytest.approx(both["score"], abs=1e-6)
    for category in "ab":
        assert result.categories[category]["n_beyond_null_best"] >= 1


def planted_categories(seed: int, shifts_by_category: dict[str, dict[int, float]], n: int = 6, t: int = 3,
                       channels: int = 50):
    g = torch.Generator().manual_seed(seed)
    responses, groups = {}, {}
    for category, shifts in shifts_by_category.items():
        groups[category] = [ContrastItem(f"{category}{i}", category, "c", "q", "nq", {}, "locate") for i in range(n)]
        for item in groups[category]:
            x, y = torch.randn(t, channels, generator=g), torch.randn(t, channels, generator=g)
            for channel, shift in shifts.items():
                x[:, channel] += shift
                y[:, channel] -= shift
            responses[item.id] = {tensor_name("x", 0, "attn.q"): x, tensor_name("y", 0, "attn.q"): y}
    return responses, groups


def test_overall_selection_keeps_top_fraction_of_all_neurons_by_best_category():
    """The overall ranking against the definition: score = 1 - loss / chance per category from the explicit loops,
    best category per neuron, the k best neurons; and the set size is exactly k whatever the overlap."""
    shifts = {"a": {0: 3.0, 1: 1.5, 4: 0.8}, "b": {1: 3.0, 2: 1.5, 4: 0.8}, "c": {3: 2.0, 5: 1.0}}
    responses, groups = planted_categories(5, shifts, n=5)
    result = score_categories(responses, groups, 1, ["attn.q"], 1.0, top_fraction=0.1, selection="overall")
    best: dict[int, float] = {}
    per_category: dict[str, list[float]] = {}
    for category, items in groups.items():
        x, y = (torch.stack([responses[it.id][tensor_name(p, 0, "attn.q")] for it in items]) for p in "xy")
        losses = reference_infonce(x.double(), y.double(), 1.0)
        per_category[category] = [1 - v / chance_loss(len(x), len(y)) for v in losses]
        for c, v in enumerate(per_category[category]):
            best[c] = max(best.get(c, -math.inf), v)
    want = sorted(best, key=lambda c: (-best[c], c))[:5]  # k = round(0.1 * 50)
    assert sorted(a[2] for a in result.selected) == sorted(want)
    assert len(result.selected) == 5 == result.report()["selection"]["k"]
    threshold = best[want[-1]]
    assert result.report()["selection"]["score_threshold"] == pytest.approx(threshold, rel=1e-9)
    for (_, _, c), stats in result.selected.items():
        assert stats["score"] == pytest.approx(best[c], rel=1e-9)
        assert sorted(stats["categories"]) == sorted(k for k, v in per_category.items() if v[c] >= threshold - 1e-12)
    # per category (the default) unites each category's own k: larger than k when categories disagree
    union = score_categories(responses, groups, 1, ["attn.q"], 1.0, top_fraction=0.1)
    assert 5 < len(union.selected) <= 15 and union.report()["selection"]["mode"] == "per_category"


# ----------------------------------------------------------------------------------------------- end to end


def locate(loaded, tmp_path, cache_dir=None, **params):
    prompts = params.pop("prompts", None) or write_contrast_file(tmp_path / "contrast.jsonl")
    params = {"answer_format": "raw", "report": "report.json", **params}
    spec = LocateSpec(method="coco", prompts=str(prompts), **params)
    return run_locate(spec, loaded, LocateContext(cache_dir=cache_dir, base_dir=tmp_path))


def test_planted_neuron_is_ranked_first(tmp_path):
    """A v channel that reads +c on every X prompt and -c on every Y prompt (plus noise) must come out on top."""
    loaded = loaded_tiny("llama")
    path = write_contrast_file(tmp_path / "contrast.jsonl", per_category=6)
    x_ids = set()
    for line in path.read_text().splitlines():
        item = json.loads(line)
        x_ids.add(tuple(render_ids(loaded.tokenizer, f"{item['context']} {item['question']}", "raw")))
    seen: dict[str, torch.Tensor] = {}

    def remember(_module, _args, kwargs):
        seen["ids"], seen["mask"] = kwargs["input_ids"], kwargs["attention_mask"]

    g = torch.Generator().manual_seed(0)

    def plant(act: torch.Tensor) -> torch.Tensor:
        rows = [tuple(ids[mask.bool()].tolist()) in x_ids for ids, mask in zip(seen["ids"], seen["mask"], strict=True)]
        sign = torch.tensor([1.0 if is_x else -1.0 for is_x in rows])
        out = act.clone()
        out[..., 3] = 2.0 * sign[:, None] + 0.1 * torch.randn(act.shape[:2], generator=g)
        return out

    handle = loaded.model.register_forward_pre_hook(remember, with_kwargs=True)
    try:
        with site_hooks(loaded.model, loaded.layout, {(2, "attn.v"): plant}):
            ns = locate(loaded, tmp_path, prompts=path, top_fraction=0.02)
    finally:
        handle.remove()
    top = max(ns.neurons, key=lambda n: n.score)
    assert top.address == (2, "attn.v", 3)
    assert top.score > 0.9
    report = json.loads((tmp_path / "report.json").read_text())
    first = report["neurons"][0]
    assert (first["layer"], first["site"], first["index"]) == (2, "attn.v", 3)
    assert first["cohens_d"] > 5 and sorted(first["categories"]) == ["cat", "dog"]
    assert all(report["categories"][c]["n_beyond_null_best"] >= 1 for c in ("cat", "dog"))


@pytest.mark.parametrize("arch_name", ["llama", "qwen2", "gpt2", "gpt_neox"])
def test_runs_on_every_family_with_the_chat_template(tmp_path, arch_name):
    loaded = loaded_tiny(arch_name)
    ns = locate(loaded, tmp_path, answer_format="chat", top_fraction=0.05)
    layout = loaded.layout
    n_scored = layout.n_layers * (layout.site_size("attn.q") + layout.site_size("attn.v"))
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["answer_format"] == "chat"
    for category in ("cat", "dog"):
        stats = report["categories"][category]
        assert stats["n_items"] == 5 and stats["n_scored"] == n_scored
        assert stats["k"] == round(0.05 * n_scored) == sum(stats["per_site"].values())
    assert max(r["k"] for r in report["categories"].values()) <= len(ns.neurons) <= 2 * round(0.05 * n_scored)
    assert {n.site for n in ns.neurons} <= {"attn.q", "attn.v"}
    assert len({n.address for n in ns.neurons}) == len(ns.neurons)
    assert all(n.score is not None and n.score <= 1 for n in ns.neurons)
    assert ns.params["sites"] == ["attn.q", "attn.v"] and ns.method == "coco"
    assert report["n_selected"] == len(ns.neurons) == sum(report["per_site"].values())
    # the per-layer x per-site distribution is the NeuronSet's own histogram
    assert report["per_layer_site"] == {f"{layer}/{site}": n for (layer, site), n in ns.histogram().items()}
    deep = sum(n.layer >= layout.n_layers // 2 for n in ns.neurons) / len(ns.neurons)
    assert report["share_in_deeper_half"] == pytest.approx(deep)


def test_overall_selection_from_the_recipe_block_keeps_exactly_the_fraction(tmp_path):
    loaded = loaded_tiny("llama")
    ns = locate(loaded, tmp_path, top_fraction=0.05, selection="overall")
    layout = loaded.layout
    n_scored = layout.n_layers * (layout.site_size("attn.q") + layout.site_size("attn.v"))
    assert len(ns.neurons) == round(0.05 * n_scored) and ns.params["selection"] == "overall"
    report = json.loads((tmp_path / "report.json").read_text())
    threshold = report["selection"].pop("score_threshold")
    assert report["selection"] == {"mode": "overall", "top_fraction": 0.05, "n_scored": n_scored, "k": len(ns.neurons)}
    assert threshold == pytest.approx(min(n.score for n in ns.neurons), abs=1e-6)  # NeuronSet scores are rounded


def test_mlp_act_site_and_missing_site(tmp_path):
    ns = locate(loaded_tiny("gpt2"), tmp_path, sites=["mlp.act", "attn.v"], top_fraction=0.1)
    assert {n.site for n in ns.neurons} <= {"mlp.act", "attn.v"} and ns.params["sites"] == ["attn.v", "mlp.act"]
    with pytest.raises(UnsupportedArchitecture, match=r"mlp\.gate"):
        locate(loaded_tiny("gpt2"), tmp_path, sites=["mlp.gate"])


def test_bad_parameters_name_the_field(tmp_path):
    with pytest.raises(RecipeError, match=r"locate\.top_fration"):
        locate(loaded_tiny(), tmp_path, top_fration=0.1)
    with pytest.raises(RecipeError, match=r"locate\.sites\.0"):
        locate(loaded_tiny(), tmp_path, sites=["attn.z"])


def test_batched_responses_equal_one_prompt_at_a_time():
    """Right padding must not change the last-token activations; and they are the last t positions."""
    loaded = loaded_tiny("qwen2")
    texts = ["Ann met.", "Bo and Cy sat down here.", "Di?", "Ed and Fay ate a big meal."]
    items = [RecordItem(key=str(i), prompts={"x": render_ids(loaded.tokenizer, s, "raw")}) for i, s in enumerate(texts)]
    addresses = [(0, "attn.q"), (2, "attn.v")]
    batched = record_last_tokens(loaded, items, addresses, 3, batch_size=4, cache=ItemCache(None, {}))
    for item in items:
        ids = torch.tensor([item.prompts["x"]])
        with torch.no_grad(), capture_sites(loaded.model, loaded.layout, addresses) as store:
            loaded.model(input_ids=ids)
        for layer, site in addresses:
            alone = store[(layer, site)][0, -3:]
            torch.testing.assert_close(batched[item.key][tensor_name("x", layer, site)], alone, atol=1e-5, rtol=1e-5)


def test_cached_run_skips_the_model_and_gives_the_same_set(tmp_path, monkeypatch):
    loaded = loaded_tiny("llama")
    calls = []
    forward = responses_mod._forward
    monkeypatch.setattr(responses_mod, "_forward", lambda *a: (calls.append(1), forward(*a))[1])
    first = locate(loaded, tmp_path, cache_dir=tmp_path / "cache", batch_size=3, top_fraction=0.05)
    assert len(calls) == 4  # 2 categories x 5 items, 3 items per batch
    second = locate(loaded, tmp_path, cache_dir=tmp_path / "cache", batch_size=3, top_fraction=0.05)
    assert len(calls) == 4
    assert second.neurons == first.neurons
    other = locate(loaded, tmp_path, cache_dir=tmp_path / "cache", batch_size=3, last_tokens=2, top_fraction=0.05)
    assert len(calls) == 8  # a parameter that changes the responses misses the cache
    assert other.neurons != first.neurons


@pytest.mark.slow
def test_smollm2_small_run(smollm2, tmp_path):
    spec = LocateSpec(method="coco", categories=["gender", "age"], max_items=3, null_permutations=0, report="r.json")
    ns = run_locate(spec, smollm2, LocateContext(base_dir=tmp_path))
    report = json.loads((tmp_path / "r.json").read_text())
    k = round(0.01 * 30 * (576 + 192))
    assert report["answer_format"] == "chat"
    assert [report["categories"][c]["k"] for c in ("gender", "age")] == [k, k]
    assert k <= len(ns.neurons) <= 2 * k
    # Layer 0 sees the same chat-template tokens at the last positions of every prompt: nothing there varies.
    assert report["mean_score_per_layer_site"]["gender"]["0/attn.q"] == 0.0
    assert min(n.layer for n in ns.neurons) >= 1
