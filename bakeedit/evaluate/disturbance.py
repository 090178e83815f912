"""How much an edit disturbs a model: the mean KL divergence of its next-token distributions from the base's.

An edit of 800 random channels can move a model more than 800 located ones; a control is fair only when it
disturbs the model as much as the edit does. The measure is heretic's (first-token KL on harmless prompts), taken
over every position of neutral text: for each real token position ``t`` of each passage,
``KL(P_base(. | x_<=t) || P_edited(. | x_<=t))``, averaged over all positions of all passages (nats). The passages
(``bakeedit/data/neutral_text.txt``) mention no people and no social groups, so the number is about disturbance,
not about bias.

:class:`Disturbance` runs the base model over the passages once and keeps its log-probabilities, so measuring many
candidate edits (a matched control's lambda search, a parameter search) costs one forward pass each.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from bakeedit.data import package_data_path
from bakeedit.edit import EditPlan, runtime_edit
from bakeedit.errors import DataError
from bakeedit.io.jsonl import read_lines
from bakeedit.models.arch import ModelLayout

NEUTRAL_FILE = "neutral_text.txt"


def neutral_texts(path: Path | None = None) -> list[str]:
    """The neutral passages: one a line, ``#`` comments and blank lines skipped."""
    return read_lines(Path(path) if path is not None else package_data_path(NEUTRAL_FILE), "neutral text")


def _batches(tokenizer, texts: Sequence[str], batch_size: int, max_length: int) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches built by hand (the shared tokenizer is not modified: it may have no pad token)."""
    encoded = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]
    batches = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        width = max(len(ids) for ids in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, seq in enumerate(chunk):
            ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, :len(seq)] = 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


class Disturbance:
    """The base model's next-token log-probabilities on neutral text, and the mean KL of an edit from them."""

    def __init__(self, model: nn.Module, layout: ModelLayout, tokenizer, texts: Sequence[str] | None = None,
                 batch_size: int = 16, max_length: int = 128) -> None:
        if tokenizer is None:
            raise DataError("measuring disturbance needs the model's tokenizer (the folder has none)")
        self.model, self.layout = model, layout
        self.texts = list(texts) if texts is not None else neutral_texts()
        self.batches = _batches(tokenizer, self.texts, batch_size, max_length)
        self.base = [self._logprobs(batch) for batch in self.batches]

    @torch.no_grad()
    def _logprobs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """float32 log-softmax at the real positions, ``[n_positions, vocab]``."""
        device = next(self.model.parameters()).device
        inputs = {k: v.to(device) for k, v in batch.items()}
        logits = self.model(**inputs).logits.float()
        return torch.log_softmax(logits[inputs["attention_mask"].bool()], dim=-1).cpu()

    @property
    def n_positions(self) -> int:
        return sum(int(b["attention_mask"].sum()) for b in self.batches)

    def kl(self, plan: EditPlan) -> float:
        """Mean KL(base || base + ``plan`` applied by runtime hooks) per position, in nats."""
        total = 0.0
        with runtime_edit(self.model, self.layout, plan):
            for batch, base in zip(self.batches, self.base, strict=True):
                edited = self._logprobs(batch)
                total += float((base.exp() * (base - edited)).sum())
        return total / self.n_positions
