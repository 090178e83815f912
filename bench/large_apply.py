"""``bakeedit apply``, ``verify --blocks`` and blockwise ``locate`` on a checkpoint larger than this machine's memory.

Writes a random Llama-shaped bf16 checkpoint (hidden 4096, FFN 11008, 32 query / 8 kv heads: Llama-2-7B's block,
SmolLM2's 49,152-token vocabulary and tokenizer so that prompts can be put to it, untied embeddings) with as many
blocks as it takes to exceed ``--target-gb`` (default: 1.15 x MemTotal, at least 26 GB), sharded in 1 GB shards
with an index as ``save_pretrained`` shards. Then, each in its own process (wall, CPU time and peak RSS from
``wait4``), with the page cache of the files read dropped first (``posix_fadvise``) so each step reads the disk:

1. ``cp`` of the shards (the throughput ceiling), then the copy is deleted;
2. ``bakeedit apply RECIPE -o OUT`` with a neuron list and a linear scale edit and *no* ``--low-memory``: apply must
   see that the checkpoint does not fit and take the low-memory path by itself (stream + block verification,
   provenance, card); its ``bakeedit.json`` is read back for the path it took and the verification;
3. ``bakeedit verify --blocks OUT``;
4. ``bakeedit locate`` with COCO (2 prompt pairs a category for 2 categories) and KnowBias (2 questions, IG over
   the last block, 4 steps) in ``execution: blockwise`` on the same checkpoint: peak RSS against one block (in
   the float32 it runs in) + activations + 500 MB, and seconds per prompt.

Disk: the base plus the baked copy (about 2 x the checkpoint + 2 GB); it says how much is needed when short.
Every file is deleted at the end unless ``--keep``.

    flock /tmp/bk-heavy.lock .venv/bin/python bench/large_apply.py [--target-gb 28] [--workdir /work/bench-large]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import MB, Shape, drop_page_cache_of, load_average, make_checkpoint, measure  # bench/: no package

GB = 1e9
BAKEEDIT = [sys.executable, "-m", "bakeedit.cli"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def mem_total() -> int:
    """MemTotal of /proc/meminfo, in bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise SystemExit("no MemTotal in /proc/meminfo")


def shape_for(target_bytes: float) -> Shape:
    """Llama-2-7B's block with as many layers as exceed ``target_bytes`` in bf16."""
    one = Shape(hidden=4096, ffn=11008, heads=32, kv_heads=8, head_dim=128, vocab=49152, layers=1, tie=False)
    outside = one.n_bytes() - one.block_bytes()
    layers = math.ceil((target_bytes - outside) / one.block_bytes())
    return Shape(**{**one.__dict__, "layers": layers})


def copy_tokenizer(folder: Path) -> None:
    """SmolLM2's tokenizer (from the embedded model's converted folder), so the locate prompts can be tokenised."""
    from bakeedit.models.embedded import embedded_gguf_path, gguf_to_safetensors

    source = gguf_to_safetensors(embedded_gguf_path())
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, folder / name)


