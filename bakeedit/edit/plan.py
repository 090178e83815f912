"""``EditPlan``: which channels of which site get which edit, validated against one model before anything moves.

Like mergekit's plan, it is built and checked in full (indices in range, lambdas and map parameters finite, no
neuron given two edits) before a tensor is touched. A plan has two parts: ``groups``, linear all-position scales
that ``edit/fold.py`` folds into the weights, and ``module_groups``, nonlinear maps and position-scoped edits
(``edit/nonlinear.py``) that only a custom module can carry (``export/custom_module.py``). The runtime hooks
(``edit/hooks.py``) execute both parts on the unmodified model, which is what makes the baked-vs-runtime
verification meaningful.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from bakeedit.errors import EditError, NeuronSetError, UnsupportedArchitecture
from bakeedit.maps import MAPS, check_params, full_params, linear_lambda
from bakeedit.models.arch import ModelLayout
from bakeedit.models.spec import site_order
from bakeedit.neurons import Neuron
from bakeedit.recipe import EditRule, EditSpec


class ScaleGroup(BaseModel):
    """Channels ``indices`` of ``site`` in block ``layer`` scaled by ``lambdas`` (same length)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layer: int
    site: str
    indices: list[int]
    lambdas: list[float]


class ResponseGroup(BaseModel):
    """Channels ``indices`` of ``site`` in block ``layer`` through response map ``map`` at ``positions``.

    ``params`` maps each of the map's parameters to one value per index (``len(indices)`` values). ``scale`` with
    ``positions: last`` (or ``start > 0``) is KnowBias's position-scoped edit.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    layer: int
    site: str
    map: str
    positions: Literal["all", "last"] = "all"
    start: int = 0
    indices: list[int]
    params: dict[str, list[float]]


class EditPlan(BaseModel):
    """An edit: a :class:`ScaleGroup` per ``(layer, site)`` to fold, :class:`ResponseGroup` s for the module.

    ``kind`` is ``scale`` (everything folds), ``module`` (everything needs the custom module) or ``mixed``.
    """

    model_config = ConfigDict(extra="forbid")

    kind: str = "scale"
    groups: list[ScaleGroup] = Field(default_factory=list)
    module_groups: list[ResponseGroup] = Field(default_factory=list)

    @property
    def n_neurons(self) -> int:
        return sum(len(g.indices) for g in self.groups) + sum(len(g.indices) for g in self.module_groups)

    def lambdas_used(self) -> list[float]:
        """Lambdas of the linear scales, folded or position-scoped."""
        scoped = {lam for g in self.module_groups if g.map == "scale" for lam in g.params["lambda"]}
        return sorted({lam for g in self.groups for lam in g.lambdas} | scoped)

    def describe(self) -> list[str]:
        """The plan's distinct edits, one line each, for summaries (``bakeedit apply``, the card): a plain lambda list
        says nothing of a nonlinear map. Per-neuron values show as their range, e.g.
        ``['scale(lambda=2) folded', 'tanh_gain(alpha=-0.25, s=0.5..1) at the last position from token 2']``."""
        lines = []
        if self.groups:
            lines.append(f"scale(lambda={_value_range([lam for g in self.groups for lam in g.lambdas])}) folded")
        merged: dict[tuple[str, str, int], dict[str, list[float]]] = {}
        for g in self.module_groups:
            params = merged.setdefault((g.map, g.positions, g.start), defaultdict(list))
            for name, values in g.params.items():
                params[name] += values
        for (map_name, positions, start), params in merged.items():
            where = "at all positions" if positions == "all" else "at the last position"
            values = ", ".join(f"{name}={_value_range(v)}" for name, v in params.items())
            lines.append(f"{map_name}({values}) {where}" + (f" from token {start}" if start else ""))
        return lines

    @property
    def edit_form(self) -> str:
        """How a checkpoint carries the plan: ``folded``, ``custom_module`` or ``mixed`` (``Provenance.edit_form``)."""
        if not self.module_groups:
            return "folded"
        return "mixed" if self.groups else "custom_module"


def _value_range(values: list[float]) -> str:
    low, high = min(values), max(values)
    return f"{low:g}" if low == high else f"{low:g}..{high:g}"


@dataclass(frozen=True)
class _NeuronEdit:
    """The fully resolved edit of one neuron; equal edits of a neuron listed twice merge."""

    map: str
    params: tuple[tuple[str, float], ...]
    positions: str
    start: int

    @property
    def folds(self) -> bool:
        return self.map == "scale" and self.positions == "all" and self.start == 0

    def describe(self) -> str:
        values = ", ".join(f"{k}={v:g}" for k, v in self.params)
        return f"{self.map}({values}) at {self.positions} positions from {self.start}"


def _rule_name(rule_id: int | None) -> str:
    return "edit" if rule_id is None else f"edit.overrides[{rule_id}]"


def _resolve(neuron: Neuron, rule: EditRule, ordinal: int, rule_id: int | None, where: str) -> _NeuronEdit:
    """One neuron's edit. Its own lambda wins (making it a scale); a map that is linear for its parameters
    becomes a scale, so that at all positions it is folded rather than carried by the module."""
    if neuron.lambda_ is not None or rule.type == "scale":
        lam = neuron.lambda_ if neuron.lambda_ is not None else rule.lambda_
        if not math.isfinite(lam):
            raise EditError(f"{where}: lambda must be finite (got {lam})")
        return _NeuronEdit("scale", (("lambda", float(lam)),), rule.positions, rule.start)
    assert rule.map is not None  # the recipe schema requires a map for type nonlinear
    values: dict[str, float] = {}
    for name, value in rule.params.items():
        if isinstance(value, list):
            if ordinal >= len(value):
                raise EditError(
                    f"{_rule_name(rule_id)}.params.{name}: {len(value)} values for more neurons than that; give "
                    "one value per neuron the rule applies to (in the order of the neuron list), or a single number"
                )
            value = value[ordinal]
        values[name] = float(value)
    try:
        check_params(rule.map, values)
    except ValueError as exc:
        raise EditError(f"{where} ({_rule_name(rule_id)}): {exc}") from exc
    params = full_params(rule.map, values)
    lam = linear_lambda(rule.map, params)
    if lam is not None:
        return _NeuronEdit("scale", (("lambda", lam),), rule.positions, rule.start)
    return _NeuronEdit(rule.map, tuple(params.items()), rule.positions, rule.start)


def _check_list_lengths(edit: EditSpec, counts: Counter) -> None:
    rules = [(None, edit.params)] + [(i, o.params or {}) for i, o in enumerate(edit.overrides)]
    for rule_id, params in rules:
        for name, value in params.items():
            if isinstance(value, list) and len(value) != counts[rule_id]:
                raise EditError(
                    f"{_rule_name(rule_id)}.params.{name}: {len(value)} values, but the rule applies to "
                    f"{counts[rule_id]} neuron(s); give one value per neuron (in list order) or a single number"
                )


def build_plan(neurons: list[Neuron], edit: EditSpec, layout: ModelLayout, source: str = "neurons") -> EditPlan:
    """Validate ``neurons`` against the model and attach each one's edit.

    Linear edits at all positions go to ``groups`` (folded); nonlinear maps and position-scoped edits go to
    ``module_groups``. Errors name ``source`` and the neuron's position in the list, e.g. ``neurons[3].index``.
    """
    chosen: dict[tuple[int, str, int], _NeuronEdit] = {}
    counts: Counter = Counter()
    for i, neuron in enumerate(neurons):
        where = f"{source}[{i}]"
        if neuron.layer >= layout.n_layers:
            raise NeuronSetError(
                f"{where}.layer: {neuron.layer} is out of range; the model has layers 0-{layout.n_layers - 1}"
            )
        try:
            size = layout.site_size(neuron.site)
        except UnsupportedArchitecture as exc:
            raise NeuronSetError(f"{where}.site: {exc}", hint=exc.hint) from exc
        if neuron.index >= size:
            raise NeuronSetError(
                f"{where}.index: {neuron.index} is out of range for {neuron.site}, which has {size} channels "
                f"(0-{size - 1})"
            )
        rule_id, rule = edit.rule_for(neuron)
        resolved = _resolve(neuron, rule, counts[rule_id], rule_id, where)
        counts[rule_id] += 1
        if not resolved.folds and layout.site_map(neuron.site).expert is not None:
            raise NeuronSetError(
                f"{where}.site: {neuron.site} is a routed expert, which sees only the tokens routed to it: a "
                f"{resolved.describe()} edit cannot be carried there",
                hint="routed experts take linear scales at all positions; edit the shared expert or attention sites "
                     "for nonlinear or position-scoped edits",
            )
        previous = chosen.get(neuron.address)
        if previous is not None and previous != resolved:
            if previous.map == resolved.map == "scale" and previous.positions == resolved.positions:
                what = f"lambdas ({previous.params[0][1]} and {resolved.params[0][1]})"
            else:
                what = f"edits ({previous.describe()} and {resolved.describe()})"
            raise NeuronSetError(
                f"{where}: layer {neuron.layer} {neuron.site} {neuron.index} is listed twice with different {what}",
                hint="list each neuron once, or give both entries the same edit",
            )
        chosen[neuron.address] = resolved
    _check_list_lengths(edit, counts)
    return _group(chosen)


def _group(chosen: dict[tuple[int, str, int], _NeuronEdit]) -> EditPlan:
    folded: dict[tuple[int, str], list[tuple[int, float]]] = defaultdict(list)
    scoped: dict[tuple[int, str, str, str, int], list[tuple[int, _NeuronEdit]]] = defaultdict(list)
    for (layer, site, index), ne in chosen.items():
        if ne.folds:
            folded[(layer, site)].append((index, ne.params[0][1]))
        else:
            scoped[(layer, site, ne.map, ne.positions, ne.start)].append((index, ne))
    groups = []
    for layer, site in sorted(folded, key=lambda k: (k[0], site_order(k[1]))):
        pairs = sorted(folded[(layer, site)])
        groups.append(
            ScaleGroup(layer=layer, site=site, indices=[i for i, _ in pairs], lambdas=[lam for _, lam in pairs])
        )
    module_groups = []
    for key in sorted(scoped, key=lambda k: (k[0], site_order(k[1]), *k[2:])):
        layer, site, map_name, positions, start = key
        members = sorted(scoped[key], key=lambda m: m[0])
        params = {name: [dict(ne.params)[name] for _, ne in members] for name in MAPS[map_name].params}
        module_groups.append(
            ResponseGroup(layer=layer, site=site, map=map_name, positions=positions, start=start,
                          indices=[i for i, _ in members], params=params)
        )
    kind = "scale" if not module_groups else ("mixed" if groups else "module")
    return EditPlan(kind=kind, groups=groups, module_groups=module_groups)
