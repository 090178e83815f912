"""Verify a peft adapter folder the way its users will load it: in a fresh process, with bare transformers + peft.

The reference is computed here, in this process: the probe's logits of the base model with the plan applied by
bakeedit's hooks (``edit/hooks.py``), and, unless a baked checkpoint of the same plan is given, bakeedit's fold
(``edit/fold.py``) of every tensor the plan edits. A ``python -I`` subprocess (``export/adapter_worker.py``; no
bakeedit import, no ``PYTHONPATH``, no user site) loads the base folder, ``PeftModel.from_pretrained``-s the
adapter, checks that peft's state dict of the adapter is the saved file, returns its logits and compares
``merge_and_unload()`` with the reference tensors. Several checks share one subprocess (:func:`verify_adapters`).

Three legs, all recorded in the adapter's ``bakeedit.json``:

* **logits**: max |adapter - hooked| within the tolerance of the dtype (float32: 1e-4; ``export/verify.py``) and
  below a quarter of the edit's own effect (the power rule, so that an adapter doing nothing cannot pass);
* **keys**: no adapter tensor missing, unexpected or changed on load (a wrong key name is silently skipped by
  peft, with a warning at most);
* **merge**: every merged tensor equals the reference within one rounding (LoRA adds ``(lambda - 1) W`` where the
  fold multiplies by ``lambda``; IA3's merge multiplies, as the fold does, bit for bit). One difference is known
  and not a failure: peft before 0.6 (huggingface/peft#972) left the bias of a non-feedforward IA3 target alone on
  merge, although the adapter scales it at run time; such a bias, equal to the base's, is listed with that reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, Field
from torch import nn

from bakeedit.edit.fold import channel_factors, fold_targets, scaled
from bakeedit.edit.hooks import runtime_edit
from bakeedit.edit.plan import EditPlan
from bakeedit.errors import VerificationError
from bakeedit.export.verify import FAILED, NOT_RUN, PASSED, compare_logits, probe_inputs, probe_logits
from bakeedit.models.arch import ModelLayout

WORKER = Path(__file__).with_name("adapter_worker.py")
KNOWN_DIFFERENCE = "known difference"
IA3_BIAS_REASON = ("peft's IA3 merge left this bias unscaled (peft < 0.6); the adapter scales it at run time, so "
                   "the adapter is exact and only merge_and_unload() differs from the baked checkpoint")


@dataclass
class AdapterCheck:
    """One adapter folder to verify against ``model`` (the unedited base, as loaded from ``base_folder``)."""

    adapter: Path
    base_folder: Path
    model: nn.Module
    layout: ModelLayout
    plan: EditPlan
    kind: str
    baked_folder: Path | None = None
    inputs: dict[str, torch.Tensor] | None = None  # default: deterministic random token ids


class TensorDifference(BaseModel):
    name: str
    max_abs_diff: float
    reason: str


class AdapterVerification(BaseModel):
    """What the adapter's ``bakeedit.json`` records about the check."""

    compared: str = ("PeftModel.from_pretrained(base, adapter) in a fresh process (bare transformers + peft) vs "
                     "the base model with the edit applied by bakeedit's hooks")
    kind: str
    versions: dict[str, str] = Field(default_factory=dict)
    peft_class: str | None = None
    dtype: str
    n_tokens: int
    max_abs_logit_delta: float
    mean_abs_logit_delta: float
    max_abs_logit: float
    tolerance: float
    within_tolerance: bool
    edit_effect: float
    power: str
    keys: str = NOT_RUN
    key_problems: list[str] = Field(default_factory=list)
    merge: str = NOT_RUN  # passed | failed | known difference | not run
    merge_reference: str = "baked checkpoint"
    merge_compared: int = 0
    merge_bit_exact: int = 0
    merge_max_abs_diff: float = 0.0
    merge_rtol: float = 0.0
    merge_mismatched: list[TensorDifference] = Field(default_factory=list)
    merge_known_differences: list[TensorDifference] = Field(default_factory=list)
    merge_not_compared: list[str] = Field(default_factory=list)
    bakeedit_imported: list[str] = Field(default_factory=list)
    error: str | None = None
    passed: bool

    def failures(self) -> list[str]:
        """Why ``passed`` is false, one phrase per failed leg."""
        reasons = []
        if self.error:
            reasons.append(f"loading it failed ({self.error})")
        if not self.within_tolerance:
            reasons.append(f"max |delta logit| {self.max_abs_logit_delta:.3g} > tolerance {self.tolerance:.3g}")
        if self.power == FAILED:
            reasons.append(f"max |delta logit| {self.max_abs_logit_delta:.3g} is not below 1/4 of the edit's own "
                           f"effect {self.edit_effect:.3g}")
        if self.keys == FAILED:
            reasons.append(f"adapter tensors not loaded as saved: {', '.join(self.key_problems[:3])}")
        if self.merge == FAILED:
            first = self.merge_mismatched[0]
            reasons.append(f"{len(self.merge_mismatched)} merged tensor(s) differ from the {self.merge_reference}, "
                           f"e.g. {first.name} ({first.reason})")
        if self.bakeedit_imported:
            reasons.append(f"the check process imported bakeedit ({self.bakeedit_imported[0]})")
        return reasons


