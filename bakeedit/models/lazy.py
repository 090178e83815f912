"""Blockwise ("lazy") execution: run a causal LM whose weights stay in their safetensors shards, one block at a time.

For models larger than memory (issue #15). The model class is built with its **parameters on the meta device**
(:func:`params_on_meta`, like accelerate's ``init_empty_weights(include_buffers=False)``: buffers such as rotary
``inv_freq`` are real), and the network is cut into *units*: each decoder block, and each top-level module outside
the blocks that has parameters (embeddings, final norm, LM head). A unit's ``forward`` is wrapped: its parameters
are read from the shards (:class:`bakeedit.io.shards.Checkpoint`, ``pread``) and converted to the run dtype just
before the model's own forward code runs, and put back on meta right after. Nothing else changes, so hooks that
locate methods and runtime edits register on submodules (``ModelLayout.module(model, layer, site)``) fire as usual
and the results equal the in-memory model's. Each unit is read once per forward call (a batch) and never two at
once: memory is one block plus the activations at the unit boundaries.

Gradients (KnowBias' integrated gradients, INE's query scores): under ``torch.is_grad_enabled()`` each unit runs in
``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`` with the load and release *inside* the checkpointed
function, so autograd keeps only the unit boundaries and backward recomputes one block at a time. The recomputation
sees each submodule as it was during the forward (its hooks, an expert-hook ``forward``) and each KV cache as it was
before the block ran, even when the hooks were removed before ``backward`` (IG takes its gradient after leaving
``site_hooks``) or the cache has since grown. Parameters never require gradients here (a weight gradient would keep
every block alive).

A parameter read *outside* its unit's forward (INE reads the unembedding, the norms' gains and the write matrices;
a hook registration asks a weight's shape) is read from the shards on access, converted, and not kept: the module's
``_parameters`` is a dict whose item lookup does that for a meta entry, while iteration (``parameters()``,
``state_dict()``) still sees the meta tensors. The root module holds one empty real parameter first
(:data:`ANCHOR`), so the usual ``next(model.parameters()).device`` / ``.dtype`` give the execution device and
dtype, not meta.

The cost: every forward reads every unit from disk (or the page cache); on a model that fits, the in-memory path is
faster (docs/performance.md).
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from bakeedit.errors import ModelLoadError
from bakeedit.io.shards import FLOAT_DTYPES, Checkpoint, is_safetensors_checkpoint
from bakeedit.models.arch import ModelLayout
from bakeedit.models.replay import ForwardState

#: Name of the empty real parameter the root module holds first (see the module docstring).
ANCHOR = "bakeedit_device_anchor"
_STATE = "_bakeedit_lazy"
#: The in-memory path is chosen when the checkpoint in the run dtype takes at most this share of available memory:
#: the rest is for activations, the tokenizer, Python and the loader's own transient copies.
MEMORY_SHARE = 0.8
_GIB = 1 << 30


# --------------------------------------------------------------------------------------------- memory decision

def available_memory() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (what the kernel can give without swapping); ``None`` where
    there is no such file (psutil is not a runtime dependency)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def checkpoint_bytes(folder: Path, dtype: torch.dtype) -> int:
    """What the weights of the safetensors checkpoint ``folder`` take once loaded in ``dtype`` (float tensors are
    converted, others keep their size)."""
    ckpt = Checkpoint.open(Path(folder))
    total = 0
    for shard in ckpt.shards:
        for entry in shard.entries.values():
            if entry.dtype in FLOAT_DTYPES and FLOAT_DTYPES[entry.dtype].itemsize:
                total += entry.nbytes // FLOAT_DTYPES[entry.dtype].itemsize * dtype.itemsize
            else:
                total += entry.nbytes
    return total


def _gib(n: int) -> str:
    return f"{n / _GIB:.1f} GiB" if n >= _GIB // 10 else f"{n / (1 << 20):.1f} MiB"


def fits_in_memory(folder: Path, dtype: torch.dtype) -> tuple[bool, str]:
    """Whether the checkpoint in ``folder``, loaded in ``dtype``, fits in the memory available now, and why, as one
    sentence (``bakeedit locate``/``eval`` print it). Not a safetensors folder, or no way to read the available
    memory: it is taken to fit (the in-memory loader is the only one that reads other formats)."""
    name = str(dtype).removeprefix("torch.")
    if not is_safetensors_checkpoint(Path(folder)):
        return True, "the checkpoint is not a safetensors folder, which only the in-memory loader reads"
    need = checkpoint_bytes(Path(folder), dtype)
    free = available_memory()
    if free is None:
        return True, f"the checkpoint needs {_gib(need)} in {name} and the available memory cannot be read"
    if need <= MEMORY_SHARE * free:
        return True, f"the checkpoint needs {_gib(need)} in {name} and {_gib(free)} of memory is available"
    return False, (f"the checkpoint needs {_gib(need)} in {name} but only {_gib(free)} of memory is available "
                   f"(at most {MEMORY_SHARE:.0%} of it is used for the weights)")


#: A unit at least this large (in its run dtype) makes :func:`lazy_model` call
#: :func:`return_large_frees_to_the_system`: then the memory a released block leaves behind matters more than the
#: cost of an ``mmap`` per large allocation (which slows the tensor operations of a small model measurably).
LARGE_UNIT_BYTES = 256 << 20


def _unit_bytes(unit: Unit) -> int:
    return sum(math.prod(s.source.shape) * s.source.dtype.itemsize for s in unit.slots)


def return_large_frees_to_the_system() -> None:
    """Make glibc serve every allocation of 1 MiB or more with its own ``mmap`` (``mallopt(M_MMAP_THRESHOLD)``), so
    that a released block goes back to the system at once. By default glibc raises that threshold after each large
    free (up to 32 MiB), and the next blocks' tensors then come from the heap, which it rarely gives back: a
    blockwise run's resident memory would creep towards several blocks. Process-wide and for the rest of the
    process (every later allocation of 1 MiB or more is an ``mmap``, slower), so :func:`lazy_model` calls it only
    for a model whose units are large (:data:`LARGE_UNIT_BYTES`); a no-op where the C library is not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


