"""Load a repository back through huggingface_hub and transformers, as a user would, and compare it with a folder.

Run in a fresh process (``python client_check.py REPO_ID LOCAL_FOLDER [--pin]``) whose environment points
``HF_ENDPOINT`` at a local server: huggingface_hub reads its endpoint, cache and offline settings once at import,
so a separate process is the faithful way to be "a user on another machine". Prints one JSON object.

``--pin`` resolves the repository's current commit first and passes it as ``revision=`` everywhere (what the model
card recommends for custom code anyway). The olah test needs it: olah answers a missing file at ``main`` with
401 RepoNotFound instead of 404 EntryNotFound (it answers correctly at a commit hash), and transformers' tokenizer
loader probes optional files.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
from huggingface_hub import ModelCard, model_info, snapshot_download
from transformers import AutoModelForCausalLM, AutoTokenizer

PROBE = "The nurse said that the engineer"


def sha256s(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    }


def logits(model_ref: str, revision: str | None = None) -> tuple[torch.Tensor, list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(model_ref, revision=revision)
    ids = tokenizer(PROBE, return_tensors="pt").input_ids
    model = AutoModelForCausalLM.from_pretrained(model_ref, revision=revision, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits, ids[0].tolist()


def main(repo_id: str, local: Path, pin: bool) -> dict:
    revision = model_info(repo_id, revision="main").sha if pin else None  # olah: no info without a revision
    snapshot = Path(snapshot_download(repo_id, revision=revision))
    remote_logits, remote_ids = logits(repo_id, revision)
    local_logits, local_ids = logits(str(local))
    return {
        "revision": revision,
        "snapshot_sha256": sha256s(snapshot),
        "local_sha256": sha256s(local),
        "card_data": ModelCard.load(repo_id).data.to_dict(),  # README.md at main
        "same_token_ids": remote_ids == local_ids,
        "max_abs_logit_diff": float((remote_logits - local_logits).abs().max()),
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], Path(sys.argv[2]), pin="--pin" in sys.argv[3:])))
