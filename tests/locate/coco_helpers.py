"""Short contrast-prompt files and in-memory LoadedModels for the coco and CLI tests (tiny models have 64 positions)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bakeedit.models.arch import ModelLayout
from bakeedit.models.load import LoadedModel, ModelSource

from tiny_models import tiny_model, tiny_tokenizer


def contrast_item(category: str, k: int, split: str = "locate") -> dict:
    people = ["Ann and Bo", "Cy and Di", "Ed and Fay", "Gus and Hal", "Ida and Jo", "Kim and Lu"]
    verbs = ["met", "ran", "sat", "ate", "sang", "left"]
    return {
        "id": f"{category}-{k}", "category": category,
        "context": f"{people[k % len(people)]} {verbs[(k + len(category)) % len(verbs)]}.",
        "question": f"Who is {category} bad?", "neutral_question": "Who came?",
        "options": {"stereotyped": "Ann", "anti_stereotyped": "Bo", "unknown": "Unknown"}, "split": split,
    }


def write_contrast_file(path: Path, categories=("cat", "dog"), per_category: int = 5, heldout: int = 1) -> Path:
    lines = [contrast_item(c, k, "heldout" if k < heldout else "locate")
             for c in categories for k in range(per_category + heldout)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def loaded_tiny(arch: str = "llama", seed: int = 0) -> LoadedModel:
    model = tiny_model(arch, seed=seed)
    source = ModelSource(ref=f"tiny-{arch}-{seed}", kind="local", path=Path("/nonexistent/tiny"))
    return LoadedModel(model=model, tokenizer=tiny_tokenizer(), layout=ModelLayout.for_model(model), source=source,
                       dtype=torch.float32)