# --------------------------------------------------------------------------------------------- building on meta

@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Every parameter registered inside the block is moved to the meta device as it is registered (no memory, no
    initialisation cost); buffers stay real. Patches ``nn.Module.register_parameter`` for the duration."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and not param.is_meta:
            cls = type(module._parameters[name])
            extra = dict(module._parameters[name].__dict__)
            meta = cls(module._parameters[name].to("meta"), requires_grad=param.requires_grad)
            meta.__dict__.update(extra)
            module._parameters[name] = meta

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def stored_tensor_name(ckpt: Checkpoint, name: str, blocks: str) -> str | None:
    """``name`` as the checkpoint stores it: base-model checkpoints (GPT-2 on the Hub) drop the ``transformer.`` /
    ``model.`` prefix of the block path (the same rule as ``export/stream.py``'s ``stored_name``)."""
    if name in ckpt:
        return name
    prefix = blocks.split(".")[0] + "."
    short = name.removeprefix(prefix)
    return short if short != name and short in ckpt else None


@dataclass(frozen=True)
class TensorSource:
    """Where a parameter's values come from: one stored tensor, or (a fused routed-experts parameter) the per-expert
    tensors, concatenated per expert and stacked, as transformers fuses them on load."""

    stored: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: torch.dtype
    experts: int = 0


def _block_param(name: str, blocks: str) -> tuple[int, str] | None:
    m = re.match(rf"{re.escape(blocks)}\.(\d+)\.(.+)$", name)
    return (int(m[1]), m[2]) if m else None


def _resolve(ckpt: Checkpoint, layout: ModelLayout, names: list[str], meta: torch.Tensor,
             dtype: torch.dtype, renamed: dict[str, str]) -> TensorSource:
    """The :class:`TensorSource` of a parameter known by ``names`` (a tied one has several); ``renamed`` maps model
    names to the stored names transformers renames on load (GPT-NeoX's ``embed_out`` is ``lm_head``). Refuse a
    parameter the checkpoint does not hold, or holds with another shape, before anything runs."""
    blocks = layout.spec.blocks
    for name in names:
        stored = renamed.get(name) or stored_tensor_name(ckpt, name, blocks)
        if stored is not None:
            shape = ckpt.entry(stored).shape
            if tuple(shape) != tuple(meta.shape):
                raise ModelLoadError(f"{ckpt.folder}: tensor {stored} has shape {list(shape)}, the model's {name} "
                                     f"{list(meta.shape)}", hint="is config.json the one these weights were saved "
                                     "with?")
            return TensorSource((stored,), tuple(meta.shape), dtype)
        where = _block_param(name, blocks)
        parts = layout.stored_parts(*where) if where is not None else None
        if parts:
            found = [stored_tensor_name(ckpt, p, blocks) for p in parts]
            if None not in found:
                return TensorSource(tuple(found), tuple(meta.shape), dtype, experts=int(meta.shape[0]))  # type: ignore[arg-type]
    raise ModelLoadError(
        f"{ckpt.folder}: no tensor for the model's parameter {names[0]}",
        hint="blockwise execution reads each parameter by its name; run in memory (--execution in-memory)",
    )


