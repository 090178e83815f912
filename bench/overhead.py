"""Inference speed of the baked model vs the base vs the base with the edit applied by runtime hooks (SmolLM2).

The point of baking: the edited checkpoint runs exactly as fast as the base (same modules, same shapes), while the
runtime form of the edit pays a Python hook (gather + multiply + scatter of the site's channels) per edited
``(layer, site)`` per forward pass. The edit here touches every layer: 20 ``mlp.act``, 10 ``attn.q`` and 10
``attn.v`` channels per layer, lambdas 0 and 1.5 (90 hooked sites); the baked folder is written by the streaming
fold from the cached safetensors copy of the embedded model.

Two workloads, in float32 on CPU, measured in interleaved rounds (base, hooks, baked, base copy; the order rotated
by one each round, so no variant always runs first) so that drift hits all variants alike:

- ``prefill``: one forward of an 8 x 32 batch (tokens/s = 256 / time);
- ``decode``: greedy generation of 32 new tokens for 4 prompts with the KV cache (tokens/s = 128 / time), where
  each step is small and a per-hook cost weighs most.

Each call is timed twice: wall clock, and the CPU time of this process. On a shared machine (here: 2 cores, a load
average of 10-15 from other jobs) wall time mostly measures waiting for a core; with one torch thread
(``--threads 1``, the default) the CPU time is the work done and is far steadier, so it is the headline number.
The table gives medians over rounds and the min-max spread. ``base copy`` (the base's weights loaded a second time,
after the baked model, the same way) measures the noise: the baked model is "as fast as the base" when its
difference to the base is within the base-vs-base-copy difference.

transformers memory-maps safetensors weights whose dtype needs no conversion, so a model computes on the page-cache
pages of its file, and decode on CPU is memory-bound: with the mappings kept (``--mmap``), the baked model, mapping
a file written seconds before, decoded 3.8% and 4.3% slower than the base in two runs, while the base copy, mapping
the base's long-cached file like the base, was within 0.3%. That measures where the pages came from, not the
weights; by default every variant's parameters are therefore copied into the process's own memory after loading.

    BAKEEDIT_CACHE=/tmp/bkcache .venv/bin/python bench/overhead.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from bakeedit.edit import build_plan, runtime_edit
from bakeedit.export.stream import stream_bake
from bakeedit.models import load_model
from bakeedit.neurons import Neuron
from bakeedit.recipe import EditSpec


def make_plan(layout):
    g = torch.Generator().manual_seed(0)
    neurons = []
    for layer in range(layout.n_layers):
        for site, count in (("mlp.act", 20), ("attn.q", 10), ("attn.v", 10)):
            for k, index in enumerate(torch.randperm(layout.site_size(site), generator=g)[:count].tolist()):
                neurons.append(Neuron(layer=layer, site=site, index=index, **{"lambda": 0.0 if k % 2 else 1.5}))
    return build_plan(neurons, EditSpec(), layout)


Timing = tuple[float, float]  # tokens per CPU second, tokens per wall second


def _timed(tokens: int, fn, *args) -> Timing:
    wall, cpu = time.perf_counter(), time.process_time()
    fn(*args)
    return tokens / (time.process_time() - cpu), tokens / (time.perf_counter() - wall)


@torch.no_grad()
def prefill(model, ids: torch.Tensor) -> Timing:
    return _timed(ids.numel(), lambda: model(ids, use_cache=False))


@torch.no_grad()
def decode(model, ids: torch.Tensor, new: int) -> Timing:
    def run() -> None:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, pad_token_id=0)
        assert out.shape[1] == ids.shape[1] + new

    return _timed(ids.shape[0] * new, run)


def materialize(model: torch.nn.Module) -> torch.nn.Module:
    """Copy every parameter and buffer into this process's own memory (see the module docstring)."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.data = t.data.clone()
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--mmap", action="store_true", help="keep the weights memory-mapped from their files")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    loaded = load_model("embedded")
    base = loaded.model
    plan = make_plan(loaded.layout)
    g = torch.Generator().manual_seed(1)
    prefill_ids = torch.randint(100, 40000, (8, 32), generator=g)
    decode_ids = torch.randint(100, 40000, (4, 16), generator=g)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        stream_bake(loaded.source.path, plan, Path(tmp) / "baked")
        bake_s = time.perf_counter() - start
        baked = AutoModelForCausalLM.from_pretrained(Path(tmp) / "baked", dtype=torch.float32).eval()
    # The noise reference: the base's own weights, loaded a second time the way the baked folder was. Two loads of
    # identical weights differ by a few % (where the allocator puts them), more than re-running one of them does.
    base_copy = AutoModelForCausalLM.from_pretrained(loaded.source.path, dtype=torch.float32).eval()
    if not args.mmap:
        base, baked, base_copy = (materialize(m) for m in (base, baked, base_copy))
    with torch.no_grad():
        with runtime_edit(base, loaded.layout, plan):
            hooked_logits = base(prefill_ids[:4]).logits
        delta = float((baked(prefill_ids[:4]).logits - hooked_logits).abs().max())
        scale = float(hooked_logits.abs().max())

    def hooked(fn):
        def run(*a):
            with runtime_edit(base, loaded.layout, plan):
                return fn(base, *a)
        return run

    variants = {
        "base": lambda fn: (lambda *a: fn(base, *a)),
        "hooks": hooked,
        "baked": lambda fn: (lambda *a: fn(baked, *a)),
        "base copy": lambda fn: (lambda *a: fn(base_copy, *a)),
    }
    workloads = {"prefill": (prefill, (prefill_ids,)), "decode": (decode, (decode_ids, 32))}
    for fn, a in workloads.values():  # warm-up: first calls allocate and pick kernels
        for wrap in variants.values():
            wrap(fn)(*a)
    results: dict[tuple[str, str], list[Timing]] = {(w, v): [] for w in workloads for v in variants}
    names = list(variants)
    for r in range(args.rounds):
        for w, (fn, a) in workloads.items():
            for v in names[r % len(names):] + names[: r % len(names)]:  # rotated: no variant always runs first
                results[(w, v)].append(variants[v](fn)(*a))

    print(f"SmolLM2-135M-Instruct, float32, CPU, {torch.get_num_threads()} torch thread(s), {args.rounds} rounds, "
          f"weights {'memory-mapped from their files' if args.mmap else 'copied into process memory'}; "
          f"edit: {plan.n_neurons} neurons in {len(plan.groups)} (layer, site) groups; streamed bake {bake_s:.1f} s; "
          f"max |baked - hooks| logit {delta:.1e} (max |logit| {scale:.1f})")
    print(f"\n{'workload':<9} {'variant':<13} {'tok/CPU-s':>10} {'min-max':>11} {'vs base':>8} {'tok/wall-s':>11} "
          f"{'vs base':>8}")
    med = {k: tuple(statistics.median(x[i] for x in xs) for i in (0, 1)) for k, xs in results.items()}
    for w in workloads:
        ref = med[(w, "base")]
        for v in variants:
            cpu = [x[0] for x in results[(w, v)]]
            print(f"{w:<9} {v:<13} {med[(w, v)][0]:>10.1f} {f'{min(cpu):.0f}-{max(cpu):.0f}':>11} "
                  f"{med[(w, v)][0] / ref[0]:>8.3f} {med[(w, v)][1]:>11.1f} {med[(w, v)][1] / ref[1]:>8.3f}")
    print()
    for w in workloads:
        base_cpu, hook_cpu, baked_cpu, copy = (med[(w, v)][0] for v in variants)
        print(f"{w} (CPU time): the hooks cost {1 - hook_cpu / base_cpu:.1%} of the base's throughput "
              f"({(1 / hook_cpu - 1 / baked_cpu) * 1e3:.2f} ms per token, which baking removes); baked vs base "
              f"{baked_cpu / base_cpu - 1:+.1%}, base copy vs base {copy / base_cpu - 1:+.1%}, baked vs base copy "
              f"{baked_cpu / copy - 1:+.1%}")

if __name__ == "__main__":
    main()
