"""Verification of a baked checkpoint that never loads the whole model: for models larger than memory.

``bakeedit apply`` normally proves a bake by running the whole base model with the edit's hooks and the reloaded
folder on the same prompts (``export/verify.py``). When the model does not fit in memory, the same question is
asked piece by piece, in two checks whose memory is one block:

1. **Exact** (every tensor): each tensor the plan edits must equal the fold of the base tensor bit for bit, and
   every other tensor must have the base's bytes, dtype and shape. Catches a wrong offset, a partial write, a
   tensor edited by accident. Reads both checkpoints once, in bounded blocks.
2. **Functional** (every edited layer ``l``): a one-block model built from the config (same block, same
   ``layer_types`` entry, vocabulary cut to 16 and the LM head replaced by the identity, so the output is the
   normalised hidden state) is loaded with block ``l`` of the base, in float32, and run on random hidden states
   three times: with the layer's groups applied by the runtime hooks (the reference); after ``fold_plan`` of the
   same groups (must match to float32 rounding, 1e-4: the fold computes the edit); and with block ``l`` of the
   baked folder loaded (must match within the tolerance of the stored dtype, ``export/verify.py``: what the
   checkpoint will do). With check 1 this chains baked = round(fold(base)) and fold(base) = hooks(base). The
   inputs are synthetic, not the probe prompts, and no interaction between layers is seen, which a per-layer
   linear scaling does not have. The unhooked base block is run too: its distance from the reference is the
   edit's own effect, and the power rule of ``export/verify.py`` applies to it as to the logits of a full model
   (a bake whose delta is not well below the effect could be the unedited block).

The result is a :class:`~bakeedit.export.verify.VerificationResult` like the full-model check's, so
``bakeedit.json`` and ``bakeedit verify`` report both the same way; ``bakeedit apply --low-memory`` and
``bakeedit verify --blocks`` use it. An in-memory bake (``save_pretrained``'s names and layout) gets the exact leg of
``export/verify.py`` (``fold_exact_check``) instead of check 1.
"""

from __future__ import annotations

import copy
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bakeedit.edit.fold import fold_plan, scaled
from bakeedit.edit.hooks import runtime_edit
from bakeedit.edit.plan import EditPlan
from bakeedit.errors import VerificationError
from bakeedit.export.stream import load_config, plan_tensor_edits, stored_name
from bakeedit.export.verify import (
    NOT_RUN,
    ExactCheck,
    VerificationResult,
    conclude,
    default_tolerance,
    fold_exact_check,
    power_status,
    streamed_exact_result,
)
from bakeedit.io.shards import FLOAT_DTYPES, Checkpoint, read_bytes
from bakeedit.models.arch import ModelLayout

_BLOCKS = ("each edited block (folded in float32, and as baked) vs the base block with the edit applied by hooks "
           "(one-block model, random hidden states; the edit's own effect from the unhooked block)")
_EXACT = {"stream": "streamed: every tensor bit-exact vs the fold of the base (untouched ones unchanged)",
          "in-memory": "every saved tensor bit-exact vs the fold of the base checkpoint's"}
_SHAPE = (2, 16)  # batch x positions of the random hidden states
_CHUNK = 64 << 20


@dataclass
class BlockCheck:
    """One edited layer: |hooks - fold in float32| (must be float32 rounding) and |hooks - baked block|."""

    layer: int
    fold_max_abs_delta: float
    max_abs_delta: float
    mean_abs_delta: float
    max_abs_output: float
    edit_effect: float = 0.0  # max |hooks - unhooked base block|


@dataclass
class StreamedVerification:
    """Both checks' details; :attr:`result` is what ``bakeedit.json`` records."""

    result: VerificationResult
    blocks: list[BlockCheck] = field(default_factory=list)
    tensors_compared: int = 0
    mismatched: list[str] = field(default_factory=list)


def _same_bytes(a: Checkpoint, b: Checkpoint, name: str) -> bool:
    ea, eb = a.entry(name), b.entry(name)
    if (ea.dtype, ea.shape, ea.nbytes) != (eb.dtype, eb.shape, eb.nbytes):
        return False
    fa, fb = os.open(a.where[name].path, os.O_RDONLY), os.open(b.where[name].path, os.O_RDONLY)
    try:
        for off in range(0, ea.nbytes, _CHUNK):
            n = min(_CHUNK, ea.nbytes - off)
            if not torch.equal(read_bytes(fa, ea.start + off, n), read_bytes(fb, eb.start + off, n)):
                return False
        return True
    finally:
        os.close(fa)
        os.close(fb)


