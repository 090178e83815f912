"""Choose an edit's parameters on the locate split: the lowest contrast score within a capability-loss budget.

The objective (docs/nonlinear.md). For parameters ``theta`` (a response map's ``alpha``, ``s``, ``p``, ... or a
scale's ``lambda``), applied with runtime hooks to the located neurons:

    minimise    C(theta) = mean_i | log p(stereo_i | x_i; theta) - log p(anti_i | x_i; theta) |
    subject to  L(theta) - L(base) <= budget

``x_i`` is the stereotype-inviting prompt of locate item ``i`` (``bakeedit/data/contrast.py``), asked the
way the ``contrast_success`` evaluation asks on the heldout split (context, blank line, ``Q: question``, ``A:``);
``stereo_i`` / ``anti_i`` are its stereotyped and anti-stereotyped answers (summed token log-probabilities). ``C`` is
0 when the model prefers neither person on any item. ``L`` is the mean token negative log-likelihood (nats) of the
matched neutral texts ``y_i`` (the same context with the neutral question): the capability the edit must not damage
beyond ``budget``. Since ``C(base)`` is fixed, the lowest ``C`` is the largest reduction of the contrast score.

The search is a grid (the product of the values the recipe lists). Each point is one batched pass over
``3 x n_items`` short sequences (two answers and one neutral text per item): 96 for the 32 items of
``recipes/ne-coco-smollm2.yaml``. A grid is deterministic, needs no gradient through ``|a| ** p`` at ``a = 0``, and
every point tried is recorded in ``bakeedit.json`` (``fit``), so the choice can be audited.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from pydantic import BaseModel
from torch import nn

from bakeedit.data.contrast import load_contrast_items
from bakeedit.edit.hooks import runtime_edit
from bakeedit.edit.plan import EditPlan, build_plan
from bakeedit.errors import EditError
from bakeedit.models.arch import ModelLayout
from bakeedit.neurons import Neuron
from bakeedit.recipe import EditSpec

if TYPE_CHECKING:
    from bakeedit.models.load import LoadedModel


class Objective(Protocol):
    """What a fit minimises: ``measure(model) -> (contrast score, capability loss)`` on fixed data."""

    name: str

    def measure(self, model: nn.Module) -> tuple[float, float]: ...


class FitPoint(BaseModel):
    params: dict[str, float]
    contrast: float
    capability_loss: float
    feasible: bool


class FitReport(BaseModel):
    """Every grid point tried and the one chosen (recorded in ``bakeedit.json`` as ``fit``)."""

    objective: str
    budget: float
    base_contrast: float
    base_capability: float
    chosen: dict[str, float]
    contrast: float
    capability_loss: float
    points: list[FitPoint]
    seconds: float
    data: dict[str, Any] = {}
    cached: bool = False  # read from bakeedit's cache (workflows/fit_cache.py); ``seconds`` are the original fit's


def grid_points(grid: Mapping[str, Sequence[float]]) -> list[dict[str, float]]:
    """The product of the listed values, parameters in sorted order, values in the order given."""
    names = sorted(grid)
    return [dict(zip(names, values, strict=True)) for values in itertools.product(*(grid[n] for n in names))]


@torch.no_grad()
def fit_grid(
    model: nn.Module,
    layout: ModelLayout,
    plan_for: Callable[[dict[str, float]], EditPlan],
    objective: Objective,
    grid: Mapping[str, Sequence[float]],
    budget: float,
    require_reduction: bool = True,
) -> FitReport:
    """Try every grid point with runtime hooks; keep the lowest contrast among points within the budget.

    Ties go to the smaller capability loss, then to the earlier point. Raises :class:`EditError` when no point
    keeps the capability loss within ``budget``, and (``require_reduction``) when the best one does not lower the
    contrast score below the unedited model's: baking an edit that the fit found harmful helps nobody.
    """
    start = time.perf_counter()
    base_contrast, base_capability = objective.measure(model)
    points = []
    for params in grid_points(grid):
        plan = plan_for(params)
        with runtime_edit(model, layout, plan):
            contrast, capability = objective.measure(model)
        loss = capability - base_capability
        points.append(FitPoint(params=params, contrast=contrast, capability_loss=loss, feasible=loss <= budget))
    feasible = [p for p in points if p.feasible]
    if not feasible:
        least = min(p.capability_loss for p in points)
        raise EditError(
            f"edit.fit: no grid point keeps the capability loss within the budget {budget:g} "
            f"(the smallest was {least:.4g} nats/token)",
            hint="raise edit.fit.budget, or add gentler values (smaller alpha, p nearer 1) to edit.fit.grid",
        )
    best = min(feasible, key=lambda p: (p.contrast, p.capability_loss))
    if require_reduction and best.contrast >= base_contrast:
        values = ", ".join(f"{k}={v:g}" for k, v in best.params.items())
        raise EditError(
            f"edit.fit: no grid point within the budget lowers the contrast score: {base_contrast:.4g} unedited, "
            f"{best.contrast:.4g} at best ({values})",
            hint="try values that weaken the neurons (alpha < 0, p < 1, lambda < 1), other neurons or another map; "
                 "edit.fit.require_reduction: false bakes the best point anyway",
        )
    return FitReport(
        objective=objective.name, budget=budget, base_contrast=base_contrast, base_capability=base_capability,
        chosen=best.params, contrast=best.contrast, capability_loss=best.capability_loss, points=points,
        seconds=round(time.perf_counter() - start, 3),
    )


#: The evaluation's ``contrast_success`` probe asks the same way (on the heldout split).
PROMPT = "{context}\n\nQ: {question}\nA:"


class ContrastObjective:
    """The stereotype gap on the X prompts of contrast items and the NLL of their neutral Y texts (module doc)."""

    name = "mean |log p(stereotyped) - log p(anti-stereotyped)| on X prompts; capability: token NLL of Y texts"

    def __init__(self, tokenizer: Any, items: Sequence[Any], batch_size: int = 16) -> None:
        if tokenizer is None:
            raise EditError("edit.fit needs the model's tokenizer to score the contrast items")
        if not items:
            raise EditError("edit.fit: no contrast items to fit on", hint="check edit.fit.split and categories")
        self.batch_size = batch_size
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.answers: list[tuple[list[int], int]] = []
        for item in items:
            prompt = tokenizer(PROMPT.format(context=item.context, question=item.question))["input_ids"]
            for key in ("stereotyped", "anti_stereotyped"):
                answer = tokenizer(" " + item.options[key], add_special_tokens=False)["input_ids"]
                self.answers.append((list(prompt) + list(answer), len(answer)))
        self.neutral = [(ids, len(ids) - 1) for ids in (list(tokenizer(it.y_text)["input_ids"]) for it in items)]
        self.n_items = len(items)

    def measure(self, model: nn.Module) -> tuple[float, float]:
        answers = sequence_logprobs(model, self.answers, self.pad, self.batch_size)
        gaps = [abs(answers[i][0] - answers[i + 1][0]) for i in range(0, len(answers), 2)]
        neutral = sequence_logprobs(model, self.neutral, self.pad, self.batch_size)
        return sum(gaps) / len(gaps), -sum(lp for lp, _ in neutral) / sum(n for _, n in neutral)


@torch.no_grad()
def sequence_logprobs(
    model: nn.Module, seqs: Sequence[tuple[list[int], int]], pad: int, batch_size: int = 16
) -> list[tuple[float, int]]:
    """``(sum of log p, count)`` of the last ``n`` tokens of each ``(ids, n)``, in right-padded length-sorted
    batches (the model sees no padding before a scored token, so batching does not change the scores)."""
    device = next(model.parameters()).device
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(seqs)
    for first in range(0, len(order), batch_size):
        chunk = order[first:first + batch_size]
        width = max(len(seqs[i][0]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(chunk):
            ids[row, : len(seqs[i][0])] = torch.tensor(seqs[i][0])
            mask[row, : len(seqs[i][0])] = 1
        logp = torch.log_softmax(model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float(), -1)
        for row, i in enumerate(chunk):
            tokens, n = seqs[i]
            targets = torch.tensor(tokens[len(tokens) - n:], device=device)
            picked = logp[row, len(tokens) - n - 1: len(tokens) - 1].gather(-1, targets[:, None])
            out[i] = (float(picked.sum()), n)
    return out


def with_params(edit: EditSpec, params: Mapping[str, float]) -> EditSpec:
    """``edit`` with the fitted values: ``lambda`` for a scale, else merged into the map's ``params``."""
    if edit.type == "scale":
        return edit.model_copy(update={"lambda_": params.get("lambda", edit.lambda_)})
    return edit.model_copy(update={"params": {**edit.params, **params}})


def fit_edit(
    edit: EditSpec, neurons: list[Neuron], loaded: LoadedModel, data: Path | None = None
) -> tuple[EditSpec, FitReport]:
    """Run ``edit.fit`` on the contrast items of its split; returns the edit with the chosen parameters."""
    spec = edit.fit
    if spec is None:
        raise EditError("edit.fit is not set; nothing to fit")
    items = load_contrast_items(data, split=spec.split, categories=spec.categories, max_items=spec.max_items)
    objective = ContrastObjective(loaded.tokenizer, items)

    def plan_for(params: dict[str, float]) -> EditPlan:
        return build_plan(neurons, with_params(edit, params), loaded.layout, source="neurons")

    report = fit_grid(loaded.model, loaded.layout, plan_for, objective, spec.grid, spec.budget,
                      spec.require_reduction)
    report.data = {"file": str(data) if data else "bakeedit/data/contrast_prompts.jsonl", "split": spec.split,
                   "categories": spec.categories, "n_items": objective.n_items}
    return with_params(edit, report.chosen), report
