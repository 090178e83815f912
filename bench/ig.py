"""Integrated-gradients cost per question on SmolLM2: the batched, prefix-cached engine against the naive loop.

Three implementations of the same attribution (``bakeedit.locate.knowbias.ig``, KnowBias's Attr_i), in one process:

- ``naive``: for every alpha step a full forward and backward of the whole prompt at batch 1 (no cache);
- ``cached``: the prompt prefix once through the KV cache, the m steps of a layer as one batch through every block;
- ``cached+shared`` (the default): as ``cached``, but the blocks below the attributed layer run once at batch 1.

Prints seconds per question for the chosen layers, the speed ratio against ``naive`` (target >= 3x) and the largest
difference of the attributions (target <= 1e-4 absolute; also given relative to the largest attribution).

    BAKEEDIT_CACHE=/tmp/bkcache .venv/bin/python bench/ig.py --questions 2 --layers 5,15,25
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from bakeedit.locate.knowbias.ig import answer_probability, frozen_parameters, integrated_gradients
from bakeedit.locate.knowbias.method import KnowBiasParams, choose_questions, load_questions, render
from bakeedit.models import load_model
from bakeedit.models.hookpoints import site_hooks


def naive_ig(model, layout, prompt, answer, layer: int, site: str, steps: int) -> torch.Tensor:
    """One full forward + backward per alpha step: the definition, with nothing shared."""
    last = len(prompt) - 1
    ids = torch.cat([prompt, answer[:-1]]).unsqueeze(0)
    total = torch.zeros(layout.site_size(site))
    h = torch.zeros(0)
    for k in range(1, steps + 1):
        z = torch.zeros(layout.site_size(site), requires_grad=True)
        seen = {}

        def scale(act, alpha=k / steps, z=z, seen=seen):
            seen["h"] = act[0, last].detach()
            new = act.clone()
            new[0, last] = alpha * act[0, last] + z
            return new

        with site_hooks(model, layout, {(layer, site): scale}):
            logits = model(ids).logits[:, last:]
        (grad,) = torch.autograd.grad(answer_probability(logits, answer).sum(), z)
        total += grad
        h = seen["h"]
    return h * total / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=2)
    ap.add_argument("--layers", default="5,15,25")
    ap.add_argument("--site", default="mlp.gate")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()

    loaded = load_model("embedded")
    model, layout = loaded.model, loaded.layout
    params = KnowBiasParams(steps=args.steps)
    questions = choose_questions(load_questions(), None, args.questions)
    cells = [(int(x), args.site) for x in args.layers.split(",")]
    rendered = [render(loaded.tokenizer, q, params) for q in questions]
    integrated_gradients(model, layout, *rendered[0], cells[:1], steps=2)  # warm-up (allocator, kernels)

    seconds = {"naive": 0.0, "cached": 0.0, "cached+shared": 0.0}
    results: dict[str, list[dict]] = {name: [] for name in seconds}
    for prompt, answer in rendered:
        start = time.perf_counter()
        with frozen_parameters(model):
            results["naive"].append({c: naive_ig(model, layout, prompt, answer, *c, args.steps) for c in cells})
        seconds["naive"] += time.perf_counter() - start
        for name, share in (("cached", False), ("cached+shared", True)):
            start = time.perf_counter()
            res = integrated_gradients(model, layout, prompt, answer, cells, args.steps, share_lower=share)
            seconds[name] += time.perf_counter() - start
            results[name].append(res.attributions)

    n = len(rendered)
    tokens = sum(len(p) + len(a) - 1 for p, a in rendered) / n
    print(f"SmolLM2-135M-Instruct, {torch.get_num_threads()} threads, {n} questions (mean {tokens:.0f} tokens), "
          f"site {args.site}, layers {args.layers}, m = {args.steps}; load average {os.getloadavg()[0]:.1f}")
    print(f"{'implementation':<16}{'s/question':>12}{'s/layer':>10}{'speed-up':>10}{'max|diff|':>12}{'rel.':>10}")
    for name, total in seconds.items():
        pairs = zip(results[name], results["naive"], strict=True)
        diffs = [float((r[c] - b[c]).abs().max()) for r, b in pairs for c in cells]
        scale = max(float(b[c].abs().max()) for b in results["naive"] for c in cells)
        print(f"{name:<16}{total / n:>12.2f}{total / n / len(cells):>10.2f}{seconds['naive'] / total:>9.1f}x"
              f"{max(diffs):>12.2e}{max(diffs) / scale:>10.1e}")
    full = seconds["cached+shared"] / n / len(cells) * layout.n_layers
    print(f"extrapolated to all {layout.n_layers} layers: {full:.1f} s/question with cached+shared (one site)")


if __name__ == "__main__":
    main()