def exact_check(base: Checkpoint, baked: Checkpoint, layout: ModelLayout, plan: EditPlan,
                same_files: set[str] | frozenset[str] = frozenset()) -> tuple[int, list[str]]:
    """Check 1 of the module docstring: (tensors compared, names that differ from what the fold must give).

    ``same_files`` names the shard files whose base and baked sha256 are equal (hashed anyway for ``bakeedit.json``,
    while the stream wrote them): an untouched tensor stored in such a file, under the same file name in both, has
    the base's bytes without reading them again. Any other file is compared tensor by tensor, so a byte changed
    anywhere is still found and named."""
    edits, _ = plan_tensor_edits(base, layout, plan)
    bad = sorted(set(base.where) ^ set(baked.where))
    for name in sorted(set(base.where) & set(baked.where)):
        if name not in edits:
            shard = base.where[name].path.name
            if shard in same_files and baked.where[name].path.name == shard:
                continue
            if not _same_bytes(base, baked, name):
                bad.append(name)
            continue
        expected = base.read(name)
        for full in edits[name].factors:
            expected = scaled(expected, edits[name].axis, full)
        got = baked.read(name) if baked.entry(name).dtype == base.entry(name).dtype else None
        if got is None or got.shape != expected.shape or not torch.equal(
            got.view(torch.uint8), expected.contiguous().view(torch.uint8)
        ):
            bad.append(name)
    return len(base.where), bad


def _one_block_model(config, layer: int, arch: str | None = None):
    """A randomly initialised model with only block ``layer``'s configuration, a 16-token vocabulary and no head."""
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(config.get_text_config())
    types = getattr(cfg, "layer_types", None)
    if types:
        cfg.layer_types = [types[layer]]
    cfg.num_hidden_layers = 1
    cfg.vocab_size = 16
    cfg.pad_token_id = None
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.lm_head = torch.nn.Identity()
    return model.eval(), ModelLayout.for_config(cfg, arch=arch)


def _load_block(model: torch.nn.Module, layout: ModelLayout, ckpt: Checkpoint, layer: int) -> None:
    """Copy block ``layer`` of ``ckpt`` into block 0 of the one-block ``model``."""
    prefix = f"{layout.spec.blocks}.0."
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith(prefix):
                parts = layout.stored_parts(layer, name[len(prefix):])
                if parts is not None:  # routed experts: stored one tensor per expert and part, fused on load
                    missing = [p for p in parts if stored_name(ckpt, p, layout) is None]
                    if missing:
                        raise VerificationError(f"{ckpt.folder}: no tensor {missing[0]}")
                    tensors = [ckpt.read(stored_name(ckpt, p, layout)) for p in parts]
                    per_expert = len(parts) // param.shape[0]
                    fused = [torch.cat(tensors[e * per_expert:(e + 1) * per_expert]) for e in range(param.shape[0])]
                    param.copy_(torch.stack(fused).to(param.dtype))
                    continue
                wanted = f"{layout.spec.blocks}.{layer}.{name[len(prefix):]}"
                stored = stored_name(ckpt, wanted, layout)
                if stored is None:
                    raise VerificationError(f"{ckpt.folder}: no tensor {wanted}")
                param.copy_(ckpt.read(stored).to(param.dtype))