def expected_tensors(model: nn.Module, layout: ModelLayout, plan: EditPlan) -> dict[str, torch.Tensor]:
    """bakeedit's fold of every tensor ``plan`` edits, from ``model``'s (unedited) parameters, by state-dict name:
    what ``merge_and_unload()`` must give where no baked checkpoint is at hand (every other tensor: the base's)."""
    out: dict[str, torch.Tensor] = {}
    for group in plan.groups:
        module = layout.module(model, group.layer, group.site)
        for target in fold_targets(layout, group, getattr(module, "bias", None) is not None):
            tensor = out.get(target.name)
            if tensor is None:
                tensor = getattr(module, target.name.rsplit(".", 1)[1]).detach().cpu()
            out[target.name] = scaled(tensor, target.axis, channel_factors(layout, group, tensor.shape[target.axis]))
    return {k: v.contiguous() for k, v in out.items()}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _prepare(check: AdapterCheck, folder: Path) -> tuple[dict, tuple[torch.Tensor, torch.Tensor, int]]:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    param = next(check.model.parameters())
    inputs = check.inputs or probe_inputs(None, None, check.model.config)
    with torch.no_grad():
        base = probe_logits(check.model, inputs)
        with runtime_edit(check.model, check.layout, check.plan):
            hooked = probe_logits(check.model, inputs)
    save_file({k: v.cpu().contiguous() for k, v in inputs.items()}, str(folder / "inputs.safetensors"))
    expected = None
    if check.baked_folder is None:
        expected = folder / "expected.safetensors"
        save_file(expected_tensors(check.model, check.layout, check.plan), str(expected))
    job = {"adapter": str(check.adapter), "base": str(check.base_folder), "dtype": _dtype_name(param.dtype),
           "device": param.device.type, "inputs": str(folder / "inputs.safetensors"),
           "logits": str(folder / "logits.safetensors"), "expected": None if expected is None else str(expected),
           "baked": None if check.baked_folder is None else str(check.baked_folder)}
    return job, (base, hooked, int(inputs["input_ids"].shape[0]))


def _ia3_nonfeedforward(adapter: Path) -> set[str]:
    config = json.loads((Path(adapter) / "adapter_config.json").read_text())
    targets, feedforward = config.get("target_modules") or [], config.get("feedforward_modules") or []
    if isinstance(targets, str) or isinstance(feedforward, str):  # a regex: we never write one
        return set()
    return set(targets) - set(feedforward)


def merge_leg(check: AdapterCheck, merge: dict) -> dict:
    """The merge fields of :class:`AdapterVerification` from the worker's comparison: a tensor beyond one rounding
    from the reference fails, except a non-feedforward IA3 target's bias that the merge left as in the base
    (peft < 0.6), which is listed as a known difference; an edited tensor missing from the merged model fails."""
    nonff = _ia3_nonfeedforward(check.adapter) if check.kind == "ia3" else set()
    mismatched, known = [], []
    for d in merge["differing"]:
        if d["close"]:
            continue
        if d["name"].endswith(".bias") and d["name"][: -len(".bias")] in nonff and d["equal_to_base"]:
            known.append(TensorDifference(name=d["name"], max_abs_diff=d["max_abs_diff"], reason=IA3_BIAS_REASON))
        else:
            reason = "left as in the base" if d["equal_to_base"] else "differs beyond one rounding"
            mismatched.append(TensorDifference(name=d["name"], max_abs_diff=d["max_abs_diff"], reason=reason))
    mismatched += [TensorDifference(name=n, max_abs_diff=float("inf"), reason="edited, but not in the merged model")
                   for n in merge["missing"]]
    status = FAILED if mismatched or not merge["compared"] else (KNOWN_DIFFERENCE if known else PASSED)
    return {"merge": status, "merge_compared": merge["compared"], "merge_bit_exact": merge["bit_exact"],
            "merge_max_abs_diff": merge["max_abs_diff"], "merge_rtol": merge["rtol"],
            "merge_mismatched": mismatched, "merge_known_differences": known,
            "merge_not_compared": merge["not_compared"],
            "merge_reference": "baked checkpoint" if check.baked_folder is not None else
            "base checkpoint with bakeedit's fold of the edited tensors"}


