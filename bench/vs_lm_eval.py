"""bakeedit's evaluation engine against lm-evaluation-harness 0.4.13 on the same items of the embedded SmolLM2.

    BAKEEDIT_CACHE=~/.cache/bakeedit .venv/bin/python bench/vs_lm_eval.py [--items 100] [--data-dir ../shared/data]

For each of ARC-Easy, HellaSwag, PIQA, Winogrande, COPA and CrowS-Pairs, the items bakeedit's task loader reads
(seeded sample of ``--items``) are written out once as JSON Lines, every option as the exact (context,
continuation) strings bakeedit's task scores, and both tools score them:

- **lm-eval**: ``lm_eval --model hf`` (float32, CPU) on generated task YAMLs (``output_type: multiple_choice``,
  ``target_delimiter: ""``, the continuations verbatim; Winogrande with one context per option, lm-eval's "partial
  scoring"), in its own virtual environment under ``$BAKEEDIT_CACHE/lm-eval-venv`` (created on first use with the
  pinned ``torch==2.13.0`` CPU wheel and ``lm_eval[hf]==0.4.13``; it is no test dependency);
- **bakeedit**: the packed scorer (``bakeedit.evaluate.Scorer``) in this process.

Printed per task: items, per-item agreement of the chosen option (argmax of the summed log-likelihood; for CrowS,
which sentence is more likely), the max |difference| of the per-option log-likelihoods, and the CPU seconds of
each tool (lm-eval's child process from ``getrusage``; bakeedit's ``process_time``) with their ratio. Both load the
model themselves; the load time is included in lm-eval's CPU time, so the ratio also prints bakeedit's scoring-only
CPU. This compares the scoring (tokenisation, BOS handling, batching, log-softmax), not prompt formats: both tools
see bakeedit's rendering of each item. lm-eval's own COPA task scores options with two leading spaces (docs/
evaluation.md), which is why it is scored here from the same strings instead.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bakeedit.evaluate import Scorer, get_task
from bakeedit.models import load_model
from bakeedit.models.embedded import cache_root, embedded_gguf_path, gguf_to_safetensors

REPO = Path(__file__).resolve().parent.parent
LM_EVAL = "lm_eval[hf]==0.4.13"
TORCH = "torch==2.13.0"
TASKS = ("arc_easy", "hellaswag", "piqa", "winogrande", "copa", "crows_pairs")

YAML = """task: bk_{name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
output_type: multiple_choice
doc_to_text: !function utils.doc_to_text
doc_to_choice: !function utils.doc_to_choice
doc_to_target: !function utils.doc_to_target
target_delimiter: ""
metric_list:
  - metric: acc
"""
# One context per option (Winogrande) is lm-eval's "multiple input" form: doc_to_text returns the gold index,
# doc_to_choice the contexts, doc_to_target the shared continuation.
UTILS = '''
def _shared(doc):
    return len(set(doc["contexts"])) == 1


def doc_to_text(doc):
    return doc["contexts"][0] if _shared(doc) else doc["gold"]


def doc_to_choice(doc):
    return doc["continuations"] if _shared(doc) else doc["contexts"]


def doc_to_target(doc):
    return doc["gold"] if _shared(doc) else doc["continuations"][0]
'''


def lm_eval_python() -> Path:
    """The lm-eval environment's interpreter, created (minutes, once) when missing."""
    venv = cache_root() / "lm-eval-venv"
    python = venv / "bin" / "python"
    if not (python.exists() and subprocess.run([python, "-c", "import lm_eval"], capture_output=True).returncode == 0):
        print(f"creating {venv} ({TORCH}, {LM_EVAL}); this takes minutes once", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        for spec in (TORCH, LM_EVAL):
            subprocess.run([python, "-m", "pip", "install", "-q", spec], check=True)
    return python


def task_docs(name: str, data_dir: Path, items: int, seed: int) -> list[dict]:
    """The items bakeedit scores, as explicit (context, continuation) pairs per option."""
    data = get_task(name).load(data_dir, items, seed)
    docs = []
    for k, it in enumerate(data.items):
        if name == "crows_pairs":  # log P(sentence | BOS): an empty context, the sentence as continuation
            docs.append({"id": k, "contexts": ["", ""], "continuations": [it.sent_more, it.sent_less], "gold": 0})
            continue
        pairs = it.requests()
        docs.append({"id": k, "contexts": [c for c, _ in pairs], "continuations": [t for _, t in pairs],
                     "gold": int(it.gold)})
    return docs


def run_lm_eval(python: Path, model_dir: Path, docs: dict[str, list[dict]], work: Path) -> tuple[dict, float]:
    """lm-eval's per-option log-likelihoods per task (``{task: [[ll per option] per doc]}``) and its CPU seconds."""
    tasks_dir = work / "tasks"
    tasks_dir.mkdir(parents=True, exist_ok=True)
    (tasks_dir / "utils.py").write_text(UTILS)
    for name, rows in docs.items():
        path = work / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tasks_dir / f"bk_{name}.yaml").write_text(YAML.format(name=name, docs=path))
    out = work / "results"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(
        [python, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={model_dir},dtype=float32",
         "--device", "cpu", "--batch_size", "16", "--include_path", str(tasks_dir), "--tasks",
         ",".join(f"bk_{n}" for n in docs), "--log_samples", "--output_path", str(out)],
        check=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    found: dict[str, list[list[float]]] = {}
    for name in docs:
        samples = sorted(out.rglob(f"samples_bk_{name}_*.jsonl"))
        if not samples:
            raise SystemExit(f"lm-eval wrote no samples for bk_{name} under {out}")
        rows = [json.loads(line) for line in samples[-1].read_text().splitlines() if line.strip()]
        rows.sort(key=lambda r: r["doc"]["id"])
        found[name] = [[float(resp[0]) for resp in r["filtered_resps"]] for r in rows]
    return found, cpu


def run_bakeedit(model_dir: Path, docs: dict[str, list[dict]]) -> tuple[dict, float, float]:
    """bakeedit's per-option log-likelihoods per task, its CPU seconds with and without the model load."""
    start = time.process_time()
    loaded = load_model(str(model_dir))
    scorer = Scorer(loaded.model, loaded.tokenizer, batch_size=16)
    loaded_at = time.process_time()
    found = {}
    for name, rows in docs.items():
        requests = [(c, t) for r in rows for c, t in zip(r["contexts"], r["continuations"], strict=True)]
        lls = iter(r.logprob for r in scorer.loglikelihood(requests))
        found[name] = [[next(lls) for _ in r["contexts"]] for r in rows]
    end = time.process_time()
    return found, end - start, end - loaded_at


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100, help="items per task (seeded sample)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--work", type=Path, default=cache_root() / "vs-lm-eval")
    args = parser.parse_args()
    torch.manual_seed(0)
    python = lm_eval_python()
    model_dir = gguf_to_safetensors(embedded_gguf_path())
    docs = {name: task_docs(name, args.data_dir, args.items, args.seed) for name in args.tasks.split(",")}
    theirs, their_cpu = run_lm_eval(python, model_dir, docs, args.work)
    ours, our_cpu, our_scoring_cpu = run_bakeedit(model_dir, docs)
    print(f"\nbakeedit vs lm-evaluation-harness 0.4.13, embedded SmolLM2-135M-Instruct (float32, CPU), "
          f"{args.items} items per task, seed {args.seed}, load average {os.getloadavg()[0]:.2f}")
    print("| task | items | same choice | max abs delta loglik |\n|---|---|---|---|")
    total = agree = 0
    for name in docs:
        a, b = theirs[name], ours[name]
        same = sum(int(np.argmax(x) == np.argmax(y)) for x, y in zip(a, b, strict=True))
        delta = max(abs(p - q) for x, y in zip(a, b, strict=True) for p, q in zip(x, y, strict=True))
        total, agree = total + len(a), agree + same
        print(f"| {name} | {len(a)} | {same}/{len(a)} | {delta:.2e} |")
    print(f"| all | {total} | {agree}/{total} ({agree / total:.1%}) | |")
    print(f"\nCPU seconds: lm-eval {their_cpu:.1f} (model load included), bakeedit {our_cpu:.1f} "
          f"({our_scoring_cpu:.1f} scoring only); lm-eval / bakeedit = {their_cpu / our_cpu:.2f}x "
          f"({their_cpu / our_scoring_cpu:.2f}x against scoring only)")


if __name__ == "__main__":
    main()
