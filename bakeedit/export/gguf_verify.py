"""Does the baked GGUF reproduce the runtime edit? Checked in a fresh process with plain transformers.

The worker (``python -m bakeedit.export.gguf_verify REQUEST RESULT``) loads the source GGUF and the baked one
with ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)`` in float32, runs the probe through the
source without hooks (``base``), the source with the plan's hooks (``hooked``: the reference) and the baked file
(``baked``), and reports ``max |hooked - baked|`` and the edit's own effect ``max |hooked - base|``. A fresh
process, because the check must see only what a user of the file would load.

The bound depends on what the bake had to do (docs/export.md, "Baked GGUF", has the derivation and the numbers):

* every change **exact** (F32 arithmetic, or every float16 scale field times lambda representable: lambda 0 or a
  power of two): the float32 tolerance, ``1e-4``;
* float16/bfloat16 **rounding** of a row (a scale field, or a value, times a lambda it cannot represent): with
  ``W = S + O`` (``S`` the part the ``d`` field scales, ``O`` the part ``m``/``dmin`` scales; ``O = 0`` for
  one-field types and F16/BF16, whose values are blocks of one), each block's values become
  ``f (1 + e_d) S_b + f (1 + e_m) O_b`` with ``|e_d| <= eps_d``, ``|e_m| <= eps_m`` the measured largest relative
  roundings of the fields (at most ``2^-11`` for normal float16). So at every token a baked row's output differs
  from the runtime edit's by at most ``|f| B_i(t)``, ``B_i(t) = sum_b eps_d |S_ib . x_b(t)| + eps_m |O_ib . x_b(t)|``:
  rigorous at the row, whatever the signs of the roundings. The logit bound is ``1e-4 + 4 s``, ``s`` the sum over
  edited tensors of the logit change when that tensor's rows are moved by ``B`` in the direction of their
  activation at run time (both signs, the larger taken): first order, the triangle inequality across tensors,
  and one sign pattern, hence the factor (``ROUNDING_FACTOR``, with the measurements behind it);
* **requantised** blocks (column edits of quantised tensors): the requantisation refits the blocks' grids, which
  is no lambda at all; the bound is then the power rule's, the delta below a quarter of the edit's own effect
  (and at least the rounding bound), and the record says how far the other values of those blocks moved.

In every case the power rule of docs/verification.md applies too (delta below a quarter of the effect once the
effect is above float32 noise), and the exact leg (``gguf_tensors.exact_problems``) must pass.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, Field

from bakeedit.edit.plan import EditPlan
from bakeedit.errors import VerificationError
from bakeedit.export.gguf_tensors import GgufChange
from bakeedit.export.verify import FAILED, PASSED, POWER_RATIO, power_status

FLOAT32_TOLERANCE = 1e-4
#: ``s`` is a first-order estimate, not a worst case over the roundings' sign patterns: the bound takes it 4 times.
#: Over 76 tiny cases the delta reached 1.84 s (K-quant rows of one 256-value block whose d and dmin round apart),
#: at most 0.85 s otherwise (docs/export.md, "Baked GGUF").
ROUNDING_FACTOR = 4.0
EXACT, ROUNDED, REQUANTISED = "exact", "rounded", "requantised"


class RoundedRows(BaseModel):
    """Rows of one tensor whose scaling rounded: where they are in the transformers model and how far they may be
    off (module docstring): ``eps`` of the ``d`` field (or of the values), ``eps_offset`` of the ``m``/``dmin``
    field and ``offsets`` the part it scales (``O``, one list per channel), for two-field types."""

    module: str
    channels: list[int]
    factors: list[float]
    block: int
    eps: float
    eps_offset: float = 0.0
    offsets: list[list[float]] | None = None
    transposed: bool = False  # GPT-2's Conv1D stores [in, out]


class GgufVerification(BaseModel):
    """What ``bakeedit.json`` of a GGUF folder records about the check."""

    compared: str = ("baked GGUF vs the source GGUF with the edit applied by hooks, both loaded with "
                     "transformers (gguf_file=) in float32 in a fresh process")
    kind: str  # exact | rounded | requantised: which bound applies
    bound: float
    bound_rule: str
    rounding_eps: float = 0.0  # largest measured block deviation of a rounded (not requantised) change
    sensitivity: float | None = None  # s: the logit change of the rows' largest deviation (module docstring)
    max_abs_logit_delta: float
    mean_abs_logit_delta: float
    max_abs_logit: float
    edit_effect: float
    power_floor: float = FLOAT32_TOLERANCE
    power: str
    exact: str  # passed | failed: the file-level leg
    exact_problems: list[str] = Field(default_factory=list)
    passed: bool
    n_prompts: int
    n_tokens: int
    prompts_sha256: str
    runtime_dtype: str = "float32"
    seconds: float = 0.0

    def failures(self) -> list[str]:
        reasons = []
        if self.max_abs_logit_delta > self.bound:
            reasons.append(f"max |delta logit| {self.max_abs_logit_delta:.3g} > bound {self.bound:.3g} "
                           f"({self.bound_rule})")
        if self.power == FAILED:
            reasons.append(f"max |delta logit| {self.max_abs_logit_delta:.3g} is not below 1/4 of the edit's own "
                           f"effect {self.edit_effect:.3g}")
        if self.exact == FAILED:
            reasons.append(f"the file is not the edit of its source: {self.exact_problems[0]}")
        return reasons


def classify(changes: Sequence[GgufChange]) -> tuple[str, float]:
    """(the kind of bound, the rounding eps of the non-requantised changes that rounded)."""
    if any(c.axis == "column" and not c.exact for c in changes):
        kind = REQUANTISED
    elif all(c.exact for c in changes):
        kind = EXACT
    else:
        kind = ROUNDED
    eps = max((c.rel_error for c in changes if c.axis == "row" and not c.exact), default=0.0)
    return kind, eps


def _worker_env() -> dict[str, str]:
    """The worker imports this package from where this process found it, whatever its working directory."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def verify_gguf(source: Path, baked: Path, plan: EditPlan, changes: Sequence[GgufChange], *,
                rounded: Sequence[RoundedRows] = (), exact_problems: Sequence[str] = (), arch: str | None = None,
                prompts: Sequence[str] | None = None, tokenizer: bool = False,
                timeout: float | None = None) -> GgufVerification:
    """Run the check in a fresh process and judge it (module docstring). ``tokenizer`` probes with the GGUF's own
    tokenizer and ``prompts`` (default: verify.DEFAULT_PROMPTS); otherwise with fixed random token ids."""
    kind, eps = classify(changes)
    request = {"source": str(Path(source).resolve()), "baked": str(Path(baked).resolve()),
               "plan": plan.model_dump(mode="json"), "arch": arch, "tokenizer": tokenizer,
               "prompts": list(prompts) if prompts else None, "rounded": [r.model_dump() for r in rounded]}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bakeedit-gguf-verify-") as tmp:
        req, res = Path(tmp) / "request.json", Path(tmp) / "result.json"
        req.write_text(json.dumps(request))
        proc = subprocess.run([sys.executable, "-m", "bakeedit.export.gguf_verify", str(req), str(res)],
                              capture_output=True, text=True, env=_worker_env(), timeout=timeout, check=False)
        if proc.returncode != 0 or not res.is_file():
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise VerificationError(f"the GGUF check could not run: {tail}",
                                    hint="the baked file must load with transformers (gguf_file=)")
        measured = json.loads(res.read_text())
    return judge(kind, eps, measured, list(exact_problems), time.monotonic() - started)


