"""A resumable per-item cache for locate runs.

Attribution over dozens of questions takes minutes; an interrupted ``bakeedit locate`` must pick up where it
stopped. Results are stored per item (one question, one prompt pair) as a safetensors file under a folder keyed by
the hash of everything that determines them (model, revision, method, parameters, data hash). Each file is written
to a temporary name and renamed, so a kill never leaves a half-written entry that a later run would trust; an error
or interrupt removes the temporary, and the temporaries of killed runs (their pid gone) are deleted on the next open.
An entry damaged afterwards (a full disk under another tool, a copied cache) is reported with a warning, deleted and
computed again by :meth:`ItemCache.get`: a cache is a shortcut and never fails a run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from bakeedit.io.temporaries import owner_alive, process_token

_TMP = re.compile(r"\.tmp-(\d+)(?:-t([0-9a-f]+))?$")
log = logging.getLogger(__name__)


def cache_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


class ItemCache:
    """``get``/``put`` of a dict of tensors per item id; a no-op when ``root`` is None."""

    def __init__(self, root: Path | None, parts: dict[str, Any]) -> None:
        self.folder = None if root is None else Path(root) / cache_key(parts)
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._remove_stale()
            self._write(self.folder / "key.json",
                        lambda tmp: tmp.write_text(json.dumps(parts, sort_keys=True, indent=1, default=str)))

    def _remove_stale(self) -> None:
        """Delete ``*.tmp-PID`` entries of killed runs (their pid is gone): never trusted, only in the way."""
        assert self.folder is not None
        for path in self.folder.glob("*.tmp-*"):
            match = _TMP.search(path.name)
            if match and not owner_alive(int(match.group(1)), match.group(2)):
                path.unlink(missing_ok=True)

    @staticmethod
    def _write(path: Path, write: Callable[[Path], object]) -> None:
        """Write through a temporary and ``os.replace``; any error or interrupt removes the temporary."""
        token = process_token(os.getpid())
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}" + (f"-t{token}" if token else ""))
        try:
            write(tmp)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _path(self, item_id: str) -> Path:
        safe = hashlib.sha256(item_id.encode()).hexdigest()[:24]
        assert self.folder is not None
        return self.folder / f"{safe}.safetensors"

    def get(self, item_id: str) -> dict[str, torch.Tensor] | None:
        """The cached tensors of ``item_id``; ``None`` when absent, or when damaged (truncated by a full disk, a
        copied cache...): a cache is only a shortcut, so such an entry is reported, deleted and recomputed."""
        if self.folder is None:
            return None
        path = self._path(item_id)
        if not path.exists():
            return None
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as exc:
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            log.warning("warning: locate cache entry %s is damaged (%s); discarded, recomputing it", path, why)
            path.unlink(missing_ok=True)
            return None

    def put(self, item_id: str, tensors: dict[str, torch.Tensor]) -> None:
        if self.folder is None:
            return
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        self._write(self._path(item_id), lambda tmp: save_file(tensors, tmp))

    def __len__(self) -> int:
        return 0 if self.folder is None else len(list(self.folder.glob("*.safetensors")))
