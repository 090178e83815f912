"""The recipe schema: the pydantic models a recipe's YAML is validated into (docs: ``recipes/README.md``).

Everything that can be checked without the model is checked here: numbers are strict (``lambda: true`` or ``"2"``
is an error, see ``bakeedit/neurons.py``), devices and shard sizes are parsed by the code that will use them, and a
response map's parameters are checked against ``bakeedit/maps.py``. Reading a file, its size limit and the
resolution of relative paths are ``recipe/loading.py``'s.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    field_validator,
    model_validator,
)

from bakeedit.maps import MAPS, check_params
from bakeedit.models.reference import ModelSpec
from bakeedit.models.spec import SITE_NAMES_HINT, is_site
from bakeedit.neurons import Integer, Neuron, Number, strict_number


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def shard_size_bytes(size: str) -> int:
    """``2GB`` -> bytes, with the parser ``save_pretrained`` applies to ``max_shard_size`` (huggingface_hub's), so a
    size it would refuse after locate and fold is refused when the recipe is read."""
    try:
        from huggingface_hub.serialization._base import parse_size_to_int as parse
    except ImportError:  # an older huggingface_hub: transformers' own parser
        from transformers.utils.hub import convert_file_size_to_int as parse
    try:
        value = int(parse(size))
    except (ValueError, TypeError):
        raise ValueError(f"'{size}' is not a size; write a number and a unit, e.g. 2GB, 500MB or 20KB") from None
    if value <= 0:
        raise ValueError(f"'{size}' is not a positive size; e.g. 2GB")
    return value


def _finite(value: float, what: str = "lambda") -> float:
    if not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number (got {value})")
    return value


EditType = Literal["scale", "nonlinear"]
MapName = Literal["tanh_gain", "sigmoid_gain", "power"]
Positions = Literal["all", "last"]


def _strict_param(value: Any) -> Any:
    """A map parameter: refuse a bool or a string, also inside a per-neuron list, before the union sees it."""
    for v in value if isinstance(value, list) else [value]:
        strict_number(v)
    return value


#: A map parameter: one value for every neuron of the rule, or a list with one value per neuron (in list order).
ParamValue = Annotated[float | list[float], BeforeValidator(_strict_param)]


def _finite_params(params: dict[str, ParamValue] | None) -> dict[str, ParamValue] | None:
    for name, value in (params or {}).items():
        for v in value if isinstance(value, list) else [value]:
            _finite(v, f"params.{name}")
        if isinstance(value, list) and not value:
            raise ValueError(f"params.{name}: an empty list; give a number or one value per neuron")
    return params


def _check_map_params(map_name: str | None, params: dict[str, ParamValue] | None, type_: str | None) -> None:
    """Parameter names and ranges of a response map (the table lives in ``bakeedit/edit/nonlinear.py``)."""
    if type_ == "nonlinear" and map_name is None:
        raise ValueError("type nonlinear needs a 'map': one of tanh_gain, sigmoid_gain, power")
    if type_ == "scale" and params:
        raise ValueError("'params' belong to a nonlinear map; a linear scale takes 'lambda'")
    if map_name is not None and params:
        for name, value in params.items():
            for v in value if isinstance(value, list) else [value]:
                check_params(map_name, {name: v})


class EditRule(BaseModel):
    """One complete edit for a neuron: what an :class:`EditSpec` resolves to after overrides are applied.

    ``type: scale`` is ``a <- lambda * a``; ``type: nonlinear`` is the response ``map`` with ``params``
    (``bakeedit/edit/nonlinear.py``). ``positions``: ``all`` positions from token index ``start`` on, or only the
    ``last`` position of each forward call (when its index is at least ``start``).
    """

    model_config = ConfigDict(frozen=True)

    type: EditType
    lambda_: float
    map: MapName | None
    params: dict[str, ParamValue]
    positions: Positions
    start: int


class EditOverride(_Strict):
    """A different edit for the neurons of some sites and/or layers; later overrides win over earlier ones.

    Fields left out are inherited from the recipe's ``edit``, except ``type``: giving a ``map`` means
    ``nonlinear``, giving only a ``lambda`` means ``scale``. ``params`` are inherited only with the same map.
    """

    sites: list[str] | None = None
    layers: list[Integer] | None = None
    type: EditType | None = None
    lambda_: Number | None = Field(default=None, alias="lambda")
    map: MapName | None = None
    params: dict[str, ParamValue] | None = None
    positions: Positions | None = None
    start: Integer | None = Field(default=None, ge=0)

    @field_validator("sites")
    @classmethod
    def _known_sites(cls, sites: list[str] | None) -> list[str] | None:
        for site in sites or []:
            if not is_site(site):
                raise ValueError(f"unknown site '{site}'; allowed: {SITE_NAMES_HINT}")
        return sites

    @field_validator("lambda_")
    @classmethod
    def _lambda_finite(cls, value: float | None) -> float | None:
        return None if value is None else _finite(value)

    @field_validator("params")
    @classmethod
    def _params_finite(cls, params: dict[str, ParamValue] | None) -> dict[str, ParamValue] | None:
        return _finite_params(params)

    @model_validator(mode="after")
    def _says_something(self) -> EditOverride:
        given = [k for k in ("type", "lambda_", "map", "params", "positions", "start") if getattr(self, k) is not None]
        if not given:
            raise ValueError("an override must set at least one of lambda, type, map, params, positions, start")
        _check_map_params(self.map, self.params, self.type)
        return self

    def matches(self, neuron: Neuron) -> bool:
        return (self.sites is None or neuron.site in self.sites) and (
            self.layers is None or neuron.layer in self.layers
        )


class FitSpec(_Strict):
    """Choose the edit's parameters on the locate split (``bakeedit/edit/fit.py``, docs/nonlinear.md).

    Every point of ``grid`` (the product of the listed values) is applied with runtime hooks; the point with the
    lowest contrast score wins among those whose capability loss (increase in mean token NLL, nats) stays within
    ``budget``. With ``require_reduction`` (the default) a winner that does not lower the contrast score below the
    unedited model's is an error, not a checkpoint.
    """

    grid: dict[str, list[Number]]
    budget: Number = Field(default=0.05, ge=0)
    data: str | None = None
    split: str = "locate"
    categories: list[str] | None = None
    max_items: Integer | None = Field(default=8, gt=0)
    require_reduction: StrictBool = True

    @field_validator("grid")
    @classmethod
    def _grid_values(cls, grid: dict[str, list[float]]) -> dict[str, list[float]]:
        if not grid:
            raise ValueError("grid: name at least one parameter and its candidate values")
        for name, values in grid.items():
            if not values:
                raise ValueError(f"grid.{name}: give at least one candidate value")
            for v in values:
                _finite(v, f"grid.{name}")
        return grid


class EditSpec(_Strict):
    """The edit of every listed neuron: a linear scaling ``a <- lambda * a`` (0 masks, > 1 enhances) by default,
    or a nonlinear response map; at all positions or only the last one. Linear all-position edits are folded into
    the weights; the rest is saved as a small custom module (docs/nonlinear.md)."""

    type: EditType = "scale"
    lambda_: Number = Field(default=2.0, alias="lambda")  # negative: the activation's sign is flipped (and scaled)
    map: MapName | None = None
    params: dict[str, ParamValue] = Field(default_factory=dict)
    positions: Positions = "all"
    start: Integer = Field(default=0, ge=0)
    overrides: list[EditOverride] = Field(default_factory=list)
    fit: FitSpec | None = None

    @field_validator("lambda_")
    @classmethod
    def _lambda_finite(cls, value: float) -> float:
        return _finite(value)

    @field_validator("params")
    @classmethod
    def _params_finite(cls, params: dict[str, ParamValue]) -> dict[str, ParamValue]:
        return _finite_params(params) or {}

    @model_validator(mode="after")
    def _map_and_params(self) -> EditSpec:
        if self.type == "scale" and self.map is not None:
            raise ValueError(f"map '{self.map}' needs type: nonlinear (type is scale)")
        _check_map_params(self.map, self.params, self.type)
        for i, override in enumerate(self.overrides):
            rule = self._merge(override)
            if rule.type == "nonlinear" and rule.map is None:
                raise ValueError(f"overrides.{i}: type nonlinear needs a 'map' (the edit has none to inherit)")
            if override.params is not None and rule.type != "nonlinear":
                raise ValueError(f"overrides.{i}: 'params' belong to a nonlinear map; give a 'map' or a 'lambda'")
            try:
                _check_map_params(rule.map, rule.params, rule.type)
            except ValueError as exc:
                raise ValueError(f"overrides.{i}: {exc}") from exc
        if self.fit is not None:
            allowed = ["lambda"] if self.type == "scale" else list(_map_param_names(self.map))
            unknown = sorted(set(self.fit.grid) - set(allowed))
            if unknown:
                raise ValueError(f"fit.grid: {', '.join(unknown)} is not a parameter of the edit "
                                 f"(allowed: {', '.join(allowed)})")
        return self

    @property
    def rule(self) -> EditRule:
        """The edit of neurons that no override matches."""
        return EditRule(type=self.type, lambda_=self.lambda_, map=self.map, params=self.params,
                        positions=self.positions, start=self.start)

    def _merge(self, override: EditOverride) -> EditRule:
        type_ = override.type or (
            "nonlinear" if override.map is not None else "scale" if override.lambda_ is not None else self.type
        )
        map_name = (override.map or self.map) if type_ == "nonlinear" else None
        inherited = self.params if map_name == self.map else {}
        params = override.params if override.params is not None else inherited
        return EditRule(
            type=type_,
            lambda_=self.lambda_ if override.lambda_ is None else override.lambda_,
            map=map_name,
            params=params if type_ == "nonlinear" else {},
            positions=override.positions or self.positions,
            start=self.start if override.start is None else override.start,
        )

    def rule_for(self, neuron: Neuron) -> tuple[int | None, EditRule]:
        """``(index of the last matching override or None, the resolved rule)``; a neuron's own lambda is applied
        by the plan builder on top (it makes the neuron a linear scale)."""
        for i in reversed(range(len(self.overrides))):
            if self.overrides[i].matches(neuron):
                return i, self._merge(self.overrides[i])
        return None, self.rule


def _map_param_names(map_name: str | None) -> tuple[str, ...]:
    return MAPS[map_name].params if map_name in MAPS else ()


class LocateSpec(BaseModel):
    """``method`` plus that method's own parameters (validated by the method's schema)."""

    model_config = ConfigDict(extra="allow")

    method: str
    #: Keep only the located neurons of layers ``first..last`` (inclusive); any method. ``bakeedit search`` tunes it.
    layer_range: tuple[Integer, Integer] | None = None
    #: How the model runs while locating: ``in_memory`` (the whole model loaded), ``blockwise`` (one decoder block
    #: at a time from the safetensors shards, for a model larger than memory: same neurons, every block read once per
    #: batch; docs/performance.md) or ``auto`` (blockwise only when the checkpoint in its run dtype does not fit in
    #: the memory available). ``in-memory`` is accepted too. Not a method parameter: it changes no result.
    execution: Literal["auto", "in_memory", "blockwise"] = "auto"

    @field_validator("execution", mode="before")
    @classmethod
    def _dash(cls, value: Any) -> Any:
        return value.replace("-", "_") if isinstance(value, str) else value

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        if value is not None and not 0 <= value[0] <= value[1]:
            raise ValueError(f"give [first, last] with 0 <= first <= last, got {list(value)}")
        return value

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class VerifySpec(_Strict):
    """How the baked checkpoint is checked against the runtime edit."""

    tolerance: Number | None = Field(default=None, gt=0)
    prompts: list[str] | None = None

    @field_validator("prompts")
    @classmethod
    def _some_prompts(cls, prompts: list[str] | None) -> list[str] | None:
        if prompts is not None and not prompts:
            raise ValueError("an empty list would verify nothing; list at least one prompt, or leave prompts out "
                             "for the default five")
        for i, prompt in enumerate(prompts or []):
            if not prompt.strip():
                raise ValueError(f"prompt {i} is empty; every probe prompt needs text")
        return prompts


#: What ``bakeedit apply`` writes: the baked checkpoint (``safetensors``, always) and, as sibling folders
#: ``<OUT>-gguf``, ``<OUT>-ia3``, ``<OUT>-lora``, the artefacts ``bakeedit export`` makes (docs/export.md).
ExportFormat = Literal["safetensors", "gguf", "ia3", "lora"]


class ExportSpec(_Strict):
    """How the checkpoint is written. A streamed bake keeps the base's shard layout; setting ``max_shard_size``
    asks for a re-sharded checkpoint, which the in-memory path writes. ``formats`` adds the GGUF and peft adapter
    artefacts beside it; ``safetensors`` must be among them: every other artefact is verified against the baked
    checkpoint (the adapters' ``merge_and_unload()`` against its tensors) and records it as its origin."""

    max_shard_size: str | None = None  # None: the base's shards when streaming, "2GB" in memory
    formats: list[ExportFormat] = Field(default_factory=lambda: ["safetensors"])

    @field_validator("max_shard_size")
    @classmethod
    def _a_size(cls, size: str | None) -> str | None:
        if size is not None:
            shard_size_bytes(size)
        return size

    @field_validator("formats", mode="before")
    @classmethod
    def _known(cls, formats: Any) -> Any:
        known = ExportFormat.__args__
        for name in formats if isinstance(formats, list) else ():
            if isinstance(name, str) and name not in known:
                raise ValueError(f"unknown format '{name}'; choose from {', '.join(known)}")
        return formats

    @field_validator("formats")
    @classmethod
    def _formats(cls, formats: list[str]) -> list[str]:
        repeated = sorted({f for f in formats if formats.count(f) > 1})
        if repeated:
            raise ValueError(f"{', '.join(repeated)} is listed twice; name each format once")
        if "safetensors" not in formats:
            raise ValueError("safetensors must be listed: the gguf and adapter artefacts are verified against the "
                             "baked checkpoint and written beside it (e.g. [safetensors, ia3])")
        return formats

    @property
    def extra_formats(self) -> list[str]:
        """The artefacts written beside the baked checkpoint, in the recipe's order."""
        return [f for f in self.formats if f != "safetensors"]


class EvaluateSpec(_Strict):
    """Evaluations run on the base model, the edited model and a random-neuron control."""

    tasks: list[str] = Field(default_factory=list)
    limit: Integer | None = Field(default=None, gt=0)
    seed: Integer = 0
    data_dir: str | None = None
    control: StrictBool = True
    #: ``kl``: the control's lambdas are scaled until it disturbs the model as much as the edit (mean KL from the
    #: base on neutral text, ``workflows/matched_control.py``); ``lambda``: the control gets the edit's own lambdas.
    control_match: Literal["kl", "lambda"] = "kl"
    #: Which part of each task's items is scored: ``all`` (lm-evaluation-harness's items), or one side of the fixed
    #: dev/test partition (docs/data.md). ``bakeedit search`` tunes on ``dev``; the recipe it writes reports ``test``.
    split: Literal["all", "dev", "test"] = "all"


class SearchParam(_Strict):
    """One searched parameter: a range (``low``/``high``, ``log``, ``step``; ``int: true`` for whole numbers) or a
    list of ``choices``."""

    low: Number | None = None
    high: Number | None = None
    log: StrictBool = False
    step: Number | None = None
    int_: StrictBool = Field(default=False, alias="int")
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _range_or_choices(self) -> SearchParam:
        if self.choices is not None:
            if not self.choices or self.low is not None or self.high is not None:
                raise ValueError("give either a non-empty 'choices' list or 'low' and 'high', not both")
        elif self.low is None or self.high is None or not self.low <= self.high:
            raise ValueError("give 'low' <= 'high' (or a 'choices' list)")
        elif self.log and self.low <= 0:
            raise ValueError("'log: true' needs low > 0")
        return self


class SearchSpec(_Strict):
    """``bakeedit search``: the parameters tried, the dev-split evaluation each trial is scored on, and the budget.

    ``space`` names ``lambda`` (the edit's), ``locate.<param>`` (the method's) or ``locate.layer_range`` (``low`` and
    ``high`` bound the first and last layer kept). Each trial's objective is the edit's bias reduction beyond a
    KL-matched random control on the ``dev`` split of ``tasks``; ``max_kl`` (nats per token on neutral text) and
    ``max_capability_drop`` (mean headline metric of ``capability_tasks``, absolute) make a trial infeasible."""

    trials: Integer = Field(default=20, gt=0)
    seed: Integer = 0
    tasks: list[str] = Field(min_length=1)
    capability_tasks: list[str] = Field(default_factory=list)
    limit: Integer | None = Field(default=100, gt=0)
    max_kl: Number | None = Field(default=None, gt=0)
    max_capability_drop: Number | None = Field(default=None, ge=0)
    space: dict[str, SearchParam] = Field(default_factory=dict)

    @field_validator("space")
    @classmethod
    def _known_names(cls, space: dict[str, SearchParam]) -> dict[str, SearchParam]:
        for name in space:
            if name != "lambda" and not (name.startswith("locate.") and len(name) > len("locate.")):
                raise ValueError(f"search.space: unknown parameter {name!r}: use 'lambda', 'locate.<param>' or "
                                 "'locate.layer_range'")
        return space


class Recipe(_Strict):
    name: str
    description: str = ""
    model: ModelSpec
    neurons: list[Neuron] | None = None
    neurons_file: str | None = None
    #: Use a ``neurons_file`` located on another model (its ``model_id``/revision differ): refused unless set.
    allow_foreign_neurons: StrictBool = False
    locate: LocateSpec | None = None
    edit: EditSpec = Field(default_factory=EditSpec)
    verify: VerifySpec = Field(default_factory=VerifySpec)
    export: ExportSpec = Field(default_factory=ExportSpec)
    evaluate: EvaluateSpec | None = None
    search: SearchSpec | None = None

    @field_validator("model", mode="before")
    @classmethod
    def _model_shorthand(cls, value: Any) -> Any:
        return {"id": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_neuron_source(self) -> Recipe:
        given = [k for k in ("neurons", "neurons_file", "locate") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of 'neurons' (a list), 'neurons_file' (a neurons.json) or 'locate' (a method); "
                f"got {', '.join(given) if given else 'none'}"
            )
        return self
