"""Pull side: a baked folder published as a git repository and served by olah (a third-party Hub mirror, offline
mode) is read back by huggingface_hub and transformers exactly as it is on disk."""

from __future__ import annotations

from hub_clients import check_remote, git_mirror
from huggingface_hub import ModelCard

REPO_ID = "bakeedit-tests/tiny-edit"


def test_snapshot_card_and_from_pretrained_through_olah(baked, olah, tmp_path):
    url, mirrors = olah
    git_mirror(baked, mirrors, REPO_ID)
    result = check_remote(REPO_ID, baked, tmp_path, url, pin=True)  # why pinned: client_check.py
    assert result["snapshot_sha256"] == result["local_sha256"]  # every file, byte for byte
    assert {"model.safetensors", "bakeedit.json", "README.md", "recipe.yaml"} <= set(result["snapshot_sha256"])
    assert result["card_data"] == ModelCard.load(baked / "README.md").data.to_dict()
    assert result["card_data"]["model-index"][0]["results"]
    assert result["same_token_ids"] and result["max_abs_logit_diff"] == 0.0
