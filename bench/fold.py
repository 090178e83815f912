"""Streaming fold vs in-memory fold vs ``cp`` on a synthetic multi-GB Llama-style checkpoint.

Writes a random bf16 checkpoint shaped like Llama-3.2-3B with 14 of its 28 layers (hidden 3072, FFN 8192, 24
query / 8 kv heads, vocabulary 128,256, tied embeddings; 1.8 B parameters, 3.6 GB in 1 GB shards with an index,
as ``save_pretrained`` shards), then measures, each in its own process (peak RSS and bytes written from
``wait4``'s resource usage):

- ``cp``: a plain copy of the shards and the index (the throughput ceiling);
- ``stream``: ``bakeedit.export.stream.bake_checkpoint`` (staged output, config + index copied);
- ``in-memory``: ``from_pretrained(dtype=bfloat16)`` + ``fold_plan`` + ``save_pretrained`` (what ``apply`` does);
- ``verify``: ``bakeedit.export.verify_blocks`` on the streamed folder (exact + per-block functional checks).

The plan edits 60 channels in every layer (40 of ``mlp.act``, 10 of ``attn.q``, 10 of ``attn.v``; lambdas 0 and
1.5), so 3 tensors per layer, 29% of the bytes, are rewritten. Writes are timed as every tool leaves them (in the
page cache, no fsync); the ``sync`` that follows each step is timed separately. Afterwards every tensor of the
streamed and in-memory outputs is compared bit for bit. The synthetic checkpoint and the outputs are deleted at the
end unless ``--keep``. Prints a table, the ratios against ``cp`` and the targets of issue 7:
peak RSS <= 1.5 x largest tensor + 300 MB, throughput >= 50% of ``cp``.

    .venv/bin/python bench/fold.py [--layers 14] [--workdir /tmp/bakeedit-bench-fold]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import MB, Shape, make_checkpoint, measure  # bench/ is not a package


def shape(layers: int) -> Shape:
    """Llama-3.2-3B's block and vocabulary, ``layers`` of them, tied embeddings."""
    return Shape(hidden=3072, ffn=8192, heads=24, kv_heads=8, head_dim=128, vocab=128256, layers=layers, tie=True)


def make_plan(layers: int):
    from bakeedit.edit import build_plan
    from bakeedit.models.arch import ModelLayout
    from bakeedit.neurons import Neuron
    from bakeedit.recipe import EditSpec

    g = torch.Generator().manual_seed(1)
    layout = ModelLayout.for_config(shape(layers).config())
    neurons = []
    for layer in range(layers):
        for site, count in (("mlp.act", 40), ("attn.q", 10), ("attn.v", 10)):
            for k, index in enumerate(torch.randperm(layout.site_size(site), generator=g)[:count].tolist()):
                neurons.append(Neuron(layer=layer, site=site, index=index, **{"lambda": 0.0 if k % 2 else 1.5}))
    return build_plan(neurons, EditSpec(), layout)


def child(mode: str, base: Path, out: Path, plan_file: Path) -> None:
    """One measured path, in its own process; prints its in-process timings as JSON."""
    from bakeedit.edit.plan import EditPlan

    plan = EditPlan.model_validate_json(plan_file.read_text())
    t0 = time.perf_counter()
    timings = {}
    if mode == "stream":
        from bakeedit.export import stream

        real, first = stream._write_shard, []

        def timed(*a):  # marks the end of the set-up (config, layout, model skeleton, headers)
            first.append(first[0] if first else time.perf_counter())
            real(*a)

        stream._write_shard = timed
        stream.bake_checkpoint(base, plan, out)
        timings["bake"] = time.perf_counter() - t0
        timings["setup"] = first[0] - t0
        timings["write"] = timings["bake"] - timings["setup"]
    elif mode == "in-memory":
        from transformers import AutoModelForCausalLM

        from bakeedit.edit import fold_plan
        from bakeedit.models.arch import ModelLayout

        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        timings["load"] = time.perf_counter() - t0
        fold_plan(model, ModelLayout.for_model(model), plan)
        timings["fold"] = time.perf_counter() - t0 - timings["load"]
        model.save_pretrained(out, max_shard_size="1GB")
        timings["bake"] = time.perf_counter() - t0
    elif mode == "verify":
        from bakeedit.export.verify_blocks import verify_blocks

        check = verify_blocks(base, out, plan)
        timings["bake"] = time.perf_counter() - t0
        timings["passed"] = check.result.passed
        timings["max_delta"] = check.result.max_abs_logit_delta
        timings["tolerance"] = check.result.tolerance
    print(json.dumps(timings))