def _run(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return model(inputs_embeds=hidden, use_cache=False).logits.float()


def functional_check(
    config, base: Checkpoint, baked: Checkpoint, plan: EditPlan, layers: list[int], arch: str | None = None
) -> list[BlockCheck]:
    """Check 2 of the module docstring for each of ``layers`` (one harness per layer type, reloaded per layer)."""
    checks = []
    harnesses: dict[str, tuple[torch.nn.Module, ModelLayout]] = {}
    types = getattr(config.get_text_config(), "layer_types", None)
    for layer in layers:
        kind = types[layer] if types else ""
        if kind not in harnesses:
            harnesses[kind] = _one_block_model(config, layer, arch)
        model, layout1 = harnesses[kind]
        local = EditPlan(groups=[g.model_copy(update={"layer": 0}) for g in plan.groups if g.layer == layer])
        hidden = torch.randn(*_SHAPE, model.config.hidden_size, generator=torch.Generator().manual_seed(layer))
        with torch.no_grad():
            _load_block(model, layout1, base, layer)
            unhooked = _run(model, hidden)
            with runtime_edit(model, layout1, local):
                reference = _run(model, hidden)
            fold_plan(model, layout1, local)
            folded = _run(model, hidden)
            _load_block(model, layout1, baked, layer)
            delta = (reference - _run(model, hidden)).abs()
        checks.append(BlockCheck(layer, float((reference - folded).abs().max()), float(delta.max()),
                                 float(delta.mean()), float(reference.abs().max()),
                                 float((reference - unhooked).abs().max())))
    return checks


def verify_blocks(
    base_folder: Path,
    baked_folder: Path,
    plan: EditPlan,
    *,
    layers: list[int] | None = None,
    tolerance: float | None = None,
    exact: bool = True,
    trust_remote_code: bool = False,
    layout: ModelLayout | None = None,
    baked_by: str = "stream",
    same_files: set[str] | frozenset[str] = frozenset(),
) -> StreamedVerification:
    """Both checks; ``layers`` defaults to every layer the plan edits; ``exact=False`` skips check 1 (which reads
    both checkpoints in full). The tolerance defaults to that of the edited tensors' stored dtype. ``baked_by``
    (``bakeedit.json``'s field) says which exact leg applies: ``stream`` (same names and bytes as the base) or
    ``in-memory`` (``save_pretrained``'s layout). Memory: one block, whatever the model's depth."""
    config = load_config(Path(base_folder), trust_remote_code)
    layout = layout or ModelLayout.for_config(config)
    base, baked = Checkpoint.open(Path(base_folder)), Checkpoint.open(Path(baked_folder))
    check = (_exact_leg(base, baked, layout, plan, baked_by, same_files) if exact
             else ExactCheck(NOT_RUN, note="skipped"))
    edits, _ = plan_tensor_edits(base, layout, plan)
    stored = next((FLOAT_DTYPES[e.entry.dtype] for e in edits.values()), torch.float32)
    layers = sorted({g.layer for g in plan.groups}) if layers is None else layers
    blocks = functional_check(config, base, baked, plan, layers, layout.arch)
    worst = max(blocks, key=lambda b: b.max_abs_delta, default=BlockCheck(-1, 0.0, 0.0, 0.0, 0.0))
    scale = max((b.max_abs_output for b in blocks), default=0.0)
    tol = tolerance if tolerance is not None else default_tolerance(stored, scale)
    effect = max((b.edit_effect for b in blocks), default=0.0)
    floor = default_tolerance(torch.float32, scale)  # the blocks run in float32
    digest = hashlib.sha256(repr(("blocks", _SHAPE, layers)).encode()).hexdigest()
    result = conclude(VerificationResult(
        compared=f"{_EXACT.get(baked_by, _EXACT['stream'])}, and {_BLOCKS}" if exact else _BLOCKS,
        max_abs_logit_delta=worst.max_abs_delta,
        mean_abs_logit_delta=sum(b.mean_abs_delta for b in blocks) / max(1, len(blocks)),
        max_abs_logit=scale,
        tolerance=tol,
        passed=False,  # conclude() decides
        dtype=str(stored).removeprefix("torch."),
        n_prompts=len(blocks),
        n_tokens=len(blocks) * _SHAPE[0] * _SHAPE[1],
        prompts_sha256=digest,
        runtime_dtype="float32",
        within_tolerance=worst.max_abs_delta <= tol,
        edit_effect=effect,
        power_floor=floor,
        power=power_status(effect, worst.max_abs_delta, floor),
    ), check)
    for b in blocks:  # the fold must compute what the hooks do, to float32 rounding: else the fold itself is wrong
        if b.fold_max_abs_delta > default_tolerance(torch.float32, b.max_abs_output):
            result.passed = False
            result.notes.append(f"block {b.layer}: the float32 fold differs from the runtime hooks by "
                                f"{b.fold_max_abs_delta:.3g} (more than float32 rounding)")
    return StreamedVerification(result=result, blocks=blocks, tensors_compared=check.compared,
                                mismatched=check.mismatched)


def _exact_leg(base: Checkpoint, baked: Checkpoint, layout: ModelLayout, plan: EditPlan, baked_by: str,
               same_files: set[str] | frozenset[str] = frozenset()) -> ExactCheck:
    if baked_by == "stream":
        return streamed_exact_result(*exact_check(base, baked, layout, plan, same_files), plan)
    return fold_exact_check(base.folder, baked.folder, layout, plan)
