"""The check that the baked weights reproduce the runtime edit.

A fixed probe set goes through (a) the base model with the plan applied by hooks and (b) the saved folder reloaded
with plain ``AutoModelForCausalLM.from_pretrained``; the largest absolute logit difference over all real (non-pad)
positions is recorded and compared with a tolerance. In float32 the two differ only by rounding (fold vs hook
order of products): the default bound is 1e-4. In bf16/fp16 both sides round activations and weights to 8/11
mantissa bits at different places, so the bound is relative to the logit scale; see docs/verification.md for the
measured values behind these defaults.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import torch
from pydantic import BaseModel
from torch import nn

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


class VerificationResult(BaseModel):
    """What ``bakeedit.json`` records about the check."""

    compared: str = "saved checkpoint (plain from_pretrained) vs base model with the edit applied by hooks"
    max_abs_logit_delta: float
    mean_abs_logit_delta: float
    max_abs_logit: float
    tolerance: float
    passed: bool
    dtype: str
    n_prompts: int
    n_tokens: int
    prompts_sha256: str


def default_tolerance(dtype: torch.dtype, max_abs_logit: float) -> float:
    floor, relative = TOLERANCES.get(dtype, TOLERANCES[torch.bfloat16])
    return max(floor, relative * max_abs_logit)


def probe_inputs(tokenizer, prompts: Sequence[str] | None, config) -> dict[str, torch.Tensor]:
    """Token ids of the probe prompts (deterministic random ids when the model has no tokenizer).

    Prompts are cut to the model's context length (GPT-2-style models have short ones).
    """
    config = config.get_text_config()
    if tokenizer is None:
        g = torch.Generator().manual_seed(1234)
        ids = torch.randint(0, config.vocab_size, _RANDOM_PROBE_SHAPE, generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 512
    return dict(
        tokenizer(
            list(prompts or DEFAULT_PROMPTS), return_tensors="pt", padding=True, truncation=True,
            max_length=min(context, 512),
        )
    )


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


def compare_logits(
    reference: torch.Tensor,
    candidate: torch.Tensor,
    dtype: torch.dtype,
    tolerance: float | None,
    n_prompts: int,
    digest: str,
) -> VerificationResult:
    delta = (reference - candidate).abs()
    max_abs = float(reference.abs().max())
    tol = tolerance if tolerance is not None else default_tolerance(dtype, max_abs)
    max_delta = float(delta.max())
    return VerificationResult(
        max_abs_logit_delta=max_delta,
        mean_abs_logit_delta=float(delta.mean()),
        max_abs_logit=max_abs,
        tolerance=tol,
        passed=bool(max_delta <= tol),
        dtype=str(dtype).removeprefix("torch."),
        n_prompts=n_prompts,
        n_tokens=int(reference.shape[0]),
        prompts_sha256=digest,
    )