def compare(a: Path, b: Path) -> tuple[int, int]:
    """(identical, total) tensors of two checkpoint folders, bit for bit, one tensor at a time."""
    from bakeedit.io.shards import Checkpoint

    ca, cb = Checkpoint.open(a), Checkpoint.open(b)
    same = 0
    for name in ca.where:
        x, y = ca.read(name), cb.read(name)
        same += int(x.shape == y.shape and torch.equal(x.view(torch.int16), y.view(torch.int16)))
    return same, len(ca.where)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=14)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bakeedit-bench-fold"))
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--child", nargs=4, metavar=("MODE", "BASE", "OUT", "PLAN"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        mode, base, out, plan = args.child
        return child(mode, Path(base), Path(out), Path(plan))

    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    base = work / "base"
    try:
        t0 = time.perf_counter()
        info = make_checkpoint(base, shape(args.layers))
        (work / "plan.json").write_text(make_plan(args.layers).model_dump_json())
        os.sync()
        print(f"synthetic checkpoint: {info['params'] / 1e9:.2f} B params, {info['bytes'] / 1e9:.2f} GB in "
              f"{info['shards']} shards, largest tensor {info['largest'] / MB:.0f} MiB "
              f"(made in {time.perf_counter() - t0:.0f} s)")
        files = [str(p) for p in sorted(base.glob("model*"))]
        (work / "cp").mkdir()
        rows = {"cp": measure(["cp", *files, str(work / "cp")])}
        shutil.rmtree(work / "cp")
        me = [sys.executable, __file__, "--child"]
        rows["stream"] = measure([*me, "stream", str(base), str(work / "stream"), str(work / "plan.json")])
        rows["in-memory"] = measure([*me, "in-memory", str(base), str(work / "memory"), str(work / "plan.json")])
        rows["verify"] = measure([*me, "verify", str(base), str(work / "stream"), str(work / "plan.json")])
        same, total = compare(work / "stream", work / "memory")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    budget = 1.5 * info["largest"] / MB + 300
    cp_rate = info["bytes"] / MB / rows["cp"]["wall"]
    print(f"\n{'path':<10} {'wall s':>7} {'in-proc s':>9} {'+sync s':>8} {'peak RSS MiB':>13} {'written MiB':>12} "
          f"{'MiB/s':>7} {'vs cp':>6}")
    for name, r in rows.items():
        rate = info["bytes"] / MB / r["wall"]
        inproc = f"{r['bake']:.1f}" if "bake" in r else "-"
        print(f"{name:<10} {r['wall']:>7.1f} {inproc:>9} {r['sync']:>8.1f} {r['rss_mb']:>13.0f} "
              f"{r['written_mb']:>12.0f} {rate:>7.0f} {rate / cp_rate:>6.2f}")
    s, m = rows["stream"], rows["in-memory"]
    print(f"\nshards: {info['bytes'] / MB:.0f} MiB; 'written' is the process's block output (getrusage ru_oublock, "
          "pages it dirtied), 'MiB/s' is shard MiB / wall s")
    save = m["bake"] - m["load"] - m["fold"]
    print(f"in-memory split: load {m['load']:.1f} s, fold {m['fold']:.1f} s, save {save:.1f} s")
    print(f"streamed vs in-memory tensors bit-identical: {same}/{total}")
    print(f"streamed verification: passed={rows['verify']['passed']} max|delta| {rows['verify']['max_delta']:.2e} "
          f"<= {rows['verify']['tolerance']:.2e}")
    print(f"stream / in-memory: wall {s['wall'] / m['wall']:.2f}x, peak RSS {s['rss_mb'] / m['rss_mb']:.2f}x")
    print(f"target peak RSS <= 1.5 x {info['largest'] / MB:.0f} MiB + 300 = {budget:.0f} MiB: stream "
          f"{s['rss_mb']:.0f} MiB -> {'met' if s['rss_mb'] <= budget else 'MISSED'}")
    ratio, call, write = (rows["cp"]["wall"] / s[k] for k in ("wall", "bake", "write"))
    print(f"stream set-up (config, layout, meta-device skeleton, headers): {s['setup']:.1f} s; shard writing "
          f"{s['write']:.1f} s = {info['bytes'] / MB / s['write']:.0f} MiB/s")
    print(f"target throughput >= 50% of cp: stream {ratio:.0%} of cp (whole process, incl. python + torch import), "
          f"{call:.0%} (bake call), {write:.0%} (shard writing) -> whole process {'met' if ratio >= 0.5 else 'MISSED'}"
          f", writing {'met' if write >= 0.5 else 'MISSED'}")


if __name__ == "__main__":
    main()