# --------------------------------------------------------------------------------------------- the lazy state

class _LazyParameters(dict):
    """A module's ``_parameters``: item lookup (``module.weight``) of a meta entry reads it from the checkpoint;
    iteration and ``.items()`` (``parameters()``, ``state_dict()``) see what is stored, meta or loaded."""

    def __init__(self, params: dict, read: Callable[[str], torch.Tensor]) -> None:
        super().__init__(params)
        self.read = read

    def __getitem__(self, name: str) -> Any:
        value = dict.__getitem__(self, name)
        if value is not None and value.is_meta:
            return self.read(name)
        return value


@dataclass
class _Slot:
    module: nn.Module
    name: str
    meta: nn.Parameter
    source: TensorSource


@dataclass
class Unit:
    """A piece of the model loaded and released as one: a decoder block or a top-level module with parameters."""

    name: str
    module: nn.Module
    slots: list[_Slot]
    loaded: bool = False


@dataclass
class LazyState:
    """What a lazy model carries (``model._bakeedit_lazy``): the checkpoint, device, dtype and units, and counters
    that tests and benchmarks read (``loads``: unit loads, ``reads``: parameters read outside a unit's forward)."""

    ckpt: Checkpoint
    device: torch.device
    dtype: torch.dtype
    units: list[Unit] = field(default_factory=list)
    loads: int = 0
    reads: int = 0
    on_load: list[Callable[[Unit], None]] = field(default_factory=list)

    def read(self, source: TensorSource) -> torch.Tensor:
        """One parameter's values from the shards, in its run dtype on the execution device."""
        if not source.experts and source.dtype.is_floating_point:  # converted while read: no second copy
            return self.ckpt.read_as(source.stored[0], source.dtype).to(self.device).view(source.shape)
        tensors = [self.ckpt.read(name) for name in source.stored]
        if source.experts:
            per = len(tensors) // source.experts
            tensor = torch.stack([torch.cat(tensors[e * per:(e + 1) * per]) for e in range(source.experts)])
        else:
            tensor = tensors[0]
        if tensor.is_floating_point():
            tensor = tensor.to(source.dtype)
        return tensor.to(self.device).view(source.shape)

    def load(self, unit: Unit, given: dict[str, torch.Tensor] | None = None) -> None:
        """Make ``unit``'s parameters real: read from the shards, or ``given`` by parameter name (an embedding's
        rows of the batch, :class:`_RowsOfIds`)."""
        if unit.loaded:
            return
        given = given or {}
        done: dict[int, nn.Parameter] = {}
        for slot in unit.slots:
            if id(slot.meta) not in done:  # tied within the unit: one tensor, as in the in-memory model
                value = given[slot.name] if slot.name in given and slot.module is unit.module else self.read(
                    slot.source)
                done[id(slot.meta)] = nn.Parameter(value, requires_grad=False)
            slot.module._parameters[slot.name] = done[id(slot.meta)]
        unit.loaded = True
        self.loads += 1
        for fn in self.on_load:
            fn(unit)

    def release(self, unit: Unit) -> None:
        for slot in unit.slots:
            slot.module._parameters[slot.name] = slot.meta
        unit.loaded = False

    @contextlib.contextmanager
    def resident(self, unit: Unit) -> Iterator[None]:
        """``unit``'s parameters are real inside the block (already real: left as they are)."""
        if unit.loaded:
            yield
            return
        self.load(unit)
        try:
            yield
        finally:
            self.release(unit)


