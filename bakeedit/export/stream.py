"""Fold a linear :class:`EditPlan` into a safetensors checkpoint tensor by tensor, without building the model.

For checkpoints larger than memory (a 70B model in bf16 is 140 GB). Everything the in-memory fold learns from the
model comes from the config here: ``ModelLayout.for_config`` gives module paths, sites and channels, the ArchSpec
says whether weights are stored transposed (GPT-2's ``Conv1D``), and :func:`bakeedit.edit.fold.fold_targets` /
:func:`~bakeedit.edit.fold.scaled` (the same functions ``fold_plan`` calls) give the tensor names, the axis and the
arithmetic, so each baked tensor is byte-identical to the in-memory fold of a model loaded in the checkpoint's dtype.

How a shard is written (cf. mergekit's ``TensorWriter``, which buffers a whole shard and calls ``save_file``):
scaling changes neither a tensor's dtype nor its shape, so the baked shard has *the same header* as the base shard,
byte for byte. The header is written first, then the tensors in file order: runs of untouched tensors are copied
with ``copy_file_range`` (in the kernel, no user-space buffer, never converted), and each edited tensor is read,
scaled and written in row blocks of at most ``chunk_bytes`` of float32. Memory therefore stays at a few blocks
whatever the tensor sizes, and names, shard layout, ``__metadata__`` and the index are kept exactly. Tokenizer,
config, generation config, licence and custom-code files are copied; other weight formats (``*.bin``,
``consolidated.*``, ``original/``) are not, as they would ship the unedited weights.

Write into the temporary folder of :func:`bakeedit.io.staging.staged_output` (:func:`bake_checkpoint` does),
so an error removes everything and a killed run leaves only a hidden temporary that the next run deletes.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bakeedit.edit.fold import FoldedTensor, channel_factors, fold_targets, scaled
from bakeedit.edit.plan import EditPlan
from bakeedit.errors import EditError, ModelLoadError
from bakeedit.export.save import LICENSE_FILES
from bakeedit.io.ownership import Protected
from bakeedit.io.shards import (
    FLOAT_DTYPES,
    INDEX_FILE,
    SINGLE_FILE,
    Checkpoint,
    Shard,
    TensorEntry,
    copy_range,
    is_safetensors_checkpoint,
    read_bytes,
    write_bytes,
)
from bakeedit.io.staging import staged_output
from bakeedit.models.arch import ModelLayout
from bakeedit.models.lazy import stored_tensor_name
from bakeedit.models.load import LoadedModel

DEFAULT_CHUNK_BYTES = 64 << 20
#: Files carried into the baked folder besides the shards (by suffix), unless excluded below.
CARRIED_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken", ".py")
#: Not carried: indexes of other weight formats (their weights are not edited), and bakeedit's own outputs.
NOT_CARRIED = {"pytorch_model.bin.index.json", "tf_model.h5.index.json", "flax_model.msgpack.index.json",
               "bakeedit.json", "neurons.json"}

Report = Callable[[str], None]
OnBytes = Callable[[int, int], None]


@dataclass
class TensorEdit:
    """All the scalings one checkpoint tensor receives, in plan order (fused tensors get one per site)."""

    entry: TensorEntry
    axis: int
    factors: list[torch.Tensor] = field(default_factory=list)


def load_config(folder: Path, trust_remote_code: bool = False):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)


@dataclass
class Skeleton:
    """What the model class says about its parameters, learned from a meta-device instance (no weights allocated):
    which names share one tensor (tied embeddings...) and which checkpoint names transformers rewrites on load."""

    aliases: dict[str, list[str]]
    load_patterns: list[str]

    def converted_on_load(self, stored_name: str) -> bool:
        return any(re.search(p, stored_name) for p in self.load_patterns)


def model_skeleton(config, trust_remote_code: bool = False) -> Skeleton | None:
    """The :class:`Skeleton` of the model ``config`` describes; ``None`` when it cannot be built (exotic config)."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:  # fall back to the checks the checkpoint alone allows
        return None
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    patterns: list[str] = []
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping

        for transform in get_model_conversion_mapping(model, add_legacy=False):
            patterns.extend(getattr(transform, "source_patterns", []) or [])
    except (ImportError, TypeError):
        pass
    return Skeleton(aliases={n: names for names in groups.values() for n in names}, load_patterns=patterns)


