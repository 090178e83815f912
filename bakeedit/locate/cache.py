"""A resumable per-item cache for locate runs.

Attribution over dozens of questions takes minutes; an interrupted ``bakeedit locate`` must pick up where it
stopped. Results are stored per item (one question, one prompt pair) as a safetensors file under a folder keyed by
the hash of everything that determines them (model, revision, method, parameters, data hash). Each file is written
to a temporary name and renamed, so a kill never leaves a half-written entry that a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def cache_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


class ItemCache:
    """``get``/``put`` of a dict of tensors per item id; a no-op when ``root`` is None."""

    def __init__(self, root: Path | None, parts: dict[str, Any]) -> None:
        self.folder = None if root is None else Path(root) / cache_key(parts)
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            (self.folder / "key.json").write_text(json.dumps(parts, sort_keys=True, indent=1, default=str))

    def _path(self, item_id: str) -> Path:
        safe = hashlib.sha256(item_id.encode()).hexdigest()[:24]
        assert self.folder is not None
        return self.folder / f"{safe}.safetensors"

    def get(self, item_id: str) -> dict[str, torch.Tensor] | None:
        if self.folder is None:
            return None
        path = self._path(item_id)
        return load_file(path) if path.exists() else None

    def put(self, item_id: str, tensors: dict[str, torch.Tensor]) -> None:
        if self.folder is None:
            return
        path = self._path(item_id)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp)
        os.replace(tmp, path)

    def __len__(self) -> int:
        return 0 if self.folder is None else len(list(self.folder.glob("*.safetensors")))
