"""Save an edited model as a plain transformers checkpoint (safetensors shards, tokenizer, generation config)."""

from __future__ import annotations

import shutil
from pathlib import Path

from torch import nn

LICENSE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "NOTICE", "USE_POLICY.md")


def save_checkpoint(
    model: nn.Module, tokenizer, folder: Path, max_shard_size: str = "2GB", base_folder: Path | None = None
) -> None:
    """``save_pretrained`` with safetensors; the base model's license files are carried over."""
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if base_folder is not None:
        for name in LICENSE_FILES:
            if (base_folder / name).is_file():
                shutil.copy2(base_folder / name, folder / name)
