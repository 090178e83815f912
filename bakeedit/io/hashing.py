"""sha256 of files, streamed: the one digest provenance, the manifest, push and the data loaders record."""

from __future__ import annotations

import hashlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of ``path``, read in ``chunk``-byte blocks (shards are gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class BackgroundHashes:
    """sha256 of files computed in worker threads while the caller goes on writing (hashlib and file reads release
    the GIL): the streaming bake hands each shard here as soon as it is complete, so the base shard it just read and
    the baked shard it just wrote are hashed from the page cache on the other core, instead of being read from disk
    again afterwards. The digests are of the files as they are on disk when hashed; a file changed after
    :meth:`add` is not seen, so add only files that are complete."""

    def __init__(self, workers: int = 2) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bakeedit-sha256")
        self._futures: dict[Path, Future[str]] = {}

    def add(self, path: Path) -> None:
        path = Path(path)
        if path not in self._futures:
            self._futures[path] = self._pool.submit(file_sha256, path)

    def result(self) -> dict[Path, str]:
        """Every digest, once all are done (a worker's error, e.g. an I/O error, is raised here)."""
        try:
            return {path: future.result() for path, future in self._futures.items()}
        finally:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> BackgroundHashes:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