def lazy_state(model: nn.Module) -> LazyState | None:
    """The :class:`LazyState` of a lazy model, ``None`` for an ordinary one."""
    return getattr(model, _STATE, None)


def is_lazy(model: Any) -> bool:
    return isinstance(model, nn.Module) and lazy_state(model) is not None


def execution_device(model: nn.Module) -> torch.device:
    """Where a model's inputs go: the lazy model's execution device, else the first parameter's device."""
    state = lazy_state(model)
    return state.device if state is not None else next(model.parameters()).device


class _UnitForward:
    """The wrapped ``forward`` of a unit (see the module docstring)."""

    def __init__(self, state: LazyState, unit: Unit, inner: Callable[..., Any]) -> None:
        self.state, self.unit, self.inner = state, unit, inner

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            with self.state.resident(self.unit):
                return self.inner(*args, **kwargs)
        saved = ForwardState(self.unit.module, (*args, *kwargs.values()))
        calls = [0]

        def run(*a: Any, **k: Any) -> Any:
            calls[0] += 1
            replay = saved.restored() if calls[0] > 1 else contextlib.nullcontext()
            with replay, self.state.resident(self.unit):  # released even when recomputation stops early
                return self.inner(*a, **k)

        return checkpoint(run, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)


def _single_matrix(unit: Unit) -> _Slot | None:
    """The unit's weight when the unit is one module whose only float parameters are a stored 2-D ``weight`` (and a
    bias): the shapes :class:`_RowsOfIds` and :class:`_RowsInSlices` read row ranges of."""
    weights = [s for s in unit.slots if s.name == "weight" and s.module is unit.module]
    others = [s for s in unit.slots if s.name not in ("weight", "bias") or s.module is not unit.module]
    if len(weights) != 1 or others or weights[0].source.experts or len(weights[0].source.shape) != 2:
        return None
    return weights[0]