def judge(kind: str, eps: float, measured: dict, exact_problems: list[str], seconds: float = 0.0) -> GgufVerification:
    """The bound for ``kind`` and the verdict, from the worker's numbers."""
    delta, effect, s = measured["max_abs_logit_delta"], measured["edit_effect"], measured.get("sensitivity")
    if kind == EXACT:
        bound, rule = FLOAT32_TOLERANCE, "exact scaling: float32 tolerance 1e-4"
    else:
        bound = FLOAT32_TOLERANCE + ROUNDING_FACTOR * (s or 0.0)
        rule = (f"float16/bfloat16 rounding, eps={eps:.3g}: 1e-4 + 4 s, s={s or 0.0:.3g} the logit change of the "
                "edited rows' largest deviation |f| B")
        if kind == REQUANTISED:
            bound = max(bound, POWER_RATIO * effect)
            rule = (f"requantised blocks: max(1e-4 + 4 s, 1/4 of the edit's own effect {effect:.3g}); "
                    f"s={s or 0.0:.3g}")
    power = power_status(effect, delta, FLOAT32_TOLERANCE)
    exact = FAILED if exact_problems else PASSED
    # the exact leg always runs and compares every edited tensor with the edit of its source: it is decisive, so an
    # effect within float32 noise (power not applicable) passes on it
    passed = delta <= bound and power != FAILED and exact == PASSED
    return GgufVerification(kind=kind, bound=bound, bound_rule=rule, rounding_eps=eps, sensitivity=s,
                            max_abs_logit_delta=delta, mean_abs_logit_delta=measured["mean_abs_logit_delta"],
                            max_abs_logit=measured["max_abs_logit"], edit_effect=effect, power=power, exact=exact,
                            exact_problems=exact_problems, passed=passed, n_prompts=measured["n_prompts"],
                            n_tokens=measured["n_tokens"], prompts_sha256=measured["prompts_sha256"],
                            seconds=round(seconds, 2))


