"""The response maps an edit can apply to a neuron: their formulas, parameters, ranges and functions.

One table for every layer that speaks of maps: the recipe schema checks a map's parameters when a recipe is read
(``bakeedit/recipe.py``), the plan resolves maps that are linear for their parameters into folded scales
(``edit/plan.py``), and the runtime hooks apply them (``edit/nonlinear.py``, which documents the maps and their
position scopes). The generated custom module repeats the four formulas; round-trip tests pin the two together.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

MapFn = Callable[[torch.Tensor, Mapping[str, torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class ResponseMap:
    """One family of elementwise maps: its formula, named parameters and when it degenerates to a scale."""

    name: str
    formula: str
    params: tuple[str, ...]
    defaults: dict[str, float]
    positive: tuple[str, ...]
    fn: MapFn
    linear: Callable[[Mapping[str, float]], float | None] = field(repr=False)


def _sigmoid_linear(p: Mapping[str, float]) -> float | None:
    if p["alpha"] == 0:
        return 1.0
    return 1.0 + p["alpha"] / 2 if p["beta"] == 0 else None


MAPS: dict[str, ResponseMap] = {
    m.name: m
    for m in (
        ResponseMap("scale", "lambda * a", ("lambda",), {"lambda": 1.0}, (),
                    lambda a, p: a * p["lambda"], lambda p: p["lambda"]),
        ResponseMap("tanh_gain", "a + alpha * tanh(a / s)", ("alpha", "s"), {"alpha": 1.0, "s": 1.0}, ("s",),
                    lambda a, p: a + p["alpha"] * torch.tanh(a / p["s"]),
                    lambda p: 1.0 if p["alpha"] == 0 else None),
        ResponseMap("sigmoid_gain", "a * (1 + alpha * sigmoid(beta * (|a| - theta)))", ("alpha", "beta", "theta"),
                    {"alpha": 1.0, "beta": 1.0, "theta": 0.0}, (),
                    lambda a, p: a * (1 + p["alpha"] * torch.sigmoid(p["beta"] * (a.abs() - p["theta"]))),
                    _sigmoid_linear),
        ResponseMap("power", "sign(a) * |a| ** p", ("p",), {"p": 1.0}, ("p",),
                    lambda a, p: torch.sign(a) * a.abs().pow(p["p"]), lambda p: 1.0 if p["p"] == 1 else None),
    )
}


def check_params(map_name: str, params: Mapping[str, float]) -> None:
    """Raise ``ValueError`` naming the parameter if ``params`` do not fit ``map_name`` (unknown, not finite,
    or not positive where the map divides by it or raises to it)."""
    if map_name not in MAPS:
        raise ValueError(f"unknown map '{map_name}'; allowed: {', '.join(m for m in MAPS if m != 'scale')}")
    spec = MAPS[map_name]
    for name, value in params.items():
        if name not in spec.params:
            raise ValueError(f"'{name}' is not a parameter of {map_name} (it takes {', '.join(spec.params)})")
        if not math.isfinite(value):
            raise ValueError(f"params.{name} must be a finite number (got {value})")
        if name in spec.positive and value <= 0:
            raise ValueError(f"params.{name} must be > 0 for {map_name} (got {value})")


def full_params(map_name: str, params: Mapping[str, float]) -> dict[str, float]:
    """``params`` completed with the map's defaults, in the map's parameter order."""
    spec = MAPS[map_name]
    return {name: float(params.get(name, spec.defaults[name])) for name in spec.params}


def linear_lambda(map_name: str, params: Mapping[str, float]) -> float | None:
    """The lambda of ``a <- lambda * a`` that the map equals for these parameters, or None if it is nonlinear."""
    return MAPS[map_name].linear(full_params(map_name, params))


def apply_map(map_name: str, a: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``f(a)`` computed in float32 (parameters broadcast over the last axis) and cast back to ``a``'s dtype."""
    return MAPS[map_name].fn(a.float(), params).to(a.dtype)
