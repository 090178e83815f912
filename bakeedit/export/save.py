"""Save an edited model as a plain transformers checkpoint (safetensors shards, tokenizer, generation config).

``bakeedit apply`` has two bake paths, and a user must get the same folder from either: the streaming bake
(``export/stream.py``) copies the base's non-weight files as they are, so the in-memory path here writes only the
weights with ``save_pretrained`` and then carries the same files over (``base_files``). ``save_pretrained``'s own
config, generation config and tokenizer files would differ from the base's (a ``transformers_version``, defaults
filled in, a pad token added while probing), and a file the base does not have would appear.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

LICENSE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "NOTICE", "USE_POLICY.md")
CONFIG_FILE = "config.json"


def is_weight_file(path: Path) -> bool:
    """A shard or the shard index: what ``save_pretrained`` writes that no base file replaces."""
    return path.suffix == ".safetensors" or path.name.endswith(".safetensors.index.json")


def save_checkpoint(
    model: nn.Module,
    tokenizer,
    folder: Path,
    max_shard_size: str = "2GB",
    base_folder: Path | None = None,
    *,
    dtype: torch.dtype | None = None,
    base_files: Sequence[Path] | None = None,
    converted: bool = False,
) -> None:
    """``save_pretrained`` with safetensors, in ``dtype`` (the base's stored dtype unless the recipe converts).

    The model is cast in place (apply replaces it with the reloaded checkpoint right after; a copy would double
    the memory). With ``base_files`` (``stream.carried_files`` of the base), every non-weight file is exactly a copy
    of those, except ``config.json`` when ``converted`` (the dtype changed: the base's would name the old one).
    Without it, the tokenizer is saved and the base folder's license files are carried (the old behaviour).
    """
    folder = Path(folder)
    if dtype is not None and any(p.dtype != dtype for p in model.parameters() if p.is_floating_point()):
        model.to(dtype)
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    if base_files is not None:
        _replace_non_weight_files(folder, base_files, keep_config=converted)
        return
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if base_folder is not None:
        for name in LICENSE_FILES:
            if (base_folder / name).is_file():
                shutil.copy2(base_folder / name, folder / name)


def _replace_non_weight_files(folder: Path, base_files: Sequence[Path], keep_config: bool) -> None:
    kept = {CONFIG_FILE} if keep_config else set()
    for path in folder.iterdir():
        if path.is_file() and not is_weight_file(path) and path.name not in kept:
            path.unlink()
    for path in base_files:
        if path.name not in kept:
            shutil.copyfile(path, folder / path.name)
