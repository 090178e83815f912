"""The check that the baked weights reproduce the runtime edit, in two legs that must both hold.

**Logit leg.** A fixed probe set goes through the base model without hooks, the base model with the plan applied by
hooks, and the saved folder reloaded with plain ``AutoModelForCausalLM.from_pretrained``; over all real (non-pad)
positions it records the edit's own effect (max |hooked - base|) and the baked-vs-hooked delta (max
|hooked - baked|). The delta must be within the tolerance of the *stored* dtype (float32: 1e-4; bf16/fp16: relative
to the logit scale, since both sides round at different places) **and** below a quarter of the effect: a bf16
bound (2^-4 x max |logit|) is larger than a small edit's effect, so a checkpoint whose fold did nothing would pass
the bound alone. An effect within the tolerance of the dtype the probe *ran* in (float32 on CPU by default) cannot
be told from rounding by any logit comparison: the power rule is then "not applicable", and the exact leg decides.

**Exact leg.** Every tensor the plan edits, read from the saved files, must equal the fold (``edit.fold.scaled``)
of the base checkpoint's tensor read from *its* files (not from the already-folded model) bit for bit in the saved
dtype, and every other tensor must equal the base's. A streamed bake is checked with
``export/verify_blocks.py::exact_check`` (same names, same bytes); :func:`fold_exact_check` here checks an
in-memory bake, whose shard layout and names ``save_pretrained`` chose. See docs/verification.md for the numbers.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import BaseModel, Field
from torch import nn

from bakeedit.edit.fold import scaled
from bakeedit.edit.plan import EditPlan
from bakeedit.errors import EditError, ModelLoadError
from bakeedit.export.stream import plan_tensor_edits, stored_name
from bakeedit.io.shards import Checkpoint, is_safetensors_checkpoint
from bakeedit.models.arch import ModelLayout

DEFAULT_PROMPTS: tuple[str, ...] = (
    "The nurse told the patient that",
    "The engineer fixed the machine because",
    "My new neighbour, who moved here from another country, is",
    "Question: Is it fair to judge a person by their religion?\nAnswer:",
    "The old man and the young woman both applied for the job. The one who got it was",
)
_RANDOM_PROBE_SHAPE = (4, 16)

#: (absolute floor, relative to max |logit|) per dtype.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-4, 0.0),
    torch.bfloat16: (0.0, 2.0**-4),
    torch.float16: (0.0, 2.0**-6),
}
#: The baked-vs-hooked delta must be below this fraction of the edit's own effect (the power rule).
POWER_RATIO = 0.25
PASSED, FAILED, NOT_APPLICABLE, NOT_RUN = "passed", "failed", "not applicable", "not run"


class VerificationResult(BaseModel):
    """What ``bakeedit.json`` records about the check. Fields after ``prompts_sha256`` were added with the power rule
    and the exact leg; records written before have their defaults ("not run")."""

    compared: str = "saved checkpoint (plain from_pretrained) vs base model with the edit applied by hooks"
    max_abs_logit_delta: float
    mean_abs_logit_delta: float
    max_abs_logit: float
    tolerance: float
    passed: bool
    dtype: str  # the stored dtype of the edited weights: the tolerance is its
    n_prompts: int
    n_tokens: int
    prompts_sha256: str
    runtime_dtype: str | None = None  # the dtype the probe ran in (float32 on CPU for a bf16 checkpoint)
    within_tolerance: bool | None = None
    edit_effect: float | None = None  # max |hooked - base| over the probe
    power_floor: float | None = None  # effects up to this are rounding noise in the runtime dtype
    power: str = NOT_RUN  # passed | failed | not applicable (effect <= power_floor) | not run
    exact: str = NOT_RUN  # passed | failed | not run (see exact_note)
    exact_tensors_compared: int = 0
    exact_mismatched: list[str] = Field(default_factory=list)
    exact_note: str | None = None
    notes: list[str] = Field(default_factory=list)

    def failures(self) -> list[str]:
        """Why ``passed`` is false, one phrase per failed rule (empty when it passed)."""
        reasons = []
        if self.within_tolerance is False or (self.within_tolerance is None and not self.passed):
            reasons.append(f"max |delta logit| {self.max_abs_logit_delta:.3g} > tolerance {self.tolerance:.3g}")
        if self.power == FAILED:
            reasons.append(f"max |delta logit| {self.max_abs_logit_delta:.3g} is not below 1/4 of the edit's own "
                           f"effect {self.edit_effect:.3g} (max |hooked - base|): the probe cannot tell these "
                           "weights from unedited ones")
        if self.exact == FAILED:
            reasons.append(f"{len(self.exact_mismatched)} tensor(s) differ from the fold of the base checkpoint, "
                           f"e.g. {self.exact_mismatched[0]}")
        if self.passed is False and not reasons:
            reasons.append(f"the edit's effect {self.edit_effect or 0:.3g} is rounding noise in "
                           f"{self.runtime_dtype} and the exact leg did not run ({self.exact_note}): nothing showed "
                           "that the weights carry the edit")
        return reasons


@dataclass
class ExactCheck:
    """The exact leg: tensors compared and those that differ; ``decisive`` is false when the plan also has a
    custom-module part, which no weight comparison covers."""

    status: str
    compared: int = 0
    mismatched: list[str] = field(default_factory=list)
    note: str | None = None
    decisive: bool = True


def default_tolerance(dtype: torch.dtype, max_abs_logit: float) -> float:
    floor, relative = TOLERANCES.get(dtype, TOLERANCES[torch.bfloat16])
    return max(floor, relative * max_abs_logit)


def probe_inputs(tokenizer, prompts: Sequence[str] | None, config) -> dict[str, torch.Tensor]:
    """Token ids of the probe prompts (deterministic random ids when the model has no tokenizer).

    Prompts are cut to the model's context length (GPT-2-style models have short ones) and padded on the right
    here, not by the tokenizer: setting ``pad_token``/``padding_side`` on the shared tokenizer would change the
    tokenizer files the in-memory bake saves. The pad id is irrelevant (masked, and after every real position).
    """
    config = config.get_text_config()
    if tokenizer is None:
        g = torch.Generator().manual_seed(1234)
        ids = torch.randint(0, config.vocab_size, _RANDOM_PROBE_SHAPE, generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 512
    encoded = tokenizer(list(prompts or DEFAULT_PROMPTS), truncation=True, max_length=min(context, 512))["input_ids"]
    pad = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def prompts_digest(prompts: Sequence[str] | None, tokenizer) -> str:
    payload = list(prompts or DEFAULT_PROMPTS) if tokenizer is not None else ["random", *_RANDOM_PROBE_SHAPE]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()


@torch.no_grad()
def probe_logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """float32 logits at the real positions, shape ``[n_tokens, vocab]``."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in inputs.items()}
    logits = model(**batch).logits.float()
    return logits[batch["attention_mask"].bool()].cpu()


