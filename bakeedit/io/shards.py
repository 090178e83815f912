"""A safetensors checkpoint folder read as byte ranges: the index, each shard's header, and raw reads and copies.

The streaming fold (``export/stream.py``) never holds a model: it needs, per tensor, the file, the dtype, the shape
and where its bytes lie. A safetensors file is an 8-byte little-endian header length, a JSON header
(``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}``) and the tensors' raw bytes, offsets
relative to the end of the header. Every header is also opened with ``safetensors.safe_open``, so a file the
official reader rejects is rejected here too; data is read with ``pread`` rather than through ``safe_open``'s memory
map, because pages touched through a map stay in the process's resident set until the file is closed (measured:
+580 MB for reading one 512 MB tensor in 64 MB slices), which would defeat a bounded-memory bake.

A damaged file is a :class:`ModelLoadError` that names it and says "truncated or corrupt", whatever part of the
header is wrong; a read or write that fails on a file descriptor names the file (the kernel's error would not).
"""

from __future__ import annotations

import errno
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bakeedit.errors import ModelLoadError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_MAX_HEADER = 100 * 1024 * 1024  # the limit safetensors itself enforces

#: Bytes per element of the safetensors dtypes (unknown dtypes are copied, never read as tensors).
DTYPE_SIZES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2,
    "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}
