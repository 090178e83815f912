"""sha256 of files, streamed: the one digest provenance, the manifest, push and the data loaders record."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of ``path``, read in ``chunk``-byte blocks (shards are gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