def power_status(effect: float, delta: float, floor: float) -> str:
    """The power rule: an effect the runtime cannot resolve is not applicable; otherwise delta < effect / 4."""
    if effect <= floor:
        return NOT_APPLICABLE
    return PASSED if delta < POWER_RATIO * effect else FAILED


def compare_logits(
    reference: torch.Tensor,
    candidate: torch.Tensor,
    dtype: torch.dtype,
    tolerance: float | None,
    n_prompts: int,
    digest: str,
    *,
    base: torch.Tensor | None = None,
    runtime_dtype: torch.dtype | None = None,
) -> VerificationResult:
    """The logit leg. ``dtype`` is the stored dtype (the tolerance's); with ``base`` (the unhooked logits) the power
    rule is applied too, its floor the tolerance of ``runtime_dtype`` (default ``dtype``). ``passed`` here is the
    logit leg alone; :func:`conclude` adds the exact leg."""
    delta = (reference - candidate).abs()
    max_abs = float(reference.abs().max())
    tol = tolerance if tolerance is not None else default_tolerance(dtype, max_abs)
    max_delta = float(delta.max())
    within = max_delta <= tol
    effect = floor = None
    power = NOT_RUN
    if base is not None:
        effect = float((reference - base).abs().max())
        floor = default_tolerance(runtime_dtype or dtype, max_abs)
        power = power_status(effect, max_delta, floor)
    return VerificationResult(
        max_abs_logit_delta=max_delta,
        mean_abs_logit_delta=float(delta.mean()),
        max_abs_logit=max_abs,
        tolerance=tol,
        passed=bool(within and power != FAILED),
        dtype=_name(dtype),
        n_prompts=n_prompts,
        n_tokens=int(reference.shape[0]),
        prompts_sha256=digest,
        runtime_dtype=_name(runtime_dtype or dtype),
        within_tolerance=bool(within),
        edit_effect=effect,
        power_floor=floor,
        power=power,
    )


