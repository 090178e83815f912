"""Write a linear edit into a GGUF file itself, keeping its quantization types, tensor order, metadata and tokenizer.

The edited tensors are found the way llama.cpp's converter names them: the site's module (``model.layers.3.
self_attn.q_proj``) through gguf-py's tensor name map (``blk.3.attn_q``; fused ``attn_qkv``/``ffn_up`` as
llama.cpp stores Phi-3 and GPT-2). GGUF stores every weight ``[out, in]`` (llama.cpp transposes GPT-2's Conv1D),
so an output-channel site is a row and an input-channel site a column. Where each kind goes:

* **rows** (``attn.q/k/v``, ``mlp.gate``, ``mlp.up``, and ``mlp.act`` of a gated MLP, folded into ``up`` row
  ``i`` because ``act(gate_i) * up_i`` scales exactly with it): the block scale fields are multiplied, the
  quantized integers left alone (``export/gguf_blocks.py``); the row's bias, if the file has one, too.
* **Q/K rows of llama-family models** are permuted by the converter (``LlamaModel.permute``: per head, HF's
  split-half RoPE pairs become interleaved pairs): HF channel ``c`` is GGUF row :func:`qk_rows`\\ ``[c]``, derived
  by applying that same formula to the row numbers. It is what transformers' GGUF loader undoes
  (``LlamaTensorProcessor._reverse_permute_weights``). V, FFN and output rows are not permuted.
* **columns** (``attn.o_in``, ``mlp.act`` of a non-gated MLP): de-quantise, scale, requantise, for the types the
  gguf package can quantise; other types are refused in one line naming the alternatives.

The file is written with gguf-py's ``GGUFWriter``: every metadata field copied as stored (strings as raw bytes),
tensors in the same order with the same types and shapes; only edited tensors' bytes differ. The folder (GGUF,
``Modelfile``, card, ``bakeedit.json``) is staged and renamed into place only after verification
(``export/gguf_verify.py``; docs/export.md, "Baked GGUF").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field

from bakeedit.edit.plan import EditPlan
from bakeedit.errors import EditError, ModelLoadError, UnsupportedArchitecture
from bakeedit.export.gguf_blocks import ROW_SCALE_FIELDS, Scaling, scale_columns, scale_rows
from bakeedit.models.arch import ModelLayout
from bakeedit.models.embedded import check_gguf_magic
from bakeedit.models.spec import expert_site

Axis = str  # "row" | "column"


@dataclass
class GgufSource:
    """An open GGUF file: its reader (memory-mapped, read only), architecture and tensors by name, in file order."""

    path: Path
    reader: object  # gguf.GGUFReader
    architecture: str
    tensors: dict[str, object] = field(default_factory=dict)  # name -> gguf.ReaderTensor

    def field(self, key: str):
        found = self.reader.fields.get(key)
        return found.contents() if found is not None else None

    def n_rows(self, name: str) -> int:
        shape = [int(n) for n in self.tensors[name].shape]  # ggml order: [ne0 = in, ne1 = out, ...]
        return shape[1] if len(shape) >= 2 else shape[0]

    def n_cols(self, name: str) -> int:
        return int(self.tensors[name].shape[0])


def read_gguf(path: Path) -> GgufSource:
    """Open ``path`` with gguf-py's reader; a file that is not GGUF or is damaged is a :class:`ModelLoadError`."""
    from gguf import GGUFReader  # start-up time: gguf is read only for GGUF outputs

    path = Path(path)
    check_gguf_magic(path)
    try:
        reader = GGUFReader(path, "r")
        architecture = reader.fields["general.architecture"].contents()
    except (ValueError, KeyError, IndexError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelLoadError(f"'{path}' is a damaged GGUF file ({first})", hint="download the file again") from exc
    return GgufSource(path, reader, architecture, {t.name: t for t in reader.tensors})


# ------------------------------------------------------------------------------------------------ plan -> tensors


@dataclass(frozen=True)
class TensorEdit:
    """One GGUF tensor's share of a plan: rows (or columns) ``indices`` times ``factors``; ``sites`` for messages.

    ``module`` and ``channels`` say where the same rows are in the transformers model (the module's output or
    input channels, before the Q/K permutation), for the rounding sensitivity of the check."""

    tensor: str
    axis: Axis
    indices: tuple[int, ...]
    factors: tuple[float, ...]
    sites: tuple[str, ...]
    module: str = ""
    channels: tuple[int, ...] = ()


def llama_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` (convert_hf_to_gguf.py / conversion/llama.py), verbatim in numpy."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def qk_rows(n_rows: int, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """``rows[c]``: the GGUF row holding HF channel ``c`` of a Q (``n_head_kv = n_head``) or K projection.

    The converter writes GGUF row ``g`` from HF row ``order[g]`` with ``order = permute(arange)``; this is its
    inverse."""
    order = llama_permute(np.arange(n_rows), n_head, n_head_kv)
    rows = np.empty(n_rows, dtype=np.int64)
    rows[order] = np.arange(n_rows)
    return rows


def _name_map(source: GgufSource, n_layers: int):
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    arch = next((k for k, v in MODEL_ARCH_NAMES.items() if v == source.architecture), None)
    if arch is None:
        raise UnsupportedArchitecture(f"{source.path.name}: gguf-py knows no architecture '{source.architecture}'")
    return get_tensor_name_map(arch, n_layers)


def _stored_site(layout: ModelLayout, site: str) -> tuple[str, str]:
    """(the site whose tensor holds the channels, its axis): ``mlp.act`` of a gated MLP lives in the up rows."""
    smap = layout.site_map(site)
    if site.endswith(".act"):
        prefix = site.removesuffix(".act")
        if f"{prefix}.gate" in layout.spec.sites and f"{prefix}.up" in layout.spec.sites:
            return f"{prefix}.up", "row"
    return site, "row" if smap.axis == "out" else "column"


def plan_gguf_edits(source: GgufSource, plan: EditPlan, layout: ModelLayout, *,
                    permute_qk: bool | None = None) -> list[TensorEdit]:
    """The tensors of ``source`` that ``plan`` scales, with GGUF row/column numbers and one factor per index.

    ``permute_qk`` None takes the family's ``gguf_permute_qk`` fact (llama, mistral, granite, smollm3: llama.cpp's
    converter permutes their Q/K rows); edits of one tensor from several sites multiply (``mlp.up`` and the
    ``mlp.act`` folded into the same row). Refuses, before anything is written, what a GGUF cannot carry."""
    if plan.module_groups:
        raise EditError("a GGUF file can carry only linear scales at all positions: this plan has nonlinear or "
                        "position-scoped edits, which need the custom-module checkpoint (docs/nonlinear.md)")
    if permute_qk is None:
        permute_qk = bool(layout.spec.facts.get("gguf_permute_qk", False))
    names = _name_map(source, layout.n_layers)
    merged: dict[tuple[str, Axis], dict[int, float]] = {}
    sites: dict[tuple[str, Axis], list[str]] = {}
    hf: dict[tuple[str, Axis], tuple[str, dict[int, int]]] = {}
    for group in plan.groups:
        where = f"layer {group.layer} {group.site}"
        if expert_site(group.site) is not None:
            raise EditError(f"{where}: routed experts are stored as 3D expert tensors in a GGUF file, which bakeedit "
                            "does not edit; bake to safetensors instead")
        stored, axis = _stored_site(layout, group.site)
        module = layout.module_name(group.layer, stored)
        base = names.get_name(module)
        if base is None or f"{base}.weight" not in source.tensors:
            raise UnsupportedArchitecture(f"{where}: {source.path.name} has no tensor for {module} "
                                          f"(looked for {base or 'a gguf-py name'}.weight)")
        weight = f"{base}.weight"
        channels = layout.channels(stored, group.indices).numpy()
        hf_channels = channels.tolist()
        if axis == "row" and permute_qk and group.site in ("attn.q", "attn.k"):
            if not base.endswith((".attn_q", ".attn_k")):
                raise UnsupportedArchitecture(f"{where}: Q/K rows are permuted but {weight} is not a separate "
                                              "attn_q/attn_k tensor; bakeedit knows no such layout")
            kv = layout.dims.n_heads if group.site == "attn.q" else layout.dims.n_kv_heads
            channels = qk_rows(source.n_rows(weight), layout.dims.n_heads, kv)[channels]
        size = source.n_rows(weight) if axis == "row" else source.n_cols(weight)
        if len(source.tensors[weight].shape) != 2 or int(channels.max()) >= size:
            raise UnsupportedArchitecture(f"{where}: {weight} has shape {list(source.tensors[weight].shape)}, "
                                          f"which does not hold channel {int(channels.max())} as a {axis}")
        targets = [weight] + ([f"{base}.bias"] if axis == "row" and f"{base}.bias" in source.tensors else [])
        for name in targets:
            factors = merged.setdefault((name, axis), {})
            origin = hf.setdefault((name, axis), (module, {}))[1]
            for channel, hf_channel, lam in zip(channels.tolist(), hf_channels, group.lambdas, strict=True):
                factors[channel] = factors.get(channel, 1.0) * lam
                origin[channel] = hf_channel
            sites.setdefault((name, axis), []).append(where)
    edits = []
    for (name, axis), f in merged.items():
        module, origin = hf[(name, axis)]
        rows = sorted(f)
        edits.append(TensorEdit(name, axis, tuple(rows), tuple(f[i] for i in rows), tuple(sites[(name, axis)]),
                                module, tuple(origin[i] for i in rows)))
    return edits


# ------------------------------------------------------------------------------------------------ tensors


class GgufChange(BaseModel):
    """One tensor the bake changed, as ``bakeedit.json`` records it (see :class:`~bakeedit.export.gguf_blocks.
    Scaling` for the measured fields)."""

    tensor: str
    type: str
    axis: str
    sites: list[str]
    n_channels: int
    method: str
    exact: bool
    rel_error: float
    blocks_requantised: int = 0
    blocks_refit: int = 0
    moved_max_abs: float = 0.0
    moved_max_rel: float = 0.0
    moved_fraction: float = 0.0
    edited_max_abs_error: float = 0.0
    field_eps: list[float] = Field(default_factory=list)


def apply_edits(source: GgufSource, edits: Sequence[TensorEdit]) -> tuple[dict[str, np.ndarray], list[GgufChange]]:
    """The new data of every edited tensor (in the reader's layout and type) and what each change did."""
    if edits and source.reader.endianess.name != "LITTLE":
        raise EditError(f"{source.path.name} is a big-endian GGUF file; bakeedit edits little-endian files only")
    replaced: dict[str, np.ndarray] = {}
    changes = []
    for edit in edits:
        tensor = source.tensors[edit.tensor]
        qtype = tensor.tensor_type
        indices, factors = np.array(edit.indices), np.array(edit.factors)
        what = " and ".join(sorted(set(s.split(" ", 2)[2] for s in edit.sites)))
        if edit.axis == "row":
            data, scaling = scale_rows(tensor.data, qtype, indices, factors, edit.tensor)
        else:
            data, scaling = scale_columns(tensor.data, qtype, indices, factors, edit.tensor, what)
        replaced[edit.tensor] = data
        changes.append(_change(edit, qtype.name, scaling))
    return replaced, changes


def _change(edit: TensorEdit, type_name: str, scaling: Scaling) -> GgufChange:
    return GgufChange(tensor=edit.tensor, type=type_name, axis=edit.axis, sites=list(edit.sites),
                      n_channels=len(edit.indices), **asdict(scaling))


def _field_value(reader_field):
    """A metadata field's value as the writer takes it, strings as their stored bytes (never re-encoded)."""
    from gguf import GGUFValueType

    main = reader_field.types[0]
    if main == GGUFValueType.STRING:
        return bytes(reader_field.parts[-1])
    if main == GGUFValueType.ARRAY:
        sub = reader_field.types[-1]
        if len(reader_field.types) > 2:
            raise EditError(f"metadata field {reader_field.name} is a nested array, which bakeedit cannot copy")
        if sub == GGUFValueType.STRING:
            return [bytes(reader_field.parts[i]) for i in reader_field.data]
        return reader_field.contents()
    return reader_field.contents()


def write_gguf(source: GgufSource, out: Path, replaced: dict[str, np.ndarray]) -> None:
    """Write ``source`` to ``out`` with the tensors in ``replaced`` swapped in: same metadata (in order), same
    tensors, types, shapes and alignment. A copy with nothing replaced is byte-identical to a file gguf-py wrote."""
    from gguf import GGUFValueType, GGUFWriter

    reader = source.reader
    writer = GGUFWriter(out, arch=source.architecture, endianess=reader.endianess)
    alignment = reader.fields.get("general.alignment")
    if alignment is not None:
        writer.data_alignment = int(alignment.contents())
    for f in reader.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue  # the writer's own header fields, and the architecture it was given
        sub = f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(f.name, _field_value(f), f.types[0], sub_type=sub)
    for tensor in reader.tensors:
        data = replaced.get(tensor.name, tensor.data)
        writer.add_tensor_info(tensor.name, data.shape, data.dtype, data.nbytes, tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(replaced.get(tensor.name, tensor.data), tensor_endianess=reader.endianess)
    writer.close()


def exact_problems(source: GgufSource, baked: Path, expected: dict[str, np.ndarray],
                   changes: Sequence[GgufChange]) -> list[str]:
    """The exact leg of a GGUF bake, read back from the written file: the same metadata fields and values (in
    order), the same tensors in the same order with the same types and shapes, every edited tensor equal to
    ``expected`` (the edit of the source tensor) bit for bit, every other tensor byte-identical to the source's,
    and in a tensor whose rows were scaled through their block scales every other byte (the quantized integers)
    identical to the source's. Returns the problems, empty when the file is as promised."""
    from gguf import GGML_QUANT_SIZES

    other = read_gguf(baked)
    problems = []
    skip = ("GGUF.",)
    old_fields = {k: _field_value(f) for k, f in source.reader.fields.items() if not k.startswith(skip)}
    new_fields = {k: _field_value(f) for k, f in other.reader.fields.items() if not k.startswith(skip)}
    if list(old_fields) != list(new_fields):
        problems.append("the metadata keys differ from the source's (or their order)")
    problems += [f"metadata {k} differs" for k in old_fields if k in new_fields and old_fields[k] != new_fields[k]]
    if [(t.name, t.tensor_type, list(t.shape)) for t in source.reader.tensors] != [
            (t.name, t.tensor_type, list(t.shape)) for t in other.reader.tensors]:
        return [*problems, "the tensor list (names, order, types or shapes) differs from the source's"]
    by_name = {c.tensor: c for c in changes}
    for old in source.reader.tensors:
        new = other.tensors[old.name]
        a = np.ascontiguousarray(old.data).view(np.uint8).reshape(old.data.shape[0], -1)
        b = np.ascontiguousarray(new.data).view(np.uint8).reshape(old.data.shape[0], -1)
        change = by_name.get(old.name)
        if old.name in expected and not np.array_equal(
                b, np.ascontiguousarray(expected[old.name]).view(np.uint8).reshape(b.shape)):
            problems.append(f"{old.name} is not the edit of the source tensor")
        if change is None:
            if not np.array_equal(a, b):
                problems.append(f"{old.name} changed, but the plan does not edit it")
        elif change.method == "scale fields":
            size = GGML_QUANT_SIZES[old.tensor_type][1]
            keep = np.ones(size, dtype=bool)
            for offset in ROW_SCALE_FIELDS[old.tensor_type]:
                keep[offset:offset + 2] = False
            if not np.array_equal(a.reshape(a.shape[0], -1, size)[..., keep],
                                  b.reshape(b.shape[0], -1, size)[..., keep]):
                problems.append(f"{old.name}: bytes other than the block scales changed")
    return problems