def stored_name(ckpt: Checkpoint, name: str, layout: ModelLayout) -> str | None:
    """``name`` as stored: base-model checkpoints (GPT-2 on the Hub) drop the ``transformer.``/``model.`` prefix
    (the rule the blockwise loader reads by, ``models/lazy.py``)."""
    return stored_tensor_name(ckpt, name, layout.spec.blocks)


def plan_tensor_edits(
    ckpt: Checkpoint, layout: ModelLayout, plan: EditPlan, skeleton: Skeleton | None = None
) -> tuple[dict[str, TensorEdit], list[FoldedTensor]]:
    """Map every group of ``plan`` to checkpoint tensors and factor vectors; refuse anything unsafe before writing."""
    if plan.kind != "scale" or getattr(plan, "module_groups", None):
        raise EditError(f"a '{plan.kind}' plan cannot be folded by streaming; only linear all-position scales can",
                        hint="nonlinear or position-scoped edits need the custom module (in-memory path)")
    edits: dict[str, TensorEdit] = {}
    folded: list[FoldedTensor] = []
    for group in plan.groups:
        if group.layer >= layout.n_layers or max(group.indices, default=0) >= layout.site_size(group.site):
            raise EditError(f"plan group layer {group.layer} {group.site} does not fit {ckpt.folder}")
        module = layout.module_name(group.layer, group.site)
        bias = stored_name(ckpt, f"{module}.bias", layout)
        has_bias = skeleton is not None and f"{module}.bias" in skeleton.aliases
        if bias is None and has_bias and layout.site_map(group.site).axis == "out":
            raise EditError(f"{ckpt.folder}: the model has {module}.bias but the checkpoint does not store it",
                            hint="fold in memory (bakeedit apply --in-memory)")
        for target in fold_targets(layout, group, has_bias=bias is not None, stored=True):
            stored = stored_name(ckpt, target.name, layout)
            if stored is None:
                raise EditError(f"{ckpt.folder}: no tensor {target.name} in the checkpoint",
                                hint="is the config.json of this folder the one its weights were saved with?")
            declared = layout.site_map(group.site).stored is not None  # per-expert tensors fused on load: known
            if skeleton is not None and skeleton.converted_on_load(stored) and not declared:
                raise EditError(f"transformers rewrites {stored} when it loads this checkpoint; streaming cannot "
                                "mirror that", hint="fold in memory (bakeedit apply --in-memory)")
            aliases = [a for a in (skeleton.aliases if skeleton else {}).get(target.name, []) if a != target.name]
            if aliases:
                raise EditError(
                    f"{target.name} is tied to {', '.join(aliases)}; folding into it would edit the other tensor too",
                    hint="untie the weights first, or edit a different site",
                )
            entry = ckpt.entry(stored)
            if entry.dtype not in FLOAT_DTYPES:
                raise EditError(f"{stored} is stored as {entry.dtype}; only float checkpoints can be folded",
                                hint="quantized checkpoints need to be dequantized first")
            if target.axis >= len(entry.shape):
                raise EditError(f"{stored} has shape {list(entry.shape)}; expected a channel axis {target.axis}")
            edit = edits.setdefault(stored, TensorEdit(entry, target.axis))
            edit.factors.append(channel_factors(layout, group, entry.shape[target.axis], stored=True))
            folded.append(FoldedTensor(stored, target.axis, len(group.indices)))
    return edits, folded


