"""Blockwise vs in-memory locate on the embedded SmolLM2-135M-Instruct, for each method: the neuron sets must be
equal; the ratios say what reading one block at a time costs in time and saves in memory.

For each of COCO, INE and KnowBias (the shipped SmolLM2 recipes with fewer items, so that the six runs take minutes
on two cores, or ``--full`` for the recipes unchanged) it runs ``bakeedit locate`` twice, each in its own process,
once with ``locate.execution: in_memory`` and once with ``blockwise`` (a fresh cache each, so nothing is reused),
and prints wall time, CPU time and peak RSS (``wait4``) of both, the ratios, and whether the two NeuronSets name the
same (layer, site, index), and how far their scores are apart.

    flock /tmp/bk-heavy.lock .venv/bin/python bench/blockwise.py [--methods coco,ine,knowbias] [--full]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import load_average, measure  # bench/ is not a package

ROOT = Path(__file__).resolve().parents[1]
BAKEEDIT = [sys.executable, "-m", "bakeedit.cli"]
RECIPES = {"coco": "recipes/coco-smollm2.yaml", "ine": "recipes/ine-smollm2.yaml",
           "knowbias": "recipes/knowbias-smollm2.yaml"}
#: Fewer items than the shipped recipes (the equality is per item, so fewer items test it as well).
SMALL = {"coco": {"max_items": 4, "null_permutations": 0},
         "ine": {"max_prompts": 24, "causal_prompts": 8, "candidates": 10, "k": 5},
         "knowbias": {"max_questions": 4, "steps": 4}}


def recipe_for(method: str, execution: str, full: bool, folder: Path) -> Path:
    raw = yaml.safe_load((ROOT / RECIPES[method]).read_text())
    raw["locate"] = {**raw["locate"], **({} if full else SMALL[method]), "execution": execution}
    raw["locate"].pop("report", None)
    raw.pop("evaluate", None)
    path = folder / f"{method}-{execution}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def same_neurons(a: Path, b: Path) -> tuple[bool, float, float, int]:
    """(same (layer, site, index) set, largest score difference relative to the largest score, largest relative
    difference of one neuron's score, size)."""
    na, nb = (json.loads(p.read_text())["neurons"] for p in (a, b))
    key = lambda n: (n["layer"], n["site"], n["index"])  # noqa: E731
    sa, sb = {key(n): n.get("score") for n in na}, {key(n): n.get("score") for n in nb}
    pairs = [(sa[k], sb[k]) for k in sa.keys() & sb.keys() if sa[k] is not None and sb[k] is not None]
    top = max((abs(x) for x, _ in pairs), default=0.0) or 1.0
    of_top = max((abs(x - y) / top for x, y in pairs), default=0.0)
    own = max((abs(x - y) / max(abs(x), abs(y), 1e-12) for x, y in pairs), default=0.0)
    return sa.keys() == sb.keys(), of_top, own, len(sa)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="coco,ine,knowbias")
    ap.add_argument("--full", action="store_true", help="the shipped recipes' item counts")
    args = ap.parse_args()
    env = {**os.environ, "BAKEEDIT_PROGRESS": "none"}
    print(f"load average {load_average()} ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}), "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print(f"\n{'method':<9} {'execution':<10} {'wall s':>8} {'CPU s':>8} {'peak RSS MiB':>13}")
    summary = []
    with tempfile.TemporaryDirectory(prefix="bakeedit-bench-blockwise-") as tmp:
        work = Path(tmp)
        for method in args.methods.split(","):
            runs = {}
            for execution in ("in_memory", "blockwise"):
                out = work / f"{method}-{execution}.json"
                cache = work / f"cache-{method}-{execution}"
                runs[execution] = measure([*BAKEEDIT, "locate", str(recipe_for(method, execution, args.full, work)),
                                           "-o", str(out), "--cache-dir", str(cache)], env=env)
                r = runs[execution]
                print(f"{method:<9} {execution:<10} {r['wall']:>8.1f} {r['cpu']:>8.1f} {r['rss_mb']:>13.0f}")
                shutil.rmtree(cache, ignore_errors=True)
            equal, of_top, own, n = same_neurons(work / f"{method}-in_memory.json",
                                                 work / f"{method}-blockwise.json")
            m, b = runs["in_memory"], runs["blockwise"]
            summary.append(f"{method:<9} neurons {n:>4}  same set: {'yes' if equal else 'NO'}  max |score diff| "
                           f"{of_top:.1e} of the top score ({own:.1e} of its own)  blockwise / in-memory: wall "
                           f"{b['wall'] / m['wall']:.2f}x, CPU "
                           f"{b['cpu'] / m['cpu']:.2f}x, peak RSS {b['rss_mb'] / m['rss_mb']:.2f}x")
    print()
    print("\n".join(summary))


if __name__ == "__main__":
    main()
