"""Run by test_custom_module.py in a fresh Python process: load saved folders the way a user would, offline.

It imports torch and transformers only (never bakeedit), loads every folder of the job with
``trust_remote_code=True``, records logits and greedy generations (with and without the KV cache), tries the two
ways of loading without trusting the code, and writes everything to the job's output file.
"""

from __future__ import annotations

import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def load(folder: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()


@torch.no_grad()
def outputs(model: torch.nn.Module, job: dict) -> dict:
    n = job["new_tokens"]
    return {
        "logits": model(job["ids"]).logits,
        "generate": {
            cache: model.generate(**job["prompt"], max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=cache)
            for cache in (True, False)
        },
        "class": type(model).__name__,
        "module_file": sys.modules[type(model).__module__].__file__,
    }


def refusal(folder: str, **kwargs) -> str:
    try:
        AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except Exception as exc:  # the message is what the test checks
        return f"{type(exc).__name__}: {exc}"
    return "LOADED"


def main(job_path: str) -> None:
    job = torch.load(job_path)
    results = {name: outputs(load(folder), job) for name, folder in job["folders"].items()}
    first = job["folders"][job["resave"]]
    with tempfile.TemporaryDirectory() as again:
        load(first).save_pretrained(again)
        resaved = outputs(load(again), job)
    results["_meta"] = {
        "refused_false": refusal(first, trust_remote_code=False),
        "refused_default": refusal(first),  # no stdin: transformers' prompt cannot be answered
        # AutoTokenizer reads the config too, so it takes the same flag (without it transformers would ask)
        "tokenizer": type(AutoTokenizer.from_pretrained(first, trust_remote_code=True)).__name__,
        "resaved": resaved,
        "bakeedit_imported": sorted(m for m in sys.modules if m == "bakeedit" or m.startswith("bakeedit.")),
    }
    torch.save(results, job["out"])


if __name__ == "__main__":
    main(sys.argv[1])