def neurons(shape: Shape) -> list[dict]:
    """60 channels in each of 4 blocks spread over the depth (40 mlp.act, 10 attn.q, 10 attn.v), lambdas 0 / 1.5."""
    import torch

    g = torch.Generator().manual_seed(1)
    sizes = {"mlp.act": shape.ffn, "attn.q": shape.heads * shape.head_dim, "attn.v": shape.kv_heads * shape.head_dim}
    out = []
    for layer in sorted({0, shape.layers // 3, 2 * shape.layers // 3, shape.layers - 1}):
        for site, count in (("mlp.act", 40), ("attn.q", 10), ("attn.v", 10)):
            for k, index in enumerate(torch.randperm(sizes[site], generator=g)[:count].tolist()):
                out.append({"layer": layer, "site": site, "index": index, "lambda": 0.0 if k % 2 else 1.5})
    return out


def write_recipes(work: Path, base: Path, shape: Shape) -> dict[str, Path]:
    model = {"id": str(base), "dtype": "auto"}
    recipes = {
        "apply": {"name": "large-apply", "model": model, "neurons": neurons(shape), "edit": {"type": "scale"}},
        "coco": {"name": "large-coco", "model": model, "edit": {"type": "scale", "lambda": 1.5},
                 "locate": {"method": "coco", "execution": "blockwise", "categories": ["gender", "religion"],
                            "max_items": 2, "batch_size": 4, "null_permutations": 0, "answer_format": "raw"}},
        "knowbias": {"name": "large-knowbias", "model": model, "edit": {"type": "scale", "lambda": 0.0},
                     "locate": {"method": "knowbias", "execution": "blockwise", "max_questions": 2, "steps": 4,
                                "layers": [shape.layers - 1], "answer_format": "raw", "dimensions": ["gender"]}},
    }
    paths = {}
    for name, raw in recipes.items():
        paths[name] = work / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(raw, sort_keys=False))
    return paths


def row(name: str, r: dict, extra: str = "") -> str:
    return f"{name:<22} {r['wall']:>8.1f} {r['cpu']:>8.1f} {r['rss_mb']:>13.0f}  {extra}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target-gb", type=float, default=None, help="checkpoint size (default 1.15 x MemTotal, >= 26)")
    ap.add_argument("--workdir", type=Path, default=Path("/work/bench-large"))
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and outputs")
    ap.add_argument("--skip-locate", action="store_true")
    args = ap.parse_args()

    memory = mem_total()
    target = args.target_gb * GB if args.target_gb else max(26 * GB, 1.15 * memory)
    shape = shape_for(target)
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.parent.mkdir(parents=True, exist_ok=True)
    need = 2 * shape.n_bytes() + 2 * GB
    free = shutil.disk_usage(work.parent).free
    if free < need:
        raise SystemExit(f"{work.parent}: {free / GB:.1f} GB free, {need / GB:.1f} GB needed (the checkpoint, its "
                         "baked copy and 2 GB); free space or pass --target-gb / --workdir on a larger disk")
    print(f"machine: MemTotal {memory / GB:.1f} GB, {os.cpu_count()} CPUs, {free / GB:.0f} GB free at {work.parent}; "
          f"load average {load_average()} ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})")
    base, out = work / "base", work / "baked"
    env = {**os.environ, "BAKEEDIT_PROGRESS": "plain"}
    rows: dict[str, dict] = {}
    try:
        t0 = time.perf_counter()
        info = make_checkpoint(base, shape)
        copy_tokenizer(base)
        os.sync()
        print(f"synthetic checkpoint: {shape.layers} blocks, {info['params'] / 1e9:.1f} B params, "
              f"{info['bytes'] / GB:.1f} GB in {info['shards']} shards ({info['bytes'] / memory:.2f} x MemTotal), "
              f"one block {shape.block_bytes() / MB:.0f} MiB in bf16 (made in {time.perf_counter() - t0:.0f} s)")
        recipes = write_recipes(work, base, shape)

        drop_page_cache_of(base)
        (work / "cp").mkdir()
        rows["cp"] = measure(["cp", *map(str, sorted(base.glob("model*"))), str(work / "cp")])
        shutil.rmtree(work / "cp")

        drop_page_cache_of(base)
        rows["apply"] = measure([*BAKEEDIT, "apply", str(recipes["apply"]), "-o", str(out)], env=env)
        record = json.loads((out / "bakeedit.json").read_text())
        drop_page_cache_of(base)
        drop_page_cache_of(out)
        rows["verify --blocks"] = measure([*BAKEEDIT, "verify", "--blocks", str(out)], env=env)
        shutil.rmtree(out)
        if not args.skip_locate:
            for method in ("coco", "knowbias"):
                drop_page_cache_of(base)
                rows[f"locate {method}"] = measure(
                    [*BAKEEDIT, "locate", str(recipes[method]), "-o", str(work / f"{method}.json"),
                     "--cache-dir", str(work / "cache")], env=env)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    size_mb = info["bytes"] / MB
    cp_wall = rows["cp"]["wall"]
    block_f32 = 2 * shape.block_bytes() / MB
    print(f"\n{'step':<22} {'wall s':>8} {'CPU s':>8} {'peak RSS MiB':>13}  notes")
    print(row("cp", rows["cp"], f"{size_mb / cp_wall:.0f} MiB/s"))
    a = rows["apply"]
    verification = record.get("verification", {})
    print(row("apply (auto path)", a, f"{size_mb / a['wall']:.0f} MiB/s = {cp_wall / a['wall']:.0%} of cp; "
              f"baked_by {record.get('baked_by')}, execution {record.get('execution')!r}; verification "
              f"{'passed' if verification.get('passed') else 'FAILED'}"))
    v = rows["verify --blocks"]
    print(row("verify --blocks", v, "exit 0" if v["code"] == 0 else f"exit {v['code']}"))
    prompts = {"locate coco": 2 * 2 * 2, "locate knowbias": 2}  # COCO: 2 categories x 2 pairs x 2 prompts
    for name in ("locate coco", "locate knowbias"):
        if name in rows:
            r = rows[name]
            print(row(name, r, f"{r['wall'] / prompts[name]:.1f} s per prompt ({prompts[name]} prompts); "
                      f"RSS - one float32 block = {r['rss_mb'] - block_f32:.0f} MiB"))
    print(f"\ntargets: apply peak RSS <= 1536 MiB: {a['rss_mb']:.0f} -> {'met' if a['rss_mb'] <= 1536 else 'MISSED'}; "
          f"apply wall >= 50% of cp: {cp_wall / a['wall']:.0%} -> {'met' if cp_wall / a['wall'] >= 0.5 else 'MISSED'}")
    for name in ("locate coco", "locate knowbias"):
        if name in rows:
            budget = block_f32 + 500
            r = rows[name]
            verdict = "met" if r["rss_mb"] <= budget else f"over by {r['rss_mb'] - budget:.0f} MiB"
            print(f"target {name} peak RSS <= one float32 block ({block_f32:.0f} MiB) + activations + 500 MiB: "
                  f"{r['rss_mb']:.0f} MiB -> {verdict}"
                  " (activations of a handful of prompts are a few MiB)")


if __name__ == "__main__":
    main()