# ------------------------------------------------------------------------------------------------ the worker


def _load(path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def _deviation_hook(model, rows: RoundedRows, sign: float):
    """A forward hook moving the rows' raw outputs ``y_i(t)`` by ``sign * sign(y_i(t)) * B_i(t)``: the largest
    deviation, in the direction of the activation (exactly the rounding's own direction for a row of one block
    with one field, where it is a rounded lambda). It runs before the runtime edit scales the rows by ``f``."""
    import torch

    module = model.get_submodule(rows.module)
    weight = module.weight.detach().float()
    weight = weight.T if rows.transposed else weight
    channels = torch.tensor(rows.channels)
    w = weight[channels]
    offsets = torch.tensor(rows.offsets, dtype=torch.float32) if rows.offsets is not None else torch.zeros_like(w)
    parts = [(rows.eps, (w - offsets).reshape(len(channels), -1, rows.block)),  # [k, blocks, block]
             (rows.eps_offset, offsets.reshape(len(channels), -1, rows.block))]

    def hook(_module, args, output):
        xb = args[0].float().reshape(*args[0].shape[:-1], -1, rows.block)  # [..., blocks, block]
        bound = sum((eps * torch.einsum("...nb,knb->...kn", xb, part).abs().sum(-1) for eps, part in parts if eps),
                    torch.zeros(()))
        out = output.clone()
        raw = out[..., channels]
        out[..., channels] = raw + (sign * torch.sign(raw.float()) * bound).to(out.dtype)
        return out

    return module.register_forward_hook(hook)


def run_worker(request: dict) -> dict:
    """The measurements of one check (module docstring); run in the fresh process."""
    from transformers import AutoTokenizer  # start-up time: the worker alone needs transformers

    from bakeedit.edit.hooks import runtime_edit
    from bakeedit.export.verify import probe_inputs, probe_logits, prompts_digest
    from bakeedit.models.arch import ModelLayout

    source, baked = Path(request["source"]), Path(request["baked"])
    plan = EditPlan.model_validate(request["plan"])
    model = _load(source)
    layout = ModelLayout.for_model(model, arch=request.get("arch"))
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name) if request["tokenizer"] else None
    inputs = probe_inputs(tokenizer, request.get("prompts"), model.config)
    base = probe_logits(model, inputs)
    with runtime_edit(model, layout, plan):
        hooked = probe_logits(model, inputs)
    sensitivity = None
    if request["rounded"]:
        sensitivity = 0.0
        for rows in map(RoundedRows.model_validate, request["rounded"]):
            largest = 0.0
            for sign in (1.0, -1.0):
                handle = _deviation_hook(model, rows, sign)
                try:
                    with runtime_edit(model, layout, plan):
                        largest = max(largest, float((probe_logits(model, inputs) - hooked).abs().max()))
                finally:
                    handle.remove()
            sensitivity += largest
    del model
    edited = probe_logits(_load(baked), inputs)
    delta = (hooked - edited).abs()
    return {"max_abs_logit_delta": float(delta.max()), "mean_abs_logit_delta": float(delta.mean()),
            "max_abs_logit": float(hooked.abs().max()), "edit_effect": float((hooked - base).abs().max()),
            "sensitivity": sensitivity, "n_prompts": int(inputs["input_ids"].shape[0]), "n_tokens": int(delta.shape[0]),
            "prompts_sha256": prompts_digest(request.get("prompts"), tokenizer)}


def main(argv: Sequence[str]) -> int:
    request_path, result_path = argv
    result = run_worker(json.loads(Path(request_path).read_text()))
    Path(result_path).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
