"""Benchmark of the evaluation engine on SmolLM2: per-example loop vs lm-eval-style batching vs shared contexts.

    BAKEEDIT_CACHE=/tmp/bkcache .venv/bin/python bench/eval_engine.py [--data-dir ../shared/data] [--items 16]

Scores the same multiple-choice requests (ARC-Easy, HellaSwag, PIQA, MMLU items drawn with a fixed seed, every option
of every item) four ways in one process and prints a table with examples (items) per second, wall and CPU time, the
forward tokens each strategy runs, the max |difference| of the log-likelihoods to the per-example loop, and the
speed-up over it:

- ``loop``: the straightforward per-example loop, one unpadded forward per (item, option) (the reference);
- ``flat``: lm-evaluation-harness's approach, requests sorted by length, right-padded batches, one forward over
  context + continuation per option;
- ``kv``: each context prefix run once into the KV cache, expanded to its options, then one pass over the options;
- ``packed``: bakeedit's default, one row per context with all its options after it and a 4D mask between them.

"forward tokens" counts the tokens each strategy feeds the model, and in brackets with the padding of its batches.

``--last-edit`` scores the model under a ``positions: last`` runtime edit (KnowBias's released form: ``--last-edit``
channels of every layer's ``mlp.gate`` scaled by 2 at the last position), which ``kv`` cannot reproduce (it is
left out) and ``packed`` reproduces with a copy of the context's last token for the one-token options of a context
that also has longer ones (docs/nonlinear.md, "Scoring with position-scoped edits").

Each strategy runs ``--repeats`` times, in turn, and the best time counts (the machine is shared; the best time is the
one least disturbed by other work).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from bakeedit.edit import build_plan, runtime_edit
from bakeedit.evaluate import Scorer, get_task
from bakeedit.evaluate.batching import packed_row_length, shared_batches
from bakeedit.evaluate.tasks.multiple_choice import MCItem
from bakeedit.models.arch import ModelLayout
from bakeedit.neurons import Neuron
from bakeedit.recipe import EditSpec

REPO = Path(__file__).resolve().parent.parent


def requests_for(data_dir: Path, items_per_task: int, seed: int) -> tuple[list[tuple[str, str]], int, dict[str, int]]:
    reqs: list[tuple[str, str]] = []
    counts: dict[str, int] = {}
    for name, per in (("arc_easy", 2), ("hellaswag", 1), ("piqa", 1), ("mmlu", 1)):
        items: list[MCItem] = get_task(name).load(data_dir, items_per_task * per, seed).items
        counts[name] = len(items)
        reqs += [r for it in items for r in it.requests()]
    return reqs, sum(counts.values()), counts


def forward_tokens(scorer: Scorer, reqs: list[tuple[str, str]], batch_size: int) -> dict[str, tuple[int, int]]:
    """Per strategy, the tokens fed to the model without and with padding: loop and flat run ``ctx + cont[:-1]``
    per request (loop unpadded, flat right-padded per batch, identical inputs sharing a row); kv runs each distinct
    context prefix once plus one segment per option; packed runs one row per context (context + all segments)."""
    toks = scorer.tokenize_requests(reqs)
    per_request = sum(len(t.ctx) + len(t.cont) - 1 for t in toks)
    prefixes = {tuple(t.ctx[:-1]) for t in toks}
    shared = sum(len(p) for p in prefixes) + sum(len(t.cont) for t in toks)
    flat_rows = {tuple(t.ctx + t.cont[:-1]): len(t.ctx) + len(t.cont) - 1 for t in toks}
    flat_padded = sum(max(b) * len(b) for b in (sorted(flat_rows.values(), reverse=True)[i:i + batch_size]
                                                 for i in range(0, len(flat_rows), batch_size)))
    kv_padded = 0
    for groups in shared_batches(toks, batch_size):
        rows = [r for g in groups for r in g]
        kv_padded += max(len(g[0].ctx) - 1 for g in groups) * len(groups) + max(len(r.cont) for r in rows) * len(rows)
    packed_padded = sum(max(map(packed_row_length, groups)) * len(groups)
                        for groups in shared_batches(toks, batch_size, packed=True))
    return {"loop": (per_request, per_request), "flat": (per_request, flat_padded), "kv": (shared, kv_padded),
            "packed": (shared, packed_padded)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default_data = Path(os.environ.get("BAKEEDIT_DATA_DIR", REPO.parent / "shared" / "data"))
    ap.add_argument("--data-dir", type=Path, default=default_data)
    ap.add_argument("--items", type=int, default=16, help="items per task (ARC-Easy gets twice as many)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default torch's). On a CPU shared with other jobs, 1 thread avoids the "
                         "per-operator wait for a descheduled second thread, which otherwise dominates the timings")
    ap.add_argument("--last-edit", type=int, default=0, metavar="N",
                    help="score under a positions: last edit of N mlp.gate channels per layer (kv left out)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from bakeedit.models import load_model

    loaded = load_model(args.model)
    if args.last_edit:
        layout = ModelLayout.for_model(loaded.model)
        chosen = [Neuron(layer=layer, site="mlp.gate", index=i)
                  for layer in range(layout.n_layers) for i in range(0, 7 * args.last_edit, 7)]
        plan = build_plan(chosen, EditSpec.model_validate({"lambda": 2.0, "positions": "last"}), layout)
        runtime_edit(loaded.model, layout, plan).__enter__()  # for the whole run: every strategy scores the edit
    reqs, n_items, counts = requests_for(args.data_dir, args.items, args.seed)
    scorers = {"loop": Scorer(loaded.model, loaded.tokenizer, batch_size=1)}
    for mode in ("flat", "packed") if args.last_edit else ("flat", "kv", "packed"):
        scorers[mode] = Scorer(loaded.model, loaded.tokenizer, batch_size=args.batch_size, mode=mode)
    run = {name: s.loglikelihood for name, s in scorers.items()}
    run["loop"] = scorers["loop"].loglikelihood_reference
    tokens = forward_tokens(scorers["packed"], reqs, args.batch_size)
    print(f"model {args.model}, {n_items} items {counts}, {len(reqs)} requests, batch size {args.batch_size}, "
          f"torch threads {torch.get_num_threads()}"
          + (f", under a last-position edit of {args.last_edit} mlp.gate channels per layer" if args.last_edit else ""),
          file=sys.stderr)

    best: dict[str, float] = {}
    best_cpu: dict[str, float] = {}
    scores: dict[str, list[float]] = {}
    for rep in range(args.repeats):
        for name, fn in run.items():
            t0, c0 = time.perf_counter(), time.process_time()
            res = fn(reqs)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            best[name] = min(best.get(name, float("inf")), dt)
            best_cpu[name] = min(best_cpu.get(name, float("inf")), dc)
            scores[name] = [r.logprob for r in res]
            print(f"  repeat {rep + 1}: {name:6s} {dt:7.2f} s wall, {dc:7.2f} s CPU", file=sys.stderr, flush=True)

    ref = scores["loop"]
    print()
    print("| strategy | wall s | CPU s | items/s | requests/s | forward tokens (with padding) | max abs diff vs loop "
          "| speed-up vs loop (wall) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in run:
        diff = max(abs(a - b) for a, b in zip(scores[name], ref, strict=True))
        print(f"| {name} | {best[name]:.2f} | {best_cpu[name]:.2f} | {n_items / best[name]:.2f} | "
              f"{len(reqs) / best[name]:.2f} | {tokens[name][0]} ({tokens[name][1]}) | {diff:.2e} | "
              f"{best['loop'] / best[name]:.2f}x |")
    print()
    for name in [n for n in ("kv", "packed") if n in run]:
        print(f"{name} vs loop: {best['loop'] / best[name]:.2f}x wall ({best_cpu['loop'] / best_cpu[name]:.2f}x CPU); "
              f"{name} vs flat (lm-eval's batching): {best['flat'] / best[name]:.2f}x wall "
              f"({best_cpu['flat'] / best_cpu[name]:.2f}x CPU)")


if __name__ == "__main__":
    main()