class _RowsOfIds(_UnitForward):
    """An embedding unit without gradients on the CPU: only the rows of the token ids in the batch are read, into a
    full-size tensor whose other pages are never touched (so never resident; ``return_large_frees_to_the_system``
    makes it an ``mmap``); the module's own forward (a scaled embedding's too) then looks them up as usual. The
    embedding of a large vocabulary (128k x 8192 in float32: 4.3 GB) is often bigger than a block."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        slot = _single_matrix(self.unit)
        ids = args[0] if args else kwargs.get("input")
        # with gradients too: integer ids and a frozen matrix give the lookup no gradient to carry
        if (slot is None or self.state.device.type != "cpu" or self.unit.loaded
                or not isinstance(ids, torch.Tensor) or ids.is_floating_point()):
            return super().__call__(*args, **kwargs)
        rows = sorted(set(ids.flatten().tolist()))
        if rows and not 0 <= rows[0] <= rows[-1] < slot.source.shape[0]:  # the module's own error, as in memory
            return super().__call__(*args, **kwargs)
        weight = torch.empty(slot.source.shape, dtype=slot.source.dtype)
        for first, last in _runs(rows):
            self.state.ckpt.read_rows(slot.source.stored[0], first, last, slot.source.dtype, out=weight)
        self.state.load(self.unit, {slot.name: weight})
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.state.release(self.unit)


#: An LM head is applied a slice of rows at a time when it takes more than this in the run dtype (below, whole:
#: the slices' matrix products may round differently from the whole one's, at the 1e-7 level).
HEAD_SLICE_MIN_BYTES = 256 << 20
_SLICE_BYTES = 64 << 20


class _RowsInSlices(_UnitForward):
    """An LM head (``nn.Linear``) on the CPU larger than :data:`HEAD_SLICE_MIN_BYTES`: its output is computed
    ``_SLICE_BYTES`` of weight rows at a time, each slice read and freed in turn, so the head never needs its whole
    matrix in memory (the logits themselves are kept). With gradients, :class:`_SlicedHead` reads the slices again
    for the input's gradient instead of keeping the matrix for backward."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        slot = _single_matrix(self.unit)
        module = self.unit.module
        if (slot is None or self.state.device.type != "cpu" or self.unit.loaded
                or not isinstance(module, nn.Linear) or len(args) != 1 or kwargs
                or math.prod(slot.source.shape) * slot.source.dtype.itemsize <= HEAD_SLICE_MIN_BYTES):
            return super().__call__(*args, **kwargs)
        bias_slot = next((s for s in self.unit.slots if s.name == "bias"), None)
        bias = self.state.read(bias_slot.source) if bias_slot is not None else None
        rows, width = slot.source.shape
        per = max(1, _SLICE_BYTES // (width * slot.source.dtype.itemsize))
        stored, dtype, ckpt = slot.source.stored[0], slot.source.dtype, self.state.ckpt
        slices = [(first, min(rows, first + per)) for first in range(0, rows, per)]
        self.state.loads += 1
        return _SlicedHead.apply(args[0], lambda a, b: ckpt.read_rows(stored, a, b, dtype), slices, rows, bias)


class _SlicedHead(torch.autograd.Function):
    """``x @ W.T + b`` over row slices of ``W`` read on demand, forward and backward (the weight is frozen: only
    the input's gradient is computed, a slice of rows at a time)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, read: Callable[[int, int], torch.Tensor],
                slices: list[tuple[int, int]], rows: int, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.read, ctx.slices = read, slices
        out = torch.empty(*x.shape[:-1], rows, dtype=x.dtype)
        for first, last in slices:
            out[..., first:last] = nn.functional.linear(x, read(first, last),
                                                        None if bias is None else bias[first:last])
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_x = None
        for first, last in ctx.slices:
            part = grad[..., first:last] @ ctx.read(first, last)
            grad_x = part if grad_x is None else grad_x.add_(part)
        return grad_x, None, None, None, None


def _runs(rows: list[int]) -> Iterator[tuple[int, int]]:
    """Sorted row numbers as ``(first, last + 1)`` ranges of consecutive rows (one read each)."""
    start = prev = None
    for r in rows:
        if start is None:
            start = prev = r
        elif r == prev + 1:
            prev = r
        else:
            yield start, prev + 1
            start = prev = r
    if start is not None:
        yield start, prev + 1


# --------------------------------------------------------------------------------------------- building

def _units(model: nn.Module, blocks_path: str) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, nn.Module]]]:
    """``(units, ancestors)``: each block and each maximal top-level module with parameters outside the blocks;
    and the modules on the path to the block list (their own parameters, if any, stay loaded)."""
    blocks = model.get_submodule(blocks_path)
    parts = blocks_path.split(".")
    on_path = {".".join(parts[:i]) for i in range(len(parts))}
    units: list[tuple[str, nn.Module]] = []
    ancestors: list[tuple[str, nn.Module]] = [("", model)]

    def walk(prefix: str, module: nn.Module) -> None:
        for child_name, child in module.named_children():
            path = f"{prefix}{child_name}"
            if child is blocks:
                units.extend((f"{path}.{i}", block) for i, block in enumerate(blocks))
            elif path in on_path:
                ancestors.append((path, child))
                walk(path + ".", child)
            elif next(child.parameters(), None) is not None:
                units.append((path, child))

    walk("", model)
    return units, ancestors


def _dtype_plan(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.dtype]:
    """transformers' ``keep_in_fp32`` patterns for this dtype (what ``from_pretrained`` keeps in float32)."""
    plan = getattr(model, "_get_dtype_plan", None)
    try:
        return dict(plan(dtype)) if callable(plan) else {}
    except (TypeError, AttributeError):
        return {}


def lazy_model(folder: Path, config: Any, dtype: torch.dtype, device: str | torch.device = "cpu",
               trust_remote_code: bool = False, arch: str | None = None) -> nn.Module:
    """The causal LM of ``config`` running blockwise from the safetensors checkpoint in ``folder`` (see the module
    docstring), in eval mode; ``arch`` names the site table as ``model.arch`` does. Every parameter is matched to a
    stored tensor here, so a checkpoint that lacks one is refused before anything runs."""
    from transformers import AutoModelForCausalLM  # start-up time: transformers loads when a model does

    folder = Path(folder)
    if not is_safetensors_checkpoint(folder):
        raise ModelLoadError(f"{folder}: blockwise execution needs a safetensors checkpoint folder",
                             hint="run in memory (--execution in-memory)")
    ckpt = Checkpoint.open(folder)
    with params_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.eval()
    layout = ModelLayout.for_model(model, arch=arch)
    state = LazyState(ckpt=ckpt, device=torch.device(device), dtype=dtype)
    fp32 = _dtype_plan(model, dtype)
    renamed = _renamed_on_load(model, ckpt)
    aliases: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)

    def source(full: str, meta: nn.Parameter) -> TensorSource:
        run = torch.float32 if any(re.search(p, full) for p in fp32) else meta.dtype
        names = [full] + [a for a in aliases.get(id(meta), []) if a != full]
        return _resolve(ckpt, layout, names, meta, run if meta.is_floating_point() else meta.dtype, renamed)

    units, ancestors = _units(model, layout.spec.blocks)
    for unit_name, module in units:
        slots, seen = [], set()
        for mod_name, mod in module.named_modules(prefix=unit_name, remove_duplicate=False):
            for pname, meta in list(mod._parameters.items()):
                if meta is None or (id(mod), pname) in seen:
                    continue
                seen.add((id(mod), pname))
                slots.append(_Slot(mod, pname, meta, source(f"{mod_name}.{pname}", meta)))
        unit = Unit(unit_name, module, slots)
        state.units.append(unit)
        wrapper = (_RowsOfIds if isinstance(module, nn.Embedding) else
                   _RowsInSlices if isinstance(module, nn.Linear) else _UnitForward)
        module.forward = wrapper(state, unit, module.forward)
    for path, module in ancestors:  # rare direct parameters of the path to the blocks: loaded once, kept
        for pname, meta in list(module._parameters.items()):
            if meta is not None:
                full = f"{path}.{pname}" if path else pname
                module._parameters[pname] = nn.Parameter(state.read(source(full, meta)), requires_grad=False)
    if max((_unit_bytes(u) for u in state.units), default=0) >= LARGE_UNIT_BYTES:
        return_large_frees_to_the_system()  # a large model only: the mmap per allocation costs time on small ones
    _install_reads(state)
    _load_buffers(model, ckpt, layout.spec.blocks, state.device)
    anchor = nn.Parameter(torch.empty(0, dtype=dtype, device=state.device), requires_grad=False)
    model.__dict__["_parameters"] = {ANCHOR: anchor, **model._parameters}  # first: next(model.parameters())
    setattr(model, _STATE, state)
    return model