def _write_scaled(src: int, dst: int, edit: TensorEdit, chunk_bytes: int) -> None:
    """Read, scale and write one tensor in blocks of rows along dim 0; elementwise, so blocks change no bit."""
    entry = edit.entry
    dtype = FLOAT_DTYPES[entry.dtype]
    rows = entry.shape[0]
    row_elems = max(1, entry.nbytes // max(1, rows) // dtype.itemsize)
    step = max(1, chunk_bytes // (4 * row_elems))
    row_bytes = row_elems * dtype.itemsize
    for first in range(0, rows, step):
        last = min(rows, first + step)
        offset = entry.start + first * row_bytes
        block = read_bytes(src, offset, (last - first) * row_bytes).view(dtype).view(last - first, *entry.shape[1:])
        for full in edit.factors:
            block = scaled(block, edit.axis, full[first:last] if edit.axis == 0 else full)
        write_bytes(dst, block, offset)


def _write_shard(shard: Shard, out: Path, edits: dict[str, TensorEdit], chunk_bytes: int,
                 on_bytes: Callable[[int], None]) -> None:
    """The baked copy of one shard: same header, untouched byte runs copied, edited tensors rewritten.

    Reads and writes go through file descriptors, whose errors (a full disk, an I/O error) name no file: they are
    re-raised naming the shard being written, so the user learns which disk is full."""
    try:
        _copy_shard(shard, out, edits, chunk_bytes, on_bytes)
    except OSError as exc:
        if exc.filename is not None or exc.errno is None:
            raise
        raise OSError(exc.errno, exc.strerror, str(out)) from exc


def _copy_shard(shard: Shard, out: Path, edits: dict[str, TensorEdit], chunk_bytes: int,
                on_bytes: Callable[[int], None]) -> None:
    src = os.open(shard.path, os.O_RDONLY)
    dst = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # the umask decides, as for every file
    try:
        os.write(dst, shard.header)
        run_start = run_end = shard.data_start
        for entry in shard.in_file_order():
            edit = edits.get(entry.name)
            if edit is None:
                run_end = entry.end
                continue
            copy_range(src, dst, run_start, run_start, run_end - run_start)
            on_bytes(run_end - run_start)
            _write_scaled(src, dst, edit, chunk_bytes)
            on_bytes(entry.nbytes)
            run_start = run_end = entry.end
        copy_range(src, dst, run_start, run_start, run_end - run_start)
        on_bytes(run_end - run_start)
        if os.fstat(dst).st_size != shard.size:
            raise EditError(f"{out}: wrote {os.fstat(dst).st_size} bytes, expected {shard.size}")
    finally:
        os.close(src)
        os.close(dst)


def carried_files(folder: Path) -> tuple[list[Path], list[str]]:
    """The non-weight files to copy into the baked folder, and the names left out (for the user to know)."""
    carried, skipped = [], []
    for path in sorted(Path(folder).iterdir()):
        name = path.name
        if name in (SINGLE_FILE, INDEX_FILE) or (path.suffix == ".safetensors" and path.is_file()):
            continue  # the shards themselves (any other .safetensors is not in the index: reported below)
        if path.is_file() and not name.startswith(".") and name not in NOT_CARRIED and (
            path.suffix in CARRIED_SUFFIXES or name in LICENSE_FILES
        ):
            carried.append(path)
        else:
            skipped.append(name + ("/" if path.is_dir() else ""))
    return carried, skipped


def stream_bake(
    base_folder: Path,
    plan: EditPlan,
    out_folder: Path,
    *,
    layout: ModelLayout | None = None,
    trust_remote_code: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    report: Report | None = None,
    on_bytes: OnBytes | None = None,
    on_shard: Callable[[Path, Path], None] | None = None,
) -> list[FoldedTensor]:
    """Write the baked checkpoint of ``base_folder`` into ``out_folder`` (a staged temporary folder).

    ``layout`` defaults to the one of ``base_folder/config.json``. ``on_bytes(done, total)`` reports progress over
    the shards' bytes; ``report`` receives one-line notes (files not carried over); ``on_shard(base, baked)`` gets
    each shard's two paths once the baked one is complete (the low-memory apply hashes both while the next shard is
    written: ``io/hashing.BackgroundHashes``). Returns the tensors changed, one entry per plan group and tensor, like
    :func:`bakeedit.edit.fold.fold_plan`.
    """
    base_folder, out_folder = Path(base_folder), Path(out_folder)
    ckpt = Checkpoint.open(base_folder)
    config = load_config(base_folder, trust_remote_code)
    layout = layout or ModelLayout.for_config(config)
    edits, folded = plan_tensor_edits(ckpt, layout, plan, model_skeleton(config, trust_remote_code))
    in_index = {s.path.name for s in ckpt.shards}
    out_folder.mkdir(parents=True, exist_ok=True)
    total, done = ckpt.total_bytes, 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if on_bytes is not None:
            on_bytes(done, total)

    for shard in ckpt.shards:
        mine = {name: edits[name] for name in shard.entries if name in edits}
        _write_shard(shard, out_folder / shard.path.name, mine, chunk_bytes, advance)
        advance(len(shard.header))
        if on_shard is not None:
            on_shard(shard.path, out_folder / shard.path.name)
    if ckpt.index_path is not None:
        shutil.copyfile(ckpt.index_path, out_folder / INDEX_FILE)
    carried, skipped = carried_files(base_folder)
    for path in carried:
        shutil.copyfile(path, out_folder / path.name)
    skipped += [p.name for p in base_folder.glob("*.safetensors") if p.name not in in_index]
    if skipped and report is not None:
        report(f"not copied from {base_folder}: {', '.join(sorted(skipped))}")
    return folded


def edited_dtype(base_folder: Path, plan: EditPlan, layout: ModelLayout | None = None) -> torch.dtype:
    """The stored dtype of the tensors ``plan`` edits (the least precise if they differ): a streamed bake keeps it,
    so its verification tolerance is that dtype's (``export/verify.py: default_tolerance``)."""
    ckpt = Checkpoint.open(Path(base_folder))
    layout = layout or ModelLayout.for_config(load_config(Path(base_folder)))
    edits, _ = plan_tensor_edits(ckpt, layout, plan)
    dtypes = {FLOAT_DTYPES[e.entry.dtype] for e in edits.values()} or {torch.float32}
    return max(dtypes, key=lambda d: torch.finfo(d).eps)


def streaming_blocker(
    base_folder: Path, plan: EditPlan, dtype: str = "auto", trust_remote_code: bool = False,
    layout: ModelLayout | None = None,
) -> str | None:
    """Why ``bakeedit apply`` must fold in memory rather than stream, or ``None`` when it can stream.

    ``dtype`` is the recipe's ``model.dtype``: streaming keeps the stored dtype, so an explicit different one (a
    conversion) needs the in-memory path.
    """
    if plan.kind != "scale" or getattr(plan, "module_groups", None):
        return "the plan has nonlinear or position-scoped edits, which need the custom module"
    base = Path(base_folder)
    if not is_safetensors_checkpoint(base):
        return f"{base_folder} is not a folder of safetensors shards"
    try:  # every refusal of plan_tensor_edits (tied, converted on load, not float, missing bias...), before writing
        config = load_config(base, trust_remote_code)
        edits, _ = plan_tensor_edits(Checkpoint.open(base), layout or ModelLayout.for_config(config), plan,
                                     model_skeleton(config, trust_remote_code))
    except (EditError, ModelLoadError) as exc:
        return str(exc)
    stored = {FLOAT_DTYPES[e.entry.dtype] for e in edits.values()}
    if dtype != "auto" and stored != {getattr(torch, dtype)}:
        return f"model.dtype {dtype} differs from the checkpoint's stored dtype (streaming never converts)"
    return None


@dataclass
class StreamedBake:
    """What :func:`stream_for_apply` wrote: the tensors changed, and the dtype they are stored in (the baked folder
    keeps the base's dtype, so verification uses that dtype's tolerance and provenance records it)."""

    folded: list[FoldedTensor]
    stored_dtype: torch.dtype


def stream_for_apply(
    loaded: LoadedModel,
    plan: EditPlan,
    folder: Path,
    *,
    dtype: str = "auto",
    in_memory: bool = False,
    trust_remote_code: bool = False,
    report: Report | None = None,
    on_bytes: OnBytes | None = None,
) -> StreamedBake | None:
    """The fold step of ``bakeedit apply``: stream ``plan`` into ``folder`` (apply's staged temporary folder) from
    the checkpoint ``loaded`` was read from, or return ``None`` when apply must fold in memory and save.

    ``loaded.source.path`` is the base checkpoint folder for every kind of model reference (a Hub snapshot, a
    local folder, the safetensors cache of a GGUF or of the embedded model). ``dtype`` is the recipe's
    ``model.dtype``; ``in_memory=True`` (``--in-memory``) forces the old path. Why streaming was not possible
    goes to ``report``. Streaming writes exactly the tensors the in-memory fold of a model loaded in the stored dtype
    would (byte for byte), copies every other tensor unconverted and keeps shard layout, index and config.
    """
    if in_memory:
        return None
    base = Path(loaded.source.path)
    blocker = streaming_blocker(base, plan, dtype, trust_remote_code, loaded.layout)
    if blocker is not None:
        if report is not None:
            report(f"folding in memory: {blocker}")
        return None
    folded = stream_bake(base, plan, folder, layout=loaded.layout, trust_remote_code=trust_remote_code,
                         report=report, on_bytes=on_bytes)
    return StreamedBake(folded, edited_dtype(base, plan, loaded.layout))


def bake_checkpoint(
    base_folder: Path, plan: EditPlan, out: Path, overwrite: bool = False, **kwargs
) -> list[FoldedTensor]:
    """:func:`stream_bake` into ``out`` through a staged folder: all or nothing (and never into, onto or above the
    base folder, which replacing ``out`` would destroy)."""
    with staged_output(Path(out), overwrite, [Protected("the base model's folder", Path(base_folder))]) as tmp:
        return stream_bake(base_folder, plan, tmp, **kwargs)