FLOAT_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
}
_TORCH_DTYPES: dict[str, torch.dtype] = {
    **FLOAT_DTYPES, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a shard: ``start``/``end`` are absolute byte offsets in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype not in _TORCH_DTYPES:
            raise ModelLoadError(f"tensor {self.name}: dtype {self.dtype} cannot be read as a torch tensor here")
        return _TORCH_DTYPES[self.dtype]


@dataclass
class Shard:
    """One ``.safetensors`` file: its raw header bytes (copied verbatim into the baked file) and its tensors."""

    path: Path
    header: bytes  # the 8-byte length plus the JSON header, exactly as stored
    size: int
    entries: dict[str, TensorEntry] = field(default_factory=dict)

    @property
    def data_start(self) -> int:
        return len(self.header)

    def in_file_order(self) -> list[TensorEntry]:
        return sorted(self.entries.values(), key=lambda e: e.start)


def _damaged(path: Path, why: str) -> ModelLoadError:
    return ModelLoadError(f"{path}: truncated or corrupt safetensors file ({why})",
                          hint="the file is damaged or incomplete: download or write it again")


def read_shard(path: Path) -> Shard:
    """Parse and validate one shard's header: offsets contiguous from 0 to the end of the file, sizes consistent."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        n = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < n <= min(_MAX_HEADER, size - 8):
            raise _damaged(path, f"a header of {n} bytes cannot fit in a file of {size}")
        raw = f.read(n)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        with safe_open(path, framework="pt") as st:  # the official reader must accept it too
            official = set(st.keys())
    except (ValueError, SafetensorError) as exc:
        raise _damaged(path, str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__) from exc
    header.pop("__metadata__", None)
    shard = Shard(path=path, header=prefix + raw, size=size)
    try:
        _read_entries(shard, header, n)
    except (KeyError, TypeError, ValueError) as exc:  # safe_open accepted it, so this is unlikely: still the file's
        raise _damaged(path, f"malformed header entry: {exc}") from exc
    end = max((e.end for e in shard.entries.values()), default=n + 8)
    if end != size or set(shard.entries) != official:
        raise _damaged(path, f"the header describes {end} bytes, the file has {size}")
    return shard


def _read_entries(shard: Shard, header: dict, n: int) -> None:
    end = 0
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        begin, stop = info["data_offsets"]
        width = DTYPE_SIZES.get(info["dtype"])
        if begin != end or (width is not None and stop - begin != width * math.prod(info["shape"])):
            raise _damaged(shard.path, f"tensor {name} has inconsistent data offsets {begin}-{stop}")
        shard.entries[name] = TensorEntry(name, info["dtype"], tuple(info["shape"]), n + 8 + begin, n + 8 + stop)
        end = stop


@dataclass
class Checkpoint:
    """The safetensors shards of a checkpoint folder, single-file or sharded with ``model.safetensors.index.json``."""

    folder: Path
    shards: list[Shard]
    index_path: Path | None
    where: dict[str, Shard] = field(default_factory=dict)

    @classmethod
    def open(cls, folder: Path) -> Checkpoint:
        folder = Path(folder)
        index_path = folder / INDEX_FILE
        if index_path.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ModelLoadError(f"{index_path}: not a safetensors index (no weight_map)") from exc
            names = sorted(set(weight_map.values()))
            for name in names:
                if Path(name).name != name:
                    raise ModelLoadError(f"{index_path}: shard '{name}' is not a file name in the folder")
        elif (folder / SINGLE_FILE).is_file():
            index_path, weight_map, names = None, None, [SINGLE_FILE]
        else:
            raise ModelLoadError(
                f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}", hint="streaming needs a safetensors checkpoint folder"
            )
        shards = []
        for name in names:
            if not (folder / name).is_file():
                raise ModelLoadError(f"{folder}: shard {name} named by the index is missing")
            shards.append(read_shard(folder / name))
        ckpt = cls(folder=folder, shards=shards, index_path=index_path)
        for shard in shards:
            for tensor in shard.entries:
                ckpt.where[tensor] = shard
        if weight_map is not None:
            wrong = [t for t, s in weight_map.items() if t not in ckpt.where or ckpt.where[t].path.name != s]
            if wrong:
                raise ModelLoadError(f"{index_path}: {len(wrong)} tensor(s), e.g. {wrong[0]}, are not where it says")
        return ckpt

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def entry(self, name: str) -> TensorEntry:
        return self.where[name].entries[name]

    @property
    def total_bytes(self) -> int:
        return sum(s.size for s in self.shards)

    def largest_tensor_bytes(self) -> int:
        return max((e.nbytes for s in self.shards for e in s.entries.values()), default=0)

    def read(self, name: str) -> torch.Tensor:
        """One tensor, read with ``pread`` (memory: the tensor itself)."""
        shard = self.where[name]
        entry = shard.entries[name]
        fd = os.open(shard.path, os.O_RDONLY)
        try:
            return read_bytes(fd, entry.start, entry.nbytes).view(entry.torch_dtype).view(entry.shape)
        finally:
            os.close(fd)


    def read_as(self, name: str, dtype: torch.dtype, chunk_bytes: int = 64 << 20) -> torch.Tensor:
        """One tensor converted to ``dtype`` while it is read, ``chunk_bytes`` of stored bytes at a time: memory is
        the converted tensor plus one chunk, not the stored copy beside the converted one (a bf16 embedding read
        as float32 would otherwise take three times its stored size at its peak)."""
        shard = self.where[name]
        entry = shard.entries[name]
        stored = entry.torch_dtype
        if stored == dtype or not stored.is_floating_point:
            return self.read(name)
        out = torch.empty(entry.shape, dtype=dtype)
        flat = out.view(-1)
        per = max(1, chunk_bytes // stored.itemsize)
        fd = os.open(shard.path, os.O_RDONLY)
        try:
            for first in range(0, flat.numel(), per):
                n = min(per, flat.numel() - first)
                raw = read_bytes(fd, entry.start + first * stored.itemsize, n * stored.itemsize)
                flat[first:first + n] = raw.view(stored)
        finally:
            os.close(fd)
        return out


    def read_rows(self, name: str, first: int, last: int, dtype: torch.dtype, out: torch.Tensor | None = None
                  ) -> torch.Tensor:
        """Rows ``first..last-1`` of a tensor (its first dimension; rows are contiguous in the file), converted to
        ``dtype``, written into ``out[first:last]`` when ``out`` is given: an embedding lookup reads only the rows of
        its token ids, a large LM head is applied a slice of rows at a time."""
        shard = self.where[name]
        entry = shard.entries[name]
        stored = entry.torch_dtype
        per_row = math.prod(entry.shape[1:]) * stored.itemsize
        fd = os.open(shard.path, os.O_RDONLY)
        try:
            raw = read_bytes(fd, entry.start + first * per_row, (last - first) * per_row)
        finally:
            os.close(fd)
        rows = raw.view(stored).view(last - first, *entry.shape[1:])
        if out is None:
            return rows.to(dtype)
        out[first:last] = rows
        return out[first:last]


def is_safetensors_checkpoint(folder: Path) -> bool:
    folder = Path(folder)
    return folder.is_dir() and ((folder / INDEX_FILE).is_file() or (folder / SINGLE_FILE).is_file())


def fd_name(fd: int) -> str:
    """The file behind ``fd`` (Linux ``/proc``), for error messages; ``fd N`` where that is not available."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"fd {fd}"


def read_bytes(fd: int, offset: int, n: int) -> torch.Tensor:
    """``n`` bytes at ``offset`` as a fresh uint8 tensor."""
    buf = torch.empty(n, dtype=torch.uint8)
    view = memoryview(buf.numpy())
    done = 0
    while done < n:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise _damaged(Path(fd_name(fd)), f"it ends before the {n} bytes at offset {offset} its header lists")
        done += got
    return buf


def write_bytes(fd: int, data: torch.Tensor, offset: int) -> None:
    """Write a contiguous tensor's raw bytes at ``offset``."""
    view = memoryview(data.contiguous().view(-1).view(torch.uint8).numpy())
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def copy_range(src: int, dst: int, src_offset: int, dst_offset: int, n: int, buffer: int = 16 << 20) -> None:
    """Copy ``n`` bytes between files without holding them: ``copy_file_range`` in the kernel where the platform
    and file systems allow it, else a bounded read/write loop."""
    done = 0
    if hasattr(os, "copy_file_range"):
        try:
            while done < n:
                got = os.copy_file_range(src, dst, n - done, src_offset + done, dst_offset + done)
                if got == 0:
                    break
                done += got
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM):
                raise
    while done < n:
        chunk = read_bytes(src, src_offset + done, min(buffer, n - done))
        write_bytes(dst, chunk, dst_offset + done)
        done += len(chunk)