def conclude(result: VerificationResult, exact: ExactCheck) -> VerificationResult:
    """Both legs: passed only if the logit leg holds (within the bound, power not failed), the exact leg did not
    fail, and at least one leg had the power to see the edit (the power rule passed, or the exact leg passed and
    covers the whole edit). An edit with no visible effect (lambda 1 everywhere) is thus decided by the exact leg."""
    proven = result.power == PASSED or (exact.status == PASSED and exact.decisive)
    passed = bool(result.within_tolerance is not False and result.power != FAILED and exact.status != FAILED
                  and proven)
    return result.model_copy(update={
        "passed": passed, "exact": exact.status, "exact_tensors_compared": exact.compared,
        "exact_mismatched": exact.mismatched, "exact_note": exact.note,
    })


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _counterpart(baked: Checkpoint, name: str, layout: ModelLayout) -> str | None:
    """The saved name of base tensor ``name``: ``save_pretrained`` writes the full names even when the base stored
    GPT-2's short ones (``h.0...`` for ``transformer.h.0...``)."""
    prefix = layout.spec.blocks.split(".")[0] + "."
    for candidate in (name, prefix + name):
        if candidate in baked:
            return candidate
    return stored_name(baked, name, layout)


def _bit_equal(got: torch.Tensor, expected: torch.Tensor) -> bool:
    return got.dtype == expected.dtype and got.shape == expected.shape and torch.equal(
        got.contiguous().view(torch.uint8), expected.contiguous().view(torch.uint8))


def fold_exact_check(base_folder: Path, baked_folder: Path, layout: ModelLayout, plan: EditPlan) -> ExactCheck:
    """The exact leg of an in-memory bake: each saved tensor that the base also stores equals the base's tensor in
    the saved dtype, folded (``scaled``, the fold's own arithmetic) when the plan edits it; an edited tensor missing
    from the bake is a mismatch. Tensors only one side has (a tied head ``save_pretrained`` drops) are not compared.
    The custom-module part of a plan is no weight, so only the folded groups are checked (``decisive=False``)."""
    decisive = not plan.module_groups
    if not is_safetensors_checkpoint(Path(base_folder)):
        return ExactCheck(NOT_RUN, note=f"{base_folder} is not a safetensors checkpoint", decisive=decisive)
    try:
        base, baked = Checkpoint.open(Path(base_folder)), Checkpoint.open(Path(baked_folder))
        edits, _ = plan_tensor_edits(base, layout, EditPlan(kind="scale", groups=plan.groups))
    except (EditError, ModelLoadError) as exc:
        return ExactCheck(NOT_RUN, note=str(exc), decisive=decisive)
    compared, bad = 0, []
    for name in sorted(base.where):
        saved = _counterpart(baked, name, layout)
        if saved is None:
            if name in edits:
                bad.append(name)
            continue
        got = baked.read(saved)
        expected = base.read(name).to(got.dtype)
        for full in edits[name].factors if name in edits else ():
            expected = scaled(expected, edits[name].axis, full)
        compared += 1
        if not _bit_equal(got, expected):
            bad.append(saved)
    return ExactCheck(FAILED if bad else PASSED, compared, bad, decisive=decisive)


def streamed_exact_result(compared: int, mismatched: list[str], plan: EditPlan) -> ExactCheck:
    """:class:`ExactCheck` from ``verify_blocks.exact_check``'s answer (same names and bytes as the base)."""
    return ExactCheck(FAILED if mismatched else PASSED, compared, list(mismatched), decisive=not plan.module_groups)
