"""A random control that disturbs the model as much as the edit does (issue: "a control that is fair").

A control of equal count and lambda is not equal in strength: random channels may matter more (or less) than
located ones. The matched control keeps the located set's exact shape (same count per layer and site, drawn at
random with a seed: ``locate/random.py``) and scales its edit until its disturbance of the model, the mean KL
divergence from the base on neutral text (``evaluate/disturbance.py``), equals the edit's. Every linear lambda of
the control becomes ``1 + t * (lambda - 1)``: ``t = 1`` is the same lambda, ``t < 1`` a milder control, ``t > 1`` a
stronger one; ``t`` is found by a few ratio steps ``t * sqrt(KL_edit / KL(t))`` (KL is about quadratic in
``t``), then by bisection if those did not land within :data:`REL_TOL` (KL grows with ``t`` for a linear scale).
Where random masks disturb less than located masks, the matched lambdas go below 0 (a negative lambda flips
the neuron's sign); the report says so.
``t`` scales every linear scale of the plan, folded or position-scoped (KnowBias's last-position edit); the
parameters of a nonlinear map are kept, so a plan with no linear part has nothing to scale and its control is
reported as not matched (``scalable``), with both KLs, rather than as matched at ``t = 1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from bakeedit.edit import EditPlan
from bakeedit.evaluate.disturbance import Disturbance
from bakeedit.neurons import NeuronSet

#: Bisection stops when the control's KL is within this fraction of the edit's.
REL_TOL = 0.05
MAX_SCALE = 64.0
MAX_STEPS = 30
RATIO_STEPS = 4


@dataclass
class MatchedControl:
    """The control's neurons and plan, the scale ``t`` of its lambdas, and both disturbances (nats per token)."""

    neurons: NeuronSet
    plan: EditPlan
    scale: float
    kl_edit: float
    kl_control: float
    kl_same_lambda: float  # the control at t = 1, for the report: how unequal the plain control was
    matched: bool  # False when no t in [0, MAX_SCALE] reached the edit's KL within REL_TOL (the closest is kept)
    scalable: bool = True  # False when the plan has no linear scale to move (nonlinear maps only): t stays 1


def _scale(lambdas: list[float], t: float) -> list[float]:
    return [1.0 + t * (lam - 1.0) for lam in lambdas]


def scalable(plan: EditPlan) -> bool:
    """Whether ``plan`` has a linear scale (folded or position-scoped) that :func:`scaled_plan` can move."""
    return bool(plan.groups) or any(g.map == "scale" for g in plan.module_groups)


def scaled_plan(plan: EditPlan, t: float) -> EditPlan:
    """``plan`` with every linear lambda, folded or position-scoped, moved to ``1 + t * (lambda - 1)``; nonlinear
    maps unchanged."""
    groups = [g.model_copy(update={"lambdas": _scale(g.lambdas, t)}) for g in plan.groups]
    module_groups = [g.model_copy(update={"params": {**g.params, "lambda": _scale(g.params["lambda"], t)}})
                     if g.map == "scale" else g for g in plan.module_groups]
    return plan.model_copy(update={"groups": groups, "module_groups": module_groups})


def match_control(disturbance: Disturbance, edit_plan: EditPlan, control: NeuronSet, control_plan: EditPlan,
                  rel_tol: float = REL_TOL) -> MatchedControl:
    """Scale ``control_plan`` (the edit applied to ``control``'s neurons) until it disturbs as much as ``edit_plan``."""
    target = disturbance.kl(edit_plan)
    seen: dict[float, float] = {}

    def kl_at(t: float) -> float:
        if t not in seen:
            seen[t] = disturbance.kl(scaled_plan(control_plan, t))
        return seen[t]

    def close(t: float) -> bool:
        return abs(kl_at(t) - target) <= rel_tol * max(target, 1e-12)

    same = kl_at(1.0)
    if target <= 0 or not scalable(control_plan):
        return MatchedControl(control, control_plan, 1.0, target, same, same,
                              close(1.0) if target > 0 else same <= 0, scalable(control_plan))
    # KL grows about as t^2 for a small edit (it is quadratic in the perturbation), so t * sqrt(target / KL(t)) is
    # a close next guess: usually 2-3 KL passes instead of bisection's 6-10. Bisection below takes over if not.
    t = 1.0
    for _ in range(RATIO_STEPS):
        if close(t) or kl_at(t) <= 0:
            break
        t = min(MAX_SCALE, t * math.sqrt(target / kl_at(t)))
    if close(t):
        return MatchedControl(control, scaled_plan(control_plan, t), t, target, seen[t], same, True)
    lo = max([x for x, kl in seen.items() if kl < target], default=0.0)
    hi = min([x for x, kl in seen.items() if kl > target], default=min(MAX_SCALE, max(2.0, 2 * max(seen))))
    if lo >= hi:  # KL not monotonic in t over the guesses: bracket from scratch
        lo = 0.0
    while kl_at(hi) < target and hi < MAX_SCALE:
        lo, hi = hi, min(2 * hi, MAX_SCALE)
    best = min(seen, key=lambda t: abs(seen[t] - target))
    for _ in range(MAX_STEPS):
        if close(best) or kl_at(hi) < target:
            break
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if kl_at(mid) < target else (lo, mid)
        best = min(seen, key=lambda t: abs(seen[t] - target))
    return MatchedControl(control, scaled_plan(control_plan, best), best, target, seen[best], same, close(best))
