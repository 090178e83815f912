"""How strong are a located set's neurons? Their activation magnitude and the KL of scaling them, against random.

    OMP_NUM_THREADS=1 python bench/neuron_strength.py NEURONS.json [NEURONS.json ...] [--lambda 2] [--seeds 5]

A control of equal count and lambda is not equal in strength (issue #13): this says by how much, for each neuron
set given (a ``bakeedit locate`` output on the embedded SmolLM2, or another model's with ``--model``):

* per located neuron, the percentile of its mean |activation| on the neutral passages
  (``bakeedit/data/neutral_text.txt``, the matched control's text) among the channels of its own layer and site,
  over every position but the first (the first token's activations are outliers in most LMs) and over the first
  alone; printed as the median percentile and the share of the set in its layer's top 1%;
* the mean KL from the base on the same text of scaling the set by ``--lambda`` (runtime hooks), and of scaling a
  random set of the same per-(layer, site) counts by the same lambda (``bakeedit.locate.random.random_like``, one
  draw per seed), and their ratio.

Numbers from one run on one machine; nothing is tuned here.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from bakeedit.edit import build_plan
from bakeedit.evaluate.disturbance import Disturbance
from bakeedit.locate.random import random_like
from bakeedit.models import load_model
from bakeedit.models.hookpoints import capture_sites
from bakeedit.neurons import NeuronSet
from bakeedit.recipe import EditSpec


@torch.no_grad()
def mean_abs_activations(loaded, batches: list[dict[str, torch.Tensor]],
                         addresses: list[tuple[int, str]]) -> dict[str, dict[tuple[int, str], torch.Tensor]]:
    """Mean |activation| per channel at each address over ``batches``: {"rest": ..., "first": ...}."""
    sums = {"rest": {}, "first": {}}
    counts = {"rest": 0, "first": 0}
    for batch in batches:
        mask = batch["attention_mask"].bool()
        first = torch.zeros_like(mask)
        first[:, 0] = True
        with capture_sites(loaded.model, loaded.layout, addresses) as store:
            loaded.model(**batch)
        for part, where in (("rest", mask & ~first), ("first", first)):
            counts[part] += int(where.sum())
            for address, act in store.items():
                total = act.float().abs()[where].sum(0)
                sums[part][address] = sums[part].get(address, 0) + total
    return {part: {a: s / counts[part] for a, s in sums[part].items()} for part in sums}


def percentiles(neurons: NeuronSet, magnitude: dict[tuple[int, str], torch.Tensor]) -> list[float]:
    """Each neuron's percentile (0-100) of magnitude among its own layer and site's channels."""
    out = []
    for n in neurons.neurons:
        values = magnitude[(n.layer, n.site)]
        out.append(100.0 * float((values < values[n.index]).float().mean()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("neurons", type=Path, nargs="+")
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--lambda", dest="lam", type=float, default=2.0)
    ap.add_argument("--seeds", type=int, default=5)
    opts = ap.parse_args()
    start, cpu = time.perf_counter(), time.process_time()
    loaded = load_model(opts.model)
    sets = {path: NeuronSet.load(path) for path in opts.neurons}
    addresses = sorted({(n.layer, n.site) for s in sets.values() for n in s.neurons})
    disturbance = Disturbance(loaded.model, loaded.layout, loaded.tokenizer)  # the neutral passages, batched
    magnitude = mean_abs_activations(loaded, disturbance.batches, addresses)
    edit = EditSpec(**{"lambda": opts.lam})

    def kl(neurons: NeuronSet) -> float:
        return disturbance.kl(build_plan(neurons.neurons, edit, loaded.layout))

    print(f"model {opts.model}; neutral text: {len(disturbance.texts)} passages, {disturbance.n_positions} "
          f"positions; lambda {opts.lam}; random: {opts.seeds} seeds of the same per-(layer, site) counts")
    print("| set | neurons | median pct (rest) | top 1% (rest) | median pct (first) | top 1% (first) | KL set | "
          "KL random (mean, min-max) | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path, neurons in sets.items():
        rest, first = percentiles(neurons, magnitude["rest"]), percentiles(neurons, magnitude["first"])
        located = kl(neurons)
        controls = [kl(random_like(neurons, loaded.layout, seed)) for seed in range(opts.seeds)]
        mean = statistics.fmean(controls)
        print(f"| {path} | {len(neurons.neurons)} | {statistics.median(rest):.1f} | "
              f"{sum(p >= 99 for p in rest) / len(rest):.0%} | {statistics.median(first):.1f} | "
              f"{sum(p >= 99 for p in first) / len(first):.0%} | {located:.4g} | {mean:.4g} "
              f"({min(controls):.3g}-{max(controls):.3g}) | {located / mean:.1f}x |")
    print(f"wall {time.perf_counter() - start:.0f} s, CPU {time.process_time() - cpu:.0f} s")


if __name__ == "__main__":
    main()