def _renamed_on_load(model: nn.Module, ckpt: Checkpoint) -> dict[str, str]:
    """``{model name: stored name}`` for the stored tensors transformers renames when it loads them (its
    ``WeightRenaming`` transforms; fused routed experts are matched by the layout instead)."""
    try:  # start-up time, as above; an older transformers without the mapping renames nothing
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, apply_renamings

        renamings = [t for t in get_model_conversion_mapping(model, add_legacy=False) if isinstance(t, WeightRenaming)]
    except (ImportError, TypeError, AttributeError):
        return {}
    out: dict[str, str] = {}
    for stored in ckpt.where:
        target = apply_renamings(stored, renamings) if renamings else stored
        if target != stored:
            out[target] = stored
    return out


def _install_reads(state: LazyState) -> None:
    """Give every module of a unit the reading ``_parameters`` dict (a lookup of a meta entry reads it)."""
    for unit in state.units:
        by_module: dict[int, tuple[nn.Module, dict[str, TensorSource]]] = {}
        for slot in unit.slots:
            by_module.setdefault(id(slot.module), (slot.module, {}))[1][slot.name] = slot.source
        for module, sources in by_module.values():

            def read(name: str, sources: dict[str, TensorSource] = sources) -> torch.Tensor:
                state.reads += 1
                return state.read(sources[name])

            module.__dict__["_parameters"] = _LazyParameters(dict(module._parameters), read)


def _load_buffers(model: nn.Module, ckpt: Checkpoint, blocks: str, device: torch.device) -> None:
    """Persistent buffers the checkpoint stores are copied in (``from_pretrained`` loads them too); all buffers go
    to the execution device."""
    for mod_name, module in model.named_modules():
        for bname, buf in list(module._buffers.items()):
            if buf is None:
                continue
            full = f"{mod_name}.{bname}" if mod_name else bname
            stored = stored_tensor_name(ckpt, full, blocks) if bname not in module._non_persistent_buffers_set else None
            if stored is not None and tuple(ckpt.entry(stored).shape) == tuple(buf.shape):
                buf = ckpt.read(stored).to(buf.dtype)
            module._buffers[bname] = buf.to(device)