def _conclude(check: AdapterCheck, job: dict, reference: tuple[torch.Tensor, torch.Tensor, int], result: dict,
              versions: dict[str, str], imported: list[str]) -> AdapterVerification:
    from safetensors.torch import load_file

    base, hooked, n_prompts = reference
    dtype = getattr(torch, job["dtype"])
    error = result.get("error")
    logits = torch.full_like(hooked, float("nan")) if error else load_file(job["logits"])["logits"]
    legs = compare_logits(hooked, logits, dtype, None, n_prompts, "", base=base, runtime_dtype=dtype)
    within = bool(legs.within_tolerance) and not error  # NaN compares false: a failed load never passes
    fields: dict = {}
    if not error:
        problems = [f"{what}: {k}" for what in ("missing", "unexpected", "changed") for k in result["keys"][what]]
        fields = {"keys": FAILED if problems else PASSED, "key_problems": problems,
                  "peft_class": result.get("peft_class"), **merge_leg(check, result["merge"])}
    passed = (within and legs.power != FAILED and fields.get("keys") == PASSED and fields.get("merge") != FAILED
              and not imported)
    return AdapterVerification(
        kind=check.kind, versions=versions, dtype=job["dtype"], n_tokens=legs.n_tokens,
        max_abs_logit_delta=float("inf") if error else legs.max_abs_logit_delta,
        mean_abs_logit_delta=float("inf") if error else legs.mean_abs_logit_delta,
        max_abs_logit=legs.max_abs_logit, tolerance=legs.tolerance, within_tolerance=within,
        edit_effect=legs.edit_effect or 0.0, power=FAILED if error else legs.power, bakeedit_imported=imported,
        error=error, passed=bool(passed), **fields)


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")  # the base and the adapter are local folders: never reach a hub
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def verify_adapters(checks: Sequence[AdapterCheck], timeout_s: float | None = None) -> list[AdapterVerification]:
    """Verify several adapters in one fresh process (start-up of torch + transformers + peft paid once)."""
    with tempfile.TemporaryDirectory(prefix="bakeedit-adapter-check-") as work:
        jobs, references = [], []
        for i, check in enumerate(checks):
            job, reference = _prepare(check, Path(work) / str(i))
            jobs.append(job)
            references.append(reference)
        job_file, result_file = Path(work) / "job.json", Path(work) / "result.json"
        job_file.write_text(json.dumps({"checks": jobs, "result": str(result_file)}))
        try:
            proc = subprocess.run([sys.executable, "-I", str(WORKER), str(job_file)], capture_output=True,
                                  text=True, timeout=timeout_s, env=_environment(), check=False)
        except subprocess.TimeoutExpired as exc:
            raise VerificationError(f"the adapter check process did not finish within {timeout_s:g} s",
                                    hint="raise the timeout, or check a smaller model") from exc
        if proc.returncode != 0 or not result_file.is_file():
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise VerificationError(f"the adapter check process failed (exit {proc.returncode}): {tail}",
                                    hint="run it again with the same torch, transformers and peft installed")
        report = json.loads(result_file.read_text())
        return [_conclude(check, job, reference, result, report["versions"], report["bakeedit_imported"])
                for check, job, reference, result in zip(checks, jobs, references, report["checks"], strict=True)]


def verify_adapter(check: AdapterCheck, timeout_s: float | None = None) -> AdapterVerification:
    """:func:`verify_adapters` of one adapter."""
    return verify_adapters([check], timeout_s)[0]
