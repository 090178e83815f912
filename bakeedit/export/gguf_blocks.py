"""Scale rows or columns of one ggml tensor without leaving its type: the block arithmetic of a GGUF bake.

ggml stores each output row of a weight as blocks along the input dimension (``gguf/quants.py``, ggml's
``block_q4_1`` etc.): a block's values are ``d * q`` (Q4_0, Q5_0, Q8_0), ``d * q + m`` (Q4_1, Q5_1), or, in the
K-quants, ``d * scale_j * q - dmin * min_j`` over 256 values, with ``d``/``m``/``dmin`` stored as float16 and the
integers ``q``, ``scale_j``, ``min_j`` packed beside them. Multiplying every value of a row by ``lambda`` is
therefore multiplying those float16 fields by ``lambda`` and leaving every integer alone (:func:`scale_rows`).
The product is rounded back to float16: exact when ``lambda * field`` is representable (``lambda`` 0 or a power of
two, barring overflow and the float16 subnormals), otherwise off by at most 2^-11 of the field (round to nearest,
unit roundoff ``u = 2^-11``), which :class:`Scaling` measures per block on the de-quantised values.

A column (one input channel) is one value of every row's block, so it cannot be reached through the block's
scales: the blocks holding it are de-quantised, the edited values scaled, and the block quantised again
(:func:`scale_columns`). First on the block's own grid: when the scaled value still falls inside it (``d``, ``m``
kept), only its integer is re-rounded, so nothing else in the block moves and zeroing is exact wherever 0 is a
grid point (Q8_0, Q4_0, Q5_0). A block where it falls outside is requantised with the gguf package's quantiser,
which refits the grid and may move the block's other values; :class:`Scaling` says how many blocks and how far.
Both exist only for F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1, the types gguf-py can quantise; other
types are refused with :class:`~bakeedit.errors.EditError`, naming the alternatives.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, QK_K, GGMLQuantizationType
from gguf.quants import dequantize, quantize

from bakeedit.errors import EditError

Q = GGMLQuantizationType

#: Types whose values are stored one by one (no blocks): a row or column is scaled value by value.
FLOAT_TYPES = frozenset({Q.F32, Q.F16, Q.BF16})
#: Byte offsets, inside one block, of the float16 fields that multiply the whole block, read off the
#: ``dequantize_blocks`` splits of ``gguf/quants.py`` (ggml-common.h's block structs): Q2_K is
#: ``scales[16] qs[64] d dmin``, Q3_K ``hmask[32] qs[64] scales[12] d``, Q4_K/Q5_K ``d dmin scales[12] ...``,
#: Q6_K ``ql[128] qh[64] scales[16] d``.
ROW_SCALE_FIELDS: dict[GGMLQuantizationType, tuple[int, ...]] = {
    Q.Q4_0: (0,),
    Q.Q4_1: (0, 2),
    Q.Q5_0: (0,),
    Q.Q5_1: (0, 2),
    Q.Q8_0: (0,),
    Q.Q2_K: (QK_K // 16 + QK_K // 4, QK_K // 16 + QK_K // 4 + 2),
    Q.Q3_K: (QK_K // 8 + QK_K // 4 + 12,),
    Q.Q4_K: (0, 2),
    Q.Q5_K: (0, 2),
    Q.Q6_K: (QK_K // 2 + QK_K // 4 + QK_K // 16,),
}
#: Types the gguf package can quantise (``quants.py`` has a ``quantize_blocks`` for them): column edits need it.
REQUANTISABLE = frozenset({Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1})
#: Unit roundoff of float16, the precision of every block scale field (and of F16 values).
FP16_ROUNDOFF = 2.0**-11
COLUMN_ALTERNATIVE = ("edit an exact row site instead (attn.q, attn.k, attn.v, mlp.gate, mlp.up, or mlp.act of a "
                      "gated MLP), or bake to safetensors and quantise that with llama.cpp's llama-quantize")


@dataclass(frozen=True)
class Scaling:
    """What scaling one tensor did to its values (de-quantised, float64), for the record and the bound.

    ``rel_error`` is the largest block deviation ``max |new - lambda * old| / max |lambda * old|`` over the edited
    blocks (rows: the whole row's blocks; columns: the rewritten blocks); 0 means the edit is exact. For a
    requantised column edit, ``moved_*`` describe the values of the rewritten blocks that were *not* edited (only
    refit blocks move them): the largest change, the same relative to the block's largest value, and the fraction
    that changed at all; ``edited_max_abs_error`` is the largest ``|new - lambda * old|`` of an edited value.
    """

    method: str  # "values" (F32/F16/BF16), "scale fields" (block scales of a quantised row) or "requantised"
    exact: bool
    rel_error: float
    blocks_requantised: int = 0  # (row, block) pairs rewritten: the edited integers re-rounded on the block's grid
    blocks_refit: int = 0  # of those, blocks requantised with a new grid (an edited value fell outside the old one)
    moved_max_abs: float = 0.0
    moved_max_rel: float = 0.0
    moved_fraction: float = 0.0
    edited_max_abs_error: float = 0.0
    #: Rows: the largest relative rounding of each scale field (``d``, then ``m``/``dmin``), or of the values.
    field_eps: tuple[float, ...] = ()


def _as_values(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """float64 values of ``data`` (rows of a tensor as the reader holds them: raw bytes for block types)."""
    return np.asarray(dequantize(np.ascontiguousarray(data), qtype), dtype=np.float64)


def _from_values(values: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """``values`` stored in a float type, rounded to nearest (float16 directly from float64: one rounding)."""
    if qtype == Q.F32:
        return values.astype(np.float32)
    if qtype == Q.F16:
        return values.astype(np.float16)
    return quantize(values.astype(np.float32), Q.BF16)


def _refuse_rows(qtype: GGMLQuantizationType, tensor: str) -> None:
    if qtype not in FLOAT_TYPES and qtype not in ROW_SCALE_FIELDS:
        raise EditError(f"{tensor} is {qtype.name}, whose block scales bakeedit does not edit: bake to safetensors "
                        "and quantise that with llama.cpp's llama-quantize")


def _check_finite(new: np.ndarray, tensor: str) -> None:
    if not np.isfinite(new).all():
        raise EditError(f"{tensor}: the scaled values overflow float16 (largest 65504): use a smaller lambda")


def _block_error(new: np.ndarray, target: np.ndarray, block: int) -> float:
    """Largest ``max |new - target| / max |target|`` over blocks of ``block`` values along the last axis."""
    shape = (*new.shape[:-1], new.shape[-1] // block, block)
    err = np.abs(new - target).reshape(shape).max(axis=-1)
    scale = np.abs(target).reshape(shape).max(axis=-1)
    if (err[scale == 0] > 0).any():
        return float("inf")
    ratio = np.divide(err, scale, out=np.zeros_like(err), where=scale > 0)
    return float(ratio.max(initial=0.0))


def _product(old: np.ndarray, factors: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """``old * factors`` as float64; for F32 tensors a float32 product, the fold's own arithmetic (edit/fold.py)."""
    if qtype == Q.F32:
        return (old.astype(np.float32) * factors.astype(np.float32)).astype(np.float64)
    return old * factors


def scale_rows(data: np.ndarray, qtype: GGMLQuantizationType, rows: np.ndarray, factors: np.ndarray,
               tensor: str = "tensor") -> tuple[np.ndarray, Scaling]:
    """A copy of ``data`` with ``rows`` multiplied by ``factors``: the block scale fields of quantised types, the
    values of float types; every other byte stays as it was. ``data`` is the reader's array (``[rows, bytes]`` for
    block types, ``[rows, cols]`` or ``[n]`` (a bias) for float types)."""
    _refuse_rows(qtype, tensor)
    rows = np.asarray(rows, dtype=np.int64)
    factors = np.asarray(factors, dtype=np.float64)
    out = np.array(data, copy=True)
    if out.ndim == 1:  # a bias vector: each "row" is one value
        if qtype not in FLOAT_TYPES:
            raise EditError(f"{tensor} is a {qtype.name} vector; bakeedit scales only float vectors")
        old = _as_values(out, qtype)
        target = old.copy()
        target[rows] = _product(old[rows], factors, qtype)
        new = _from_values(target, qtype)
        _check_finite(new, tensor)
        out[...] = new.reshape(out.shape)
        error = 0.0 if qtype == Q.F32 else _block_error(_as_values(out, qtype)[rows, None], target[rows, None], 1)
        return out, Scaling("values", error == 0.0, error, field_eps=(error,))
    old = _as_values(out[rows], qtype)
    target = _product(old, factors[:, None], qtype)
    if qtype in FLOAT_TYPES:
        new_rows = _from_values(target, qtype)
        _check_finite(new_rows, tensor)
        out[rows] = new_rows.reshape(len(rows), -1)
        block = 1
        method = "values"
    else:
        block, size = GGML_QUANT_SIZES[qtype]
        picked = out[rows].reshape(len(rows), -1, size)
        field_eps = []
        for offset in ROW_SCALE_FIELDS[qtype]:
            field = np.ascontiguousarray(picked[:, :, offset:offset + 2]).view(np.float16)[..., 0]
            wanted = field.astype(np.float64) * factors[:, None]
            new = wanted.astype(np.float16)
            _check_finite(new, tensor)
            picked[:, :, offset:offset + 2] = new.view(np.uint8).reshape(*new.shape, 2)
            field_eps.append(_block_error(new.astype(np.float64).reshape(-1, 1), wanted.reshape(-1, 1), 1))
        out[rows] = picked.reshape(len(rows), -1)
        error = _block_error(_as_values(out[rows], qtype), target, block)
        return out, Scaling("scale fields", error == 0.0, error, field_eps=tuple(field_eps))
    # F32: float32 arithmetic, as the fold; the float32 tolerance covers its rounding
    error = 0.0 if qtype == Q.F32 else _block_error(_as_values(out[rows], qtype), target, block)
    return out, Scaling(method, error == 0.0, error, field_eps=(error,))


def offset_part(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray | None:
    """For a type with a second scale field (Q4_1/Q5_1 ``m``, the K-quants' ``dmin``): the part of each value that
    field scales (``m``, or ``-dmin * min_j``), read by de-quantising the rows with their ``d`` zeroed; the rest is
    the ``d`` part. None for a type with one field. The check's rounding bound needs both parts (gguf_verify)."""
    fields = ROW_SCALE_FIELDS.get(qtype, ())
    if len(fields) < 2:
        return None
    _, size = GGML_QUANT_SIZES[qtype]
    blocks = np.array(data, copy=True).reshape(data.shape[0], -1, size)
    blocks[:, :, fields[0]:fields[0] + 2] = 0  # float16 +0.0
    return dequantize(blocks.reshape(data.shape[0], -1), qtype).astype(np.float32)


def scale_columns(data: np.ndarray, qtype: GGMLQuantizationType, cols: np.ndarray, factors: np.ndarray,
                  tensor: str = "tensor", site: str = "a column site") -> tuple[np.ndarray, Scaling]:
    """A copy of ``data`` (``[rows, ...]``) with input channels ``cols`` multiplied by ``factors``: value by value
    for float types, else by requantising, with the gguf package's quantiser, only the blocks that hold them
    (every other block keeps its bytes)."""
    if qtype not in REQUANTISABLE:
        raise EditError(f"{tensor} is {qtype.name}, which the gguf package cannot quantise, so {site} (a column of "
                        f"it) cannot be written into this file: {COLUMN_ALTERNATIVE}")
    cols = np.asarray(cols, dtype=np.int64)
    factors = np.asarray(factors, dtype=np.float64)
    out = np.array(data, copy=True)
    if qtype in FLOAT_TYPES:
        old = _as_values(out, qtype)
        target = old.copy()
        target[:, cols] = _product(old[:, cols], factors, qtype)
        new = _from_values(target, qtype)  # untouched values are representable: they round to themselves
        _check_finite(new, tensor)
        out[...] = new.reshape(out.shape)
        error = 0.0 if qtype == Q.F32 else _block_error(_as_values(out, qtype)[:, cols].reshape(-1, 1),
                                                         target[:, cols].reshape(-1, 1), 1)
        return out, Scaling("values", error == 0.0, error)
    block, size = GGML_QUANT_SIZES[qtype]
    blocks = out.reshape(out.shape[0], -1, size)
    by_block: dict[int, list[tuple[int, float]]] = {}
    for col, factor in zip(cols.tolist(), factors.tolist(), strict=True):
        by_block.setdefault(col // block, []).append((col % block, factor))
    moved_abs = moved_rel = edited_err = rel_error = 0.0
    moved_count = untouched = refit = 0
    for b, members in sorted(by_block.items()):
        old = _as_values(blocks[:, b, :], qtype)
        target = old.copy()
        edited = np.zeros(block, dtype=bool)
        for j, factor in members:
            target[:, j] = _product(old[:, j], np.float64(factor), Q.F32)
            edited[j] = True
        new_bytes, refit_rows = _on_own_grid(blocks[:, b, :], old, target, edited, qtype, tensor)
        new = _as_values(new_bytes, qtype)
        if not np.isfinite(new).all():
            raise EditError(f"{tensor}: requantising gave non-finite values: use a smaller lambda")
        blocks[:, b, :] = new_bytes
        refit += int(refit_rows.sum())
        move = np.abs(new[:, ~edited] - old[:, ~edited])
        peak = np.abs(old).max(axis=1, keepdims=True)
        moved_abs = max(moved_abs, float(move.max(initial=0.0)))
        moved_rel = max(moved_rel, float(np.divide(move, peak, out=np.zeros_like(move), where=peak > 0)
                                         .max(initial=0.0)))
        moved_count += int((move > 0).sum())
        untouched += move.size
        edited_err = max(edited_err, float(np.abs(new[:, edited] - target[:, edited]).max(initial=0.0)))
        rel_error = max(rel_error, _block_error(new, target, block))
    exact = edited_err == 0.0 and moved_abs == 0.0
    return out, Scaling("requantised", exact, rel_error, len(by_block) * out.shape[0], refit, moved_abs, moved_rel,
                        moved_count / untouched if untouched else 0.0, edited_err)


#: Per block type: (bytes of float16 fields before the integers, the integer offset o, the integers' range) of
#: ``x = d * (q - o) [+ m]`` (ggml-common.h; Q8_0 is quantised to +-127 by ggml and gguf-py).
_GRIDS: dict[GGMLQuantizationType, tuple[int, int, int, int]] = {
    Q.Q8_0: (2, 0, -127, 127),
    Q.Q4_0: (2, 8, 0, 15),
    Q.Q4_1: (4, 0, 0, 15),
    Q.Q5_0: (2, 16, 0, 31),
    Q.Q5_1: (4, 0, 0, 31),
}


def _pack(qtype: GGMLQuantizationType, q: np.ndarray) -> np.ndarray:
    """The integer part of ``[n, 32]`` blocks as gguf-py's ``quantize_blocks`` lays it out (low nibbles hold
    values 0-15, high nibbles 16-31; Q5's fifth bits in a little-endian 32-bit ``qh`` before them)."""
    if qtype == Q.Q8_0:
        return q.astype(np.int8).view(np.uint8)
    q = q.astype(np.uint8)
    nibbles = (q[:, :16] & np.uint8(0x0F)) | ((q[:, 16:] & np.uint8(0x0F)) << np.uint8(4))
    if qtype in (Q.Q4_0, Q.Q4_1):
        return nibbles
    qh = np.packbits((q >> np.uint8(4)) & np.uint8(1), axis=-1, bitorder="little")
    return np.concatenate([qh, nibbles], axis=-1)


def _on_own_grid(raw: np.ndarray, old: np.ndarray, target: np.ndarray, edited: np.ndarray,
                 qtype: GGMLQuantizationType, tensor: str) -> tuple[np.ndarray, np.ndarray]:
    """One block position of every row (``raw`` ``[rows, type_size]``) with the edited values ``target`` put back.

    Where the edited values fall inside the block's own grid (``d``, ``m`` unchanged), only their integers are
    re-rounded and every other byte stays: nothing else moves. A row whose edited value falls outside (or whose
    block has ``d = 0``) is requantised with gguf-py's quantiser, which refits its grid. Returns the new bytes and
    which rows were refit."""
    header, offset, low, high = _GRIDS[qtype]
    d = np.ascontiguousarray(raw[:, 0:2]).view(np.float16)[:, 0].astype(np.float64)[:, None]
    m = (np.ascontiguousarray(raw[:, 2:4]).view(np.float16)[:, 0].astype(np.float64)[:, None]
         if header == 4 else np.zeros_like(d))
    safe = np.where(d == 0, 1.0, d)
    q = np.rint((old - m) / safe) + offset
    live = d[:, 0] != 0  # a block with d = 0 holds m alone: its integers cannot be read back, nor matter
    if not np.array_equal(_pack(qtype, q[live]), raw[live, header:]):
        raise EditError(f"{tensor}: the {qtype.name} blocks do not unpack as gguf-py lays them out")
    wanted = np.floor((target - m) / safe + 0.5) + offset  # round half up, as gguf-py's quantisers
    inside = ((wanted[:, edited] >= low) & (wanted[:, edited] <= high)).all(axis=1) & live
    q[:, edited] = wanted[:, edited]
    new = raw.copy()
    new[inside, header:] = _pack(qtype, q[inside].clip(low, high))
    if (~inside).any():
        new[~inside] = quantize(target[~inside].astype(np.float32), qtype)
    return new, ~inside
