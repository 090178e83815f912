"""The registry of locate methods and the one entry point that validates a recipe's ``locate:`` block."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from bakeedit.errors import RecipeError
from bakeedit.models.load import LoadedModel
from bakeedit.neurons import NeuronSet, format_validation_error
from bakeedit.recipe import LocateSpec

#: Modules imported on first use, each registering its method(s).
_METHOD_MODULES = ("bakeedit.locate.random", "bakeedit.locate.coco.method", "bakeedit.locate.knowbias.method",
                  "bakeedit.locate.ine.method")


@dataclass
class LocateContext:
    """What a method gets besides its parameters: where to cache partial results, how to report progress."""

    cache_dir: Path | None = None
    progress: Any | None = None  # a rich Progress, or None for silence
    base_dir: Path = field(default_factory=Path.cwd)  # relative paths in params resolve against this


@dataclass(frozen=True)
class LocateMethod:
    name: str
    params: type[BaseModel]
    run: Callable[[LoadedModel, Any, LocateContext], NeuronSet]
    summary: str


_REGISTRY: dict[str, LocateMethod] = {}


def register(name: str, params: type[BaseModel], summary: str):
    """Decorator: ``@register("knowbias", KnowBiasParams, "...")`` on ``run(loaded, params, ctx)``."""

    def deco(fn: Callable[[LoadedModel, Any, LocateContext], NeuronSet]):
        _REGISTRY[name] = LocateMethod(name=name, params=params, run=fn, summary=summary)
        return fn

    return deco


def _load_all() -> None:
    for module in _METHOD_MODULES:
        importlib.import_module(module)


def available_methods() -> dict[str, LocateMethod]:
    _load_all()
    return dict(sorted(_REGISTRY.items()))


def get_method(name: str) -> LocateMethod:
    methods = available_methods()
    if name not in methods:
        raise RecipeError(
            f"locate.method: unknown method '{name}'", hint="available: " + ", ".join(methods)
        )
    return methods[name]


def validate_params(spec: LocateSpec, source: str = "recipe") -> tuple[LocateMethod, BaseModel]:
    method = get_method(spec.method)
    try:
        params = method.params.model_validate(spec.params)
    except ValidationError as exc:
        raise RecipeError(f"{source}: {format_validation_error(exc, prefix='locate')}") from exc
    return method, params


def run_locate(spec: LocateSpec, loaded: LoadedModel, ctx: LocateContext, source: str = "recipe") -> NeuronSet:
    """Validate the parameters, run the method, and stamp the result with the model it was found on."""
    method, params = validate_params(spec, source)
    neuron_set = method.run(loaded, params, ctx)
    neuron_set.method = method.name
    neuron_set.params = params.model_dump(mode="json", by_alias=True)
    if spec.layer_range is not None:
        first, last = spec.layer_range
        kept = [n for n in neuron_set.neurons if first <= n.layer <= last]
        if not kept:
            raise RecipeError(f"{source}: locate.layer_range [{first}, {last}] keeps none of the "
                              f"{len(neuron_set.neurons)} located neurons",
                              hint="widen the range, or drop it to keep every layer")
        neuron_set.neurons = kept
        neuron_set.params["layer_range"] = [first, last]
    neuron_set.model_id = loaded.source.base_model or loaded.source.ref
    neuron_set.model_revision = loaded.source.revision
    return neuron_set
