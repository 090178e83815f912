"""Time a ``knowbias`` locate run from a recipe, question by question (seconds of wall clock and user CPU each).

Runs the recipe's ``locate:`` block with ``max_questions`` set, which takes the questions round-robin over the
dimensions, so a run stopped early (Ctrl-C; the per-question cache keeps what is done) is still a balanced subset.
With the same ``--cache-dir`` as ``bakeedit locate --cache-dir``, the CLI afterwards reuses every cached question.

    BAKEEDIT_CACHE=/tmp/bkcache .venv/bin/python bench/knowbias_locate.py recipes/knowbias-smollm2.yaml \\
        --max-questions 45 --cache-dir /tmp/kb/cache
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path

import bakeedit.models  # noqa: F401  (load the models package before bakeedit.recipe imports from it)
from bakeedit.locate import knowbias as kb
from bakeedit.locate.registry import LocateContext, validate_params
from bakeedit.models.load import load_model
from bakeedit.recipe import load_recipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe", type=Path)
    ap.add_argument("--max-questions", type=int, default=None)
    ap.add_argument("--cache-dir", type=Path, default=None)
    args = ap.parse_args()

    lr = load_recipe(args.recipe)
    _, params = validate_params(lr.recipe.locate, str(lr.path))
    if args.max_questions is not None:
        params = params.model_copy(update={"max_questions": args.max_questions})
    start = time.perf_counter()
    loaded = load_model(lr.recipe.model)
    print(f"model loaded in {time.perf_counter() - start:.1f}s", flush=True)

    real = kb.attribute_question

    def timed(*a, **k):
        wall, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_utime
        result = real(*a, **k)
        print(f"question of {len(a[1])} tokens, {len(a[3])} cells: {time.perf_counter() - wall:.1f}s wall, "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_utime - cpu:.1f}s user CPU, "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)
        return result

    kb.attribute_question = timed
    start = time.perf_counter()
    result = kb.locate_knowbias(loaded, params, LocateContext(cache_dir=args.cache_dir, base_dir=lr.path.parent))
    print(f"{len(result.neuron_set.neurons)} neurons from {len(result.questions)} questions in "
          f"{time.perf_counter() - start:.1f}s", flush=True)


if __name__ == "__main__":
    main()
