"""The causal step of ``ine`` (arXiv 2501.14457, Sec. 5.1): keep the candidates whose masking lowers the bias.

A logit score says a neuron *writes* towards the stereotyped token; it does not say that removing it lowers the
bias (other neurons may compensate) or that removing it is harmless. So every candidate is masked (scaled by 0 at
all positions, the edit the recipe will fold) and two numbers are measured:

- ``bias``: the mean ``|log p(female) - log p(male)|`` over the locate prompts (lower = less gendered);
- ``loss``: the mean next-token loss on neutral probe sentences (the capability probe).

Selection is greedy, in groups (:func:`select_by_masking`): groups of ``group_size`` candidates are masked alone and
those that lower ``bias`` within the loss ``tolerance`` are then added, most bias-reducing first, while the kept
set's bias keeps falling and its *cumulative* loss rise stays within ``tolerance``; a group that lowers the bias but
costs too much loss is split into single neurons, one that does not lower the bias is dropped. It stops at ``k``
neurons. ``group_size: 1`` is the plain per-neuron greedy search; larger groups cost fewer forward passes but can
carry a neuron that is useless on its own inside a group that helps as a whole.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from bakeedit import parallel
from bakeedit.edit.hooks import runtime_edit
from bakeedit.edit.plan import build_plan
from bakeedit.locate.ine.data import EncodedPrompt
from bakeedit.locate.ine.scores import last_logits, make_batch
from bakeedit.models.arch import ModelLayout
from bakeedit.neurons import Neuron
from bakeedit.recipe import EditSpec

Address = tuple[int, str, int]


@dataclass(frozen=True)
class Measurement:
    bias: float  # mean |gap| over the prompts, nats
    loss: float  # mean next-token loss on the probe sentences, nats per token


class MaskProbe:
    """``probe(addresses) -> Measurement`` with those neurons masked (runtime hooks; the weights are untouched).

    Masking neurons whose lowest layer is ``L`` leaves blocks ``0 .. L-1`` unchanged, so with ``reuse_lower`` the
    outputs of every block from the unmasked run are kept (per batch) and those blocks return them instead of
    recomputing: most candidates sit in the upper half of the network, where this halves a trial or better.
    """

    def __init__(self, model: nn.Module, layout: ModelLayout, prompts: list[EncodedPrompt],
                 probe: list[list[int]], pad_id: int, batch_size: int = 16, reuse_lower: bool = True) -> None:
        self.model, self.layout, self.pad_id, self.batch_size = model, layout, pad_id, batch_size
        self.prompts, self.probe, self.reuse_lower = prompts, probe, reuse_lower
        self.device = next(model.parameters()).device
        self.calls = 0
        self._outputs: dict[tuple[str, int], dict[int, object]] = {}
        self._skip = 0  # blocks below this index replay their unmasked outputs

    def _forward(self, key: tuple[str, int], **inputs: object) -> object:
        blocks = self.layout.blocks(self.model)
        cached = self._outputs.get(key)
        if self._skip and cached is not None:
            return self._replay(blocks, cached, inputs)
        record = self.reuse_lower and self._skip == 0 and cached is None  # the unmasked run of this batch
        store: dict[int, object] = {}
        handles = [b.register_forward_hook(lambda _m, _a, out, i=i: store.__setitem__(i, out))
                   for i, b in enumerate(blocks)] if record else []
        try:
            out = self.model(**inputs)
        finally:
            for h in handles:
                h.remove()
        if record:
            self._outputs[key] = store
        return out

    def _replay(self, blocks: nn.ModuleList, cached: dict[int, object], inputs: dict) -> object:
        """Run the model with blocks ``0 .. skip-1`` returning their recorded unmasked outputs."""
        patched = []
        try:
            for i in range(self._skip):
                # an instance attribute shadows the class's forward; keep any wrapper already there (accelerate's)
                patched.append((blocks[i], blocks[i].__dict__.get("forward")))
                blocks[i].forward = lambda *_a, _out=cached[i], **_k: _out
            return self.model(**inputs)
        finally:
            for block, previous in patched:
                if previous is None:
                    del block.forward
                else:
                    block.forward = previous

    def _bias_batch(self, n: int, chunk: list[EncodedPrompt]) -> float:
        """Sum of ``|gap|`` over one batch of prompts."""
        batch = make_batch(chunk, self.pad_id, self.device)
        last = last_logits(self.model, batch, forward=lambda **kw: self._forward(("bias", n), **kw))
        return float((last[batch.rows, batch.female] - last[batch.rows, batch.male]).abs().sum())

    def _loss_batch(self, n: int, chunk: list[list[int]]) -> tuple[float, int]:
        """Summed next-token loss and token count of one batch of probe sentences."""
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, seq in enumerate(chunk):
            ids[i, : len(seq)], mask[i, : len(seq)] = torch.tensor(seq), 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        out = self._forward(("loss", n), input_ids=ids, attention_mask=mask, use_cache=False)
        logits = out.logits[:, :-1].float()
        token_nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        return float((token_nll * mask[:, 1:]).sum()), int(mask[:, 1:].sum())

    @torch.no_grad()
    def _measure(self) -> Measurement:
        """Bias and loss with the current hooks; under torchrun each rank runs its share of the batches.

        The batches are those one process cuts, dealt out whole (``parallel.deal_batches``: a rank always gets the
        same ones, so the unmasked outputs it recorded are its own), and the per-batch sums are added in batch
        order once gathered: the same float additions as one process makes, so the trial's numbers are identical.
        """
        size = self.batch_size
        work = [("bias", n, self.prompts[s: s + size]) for n, s in enumerate(range(0, len(self.prompts), size))]
        work += [("loss", n, self.probe[s: s + size]) for n, s in enumerate(range(0, len(self.probe), size))]
        local: dict[tuple[str, int], object] = {}
        for _, (kind, n, chunk) in parallel.deal_batches(work):
            local[(kind, n)] = self._bias_batch(n, chunk) if kind == "bias" else self._loss_batch(n, chunk)
        parts = parallel.gather_mapping(local)
        bias, nll, count = 0.0, 0.0, 0
        for kind, n, _ in work:
            if kind == "bias":
                bias += parts[(kind, n)]
            else:
                batch_nll, batch_count = parts[(kind, n)]
                nll += batch_nll
                count += batch_count
        return Measurement(bias / len(self.prompts), nll / count)

    def __call__(self, addresses: Sequence[Address]) -> Measurement:
        self.calls += 1
        if not addresses:
            self._skip = 0
            return self._measure()
        neurons = [Neuron(layer=layer, site=site, index=index) for layer, site, index in addresses]
        plan = build_plan(neurons, EditSpec.model_validate({"lambda": 0.0}), self.layout, source="ine candidates")
        self._skip = min(layer for layer, _, _ in addresses) if self.reuse_lower else 0
        try:
            with runtime_edit(self.model, self.layout, plan):
                return self._measure()
        finally:
            self._skip = 0


@dataclass
class CausalResult:
    """What the masking search measured and kept."""

    base: Measurement
    screened: list[tuple[list[Address], Measurement]]  # every set masked alone while screening, in order
    kept: list[Address]
    final: Measurement
    trials: list[dict] = field(default_factory=list)  # the accumulation trials, in order, for the report

    def screened_neurons(self) -> set[Address]:
        """Every candidate that took part in a screening trial."""
        return {a for members, _ in self.screened for a in members}


def select_by_masking(
    candidates: Sequence[Address], measure: Callable[[list[Address]], Measurement], k: int, tolerance: float,
    group_size: int, on_trial: Callable[[], None] | None = None,
) -> CausalResult:
    """Keep at most ``k`` of ``candidates`` (given in logit-score order); ``measure`` masks a set and measures it.

    1. Screening: consecutive groups of ``group_size`` are masked alone. A group that lowers the bias within the
       loss ``tolerance`` passes; one that lowers it but costs more loss is split and its members are screened one by
       one; one that does not lower the bias at all is dropped whole.
    2. Accumulation: the screened units that passed, lowest bias first, are added to the kept set while the set's
       bias keeps falling and its loss rise stays within ``tolerance``; a unit that fails is retried member by member.
    """

    def run(addresses: list[Address]) -> Measurement:
        result = measure(addresses)
        if on_trial is not None:
            on_trial()
        return result

    base = run([])
    screened: list[tuple[list[Address], Measurement]] = []

    def passes(m: Measurement) -> bool:
        return m.bias < base.bias and m.loss - base.loss <= tolerance

    units: list[tuple[list[Address], Measurement]] = []
    for start in range(0, len(candidates), group_size):
        group = list(candidates[start: start + group_size])
        m = run(group)
        screened.append((group, m))
        if passes(m):
            units.append((group, m))
        elif len(group) > 1 and m.bias < base.bias:  # helps, but over the loss budget: find the culprit
            for address in group:
                single = run([address])
                screened.append(([address], single))
                if passes(single):
                    units.append(([address], single))
    units.sort(key=lambda u: u[1].bias)  # stable: ties keep the logit-score order

    kept: list[Address] = []
    current = base
    trials: list[dict] = []

    def attempt(members: list[Address]) -> bool:
        nonlocal kept, current
        trial = run(kept + members)
        ok = trial.bias < current.bias and trial.loss - base.loss <= tolerance
        trials.append({"add": [list(a) for a in members], "bias": trial.bias, "loss": trial.loss, "kept": ok})
        if ok:
            kept, current = kept + members, trial
        return ok

    for members, _ in units:
        if len(kept) >= k:
            break
        members = members[: k - len(kept)]
        if not attempt(members) and len(members) > 1:
            for address in members:
                if len(kept) < k:
                    attempt([address])
    return CausalResult(base, screened, kept, current, trials)
