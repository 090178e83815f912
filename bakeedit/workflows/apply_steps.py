"""The pieces both paths of ``bakeedit apply`` share: the full-model path (``workflows/apply.py``) and the
low-memory one (``workflows/apply_low_memory.py``) read the same neurons, time and report their steps the same way
and record the recipe and the neurons alike, so the two write the same folder; each imports them from here rather
than from the other.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bakeedit.errors import RecipeError
from bakeedit.export.provenance import Provenance, portable_neuron_set
from bakeedit.export.verify import VerificationResult
from bakeedit.locate import LocateContext, run_locate
from bakeedit.models.embedded import cache_root
from bakeedit.models.load import LoadedModel
from bakeedit.neurons import NeuronSet, check_neuron_count, check_origin
from bakeedit.recipe import LoadedRecipe, parse_recipe
from bakeedit.workflows.export import ExportResult

NEURONS_FILE = "neurons.json"
DEFAULT_MAX_SHARD_SIZE = "2GB"
RECIPE_FILE = "recipe.yaml"

Reporter = Callable[[str], None]
Bars = Callable[[str, int, int], None]


@dataclass
class ApplyResult:
    out: Path
    provenance: Provenance
    timings_s: dict[str, float] = field(default_factory=dict)
    exports: list[ExportResult] = field(default_factory=list)  # export.formats: the artefacts beside ``out``


@contextmanager
def timed(timings: dict[str, float], step: str, report: Reporter) -> Iterator[None]:
    report(step)
    start = time.perf_counter()
    yield
    timings[step] = round(time.perf_counter() - start, 3)


def resolve_neurons(lr: LoadedRecipe, loaded: LoadedModel, progress=None) -> NeuronSet:
    """The recipe's neurons: an explicit list, a neurons.json, or the result of its ``locate:`` method.

    A list longer than the model has neurons is refused right after loading (when the model's config.json was not
    local, ``load_recipe`` could not check it before); a neurons.json located on another model is refused unless
    the recipe sets ``allow_foreign_neurons: true``.
    """
    recipe = lr.recipe
    model_id, revision = loaded.source.base_model or loaded.source.ref, loaded.source.revision
    if recipe.neurons is not None:
        check_neuron_count(len(recipe.neurons), loaded.layout, f"{lr.path}: neurons", f"'{model_id}'")
        return NeuronSet(
            method="explicit",
            params={"recipe": lr.path.name},  # a name, not a local path: the card is public
            model_id=model_id,
            model_revision=revision,
            neurons=recipe.neurons,
        )
    if recipe.neurons_file is not None:
        path = lr.resolve(recipe.neurons_file)
        if not path.is_file():
            raise RecipeError(f"{lr.path}: neurons_file: no such file '{path}'")
        neuron_set = NeuronSet.load(path)
        check_neuron_count(len(neuron_set.neurons), loaded.layout, str(path), f"'{model_id}'")
        if not recipe.allow_foreign_neurons:
            check_origin(neuron_set, model_id, revision, str(path))
        return neuron_set
    assert recipe.locate is not None
    ctx = LocateContext(cache_dir=cache_root() / "locate", progress=progress, base_dir=lr.path.parent)
    return run_locate(recipe.locate, loaded, ctx, source=str(lr.path))


#: Recipe fields ``load_recipe`` makes absolute; ``bakeedit.json`` records them as the recipe file spells them.
_RECIPE_PATHS = (("model", "id"), ("neurons_file",), ("edit", "fit", "data"), ("evaluate", "data_dir"))


def recipe_record(lr: LoadedRecipe) -> dict:
    """The recipe as run (with ``--eval-limit``), its paths as written in the file (relative to the recipe),
    not as resolved on this machine: the record is published, and its edit must equal the text's."""
    import yaml


    data = lr.recipe.model_dump(mode="json", by_alias=True, exclude_none=True)
    written = parse_recipe(yaml.safe_load(lr.text), lr.path.name).model_dump(mode="json", by_alias=True,
                                                                             exclude_none=True)
    for keys in _RECIPE_PATHS:
        source, target = written, data
        for key in keys[:-1]:
            source, target = source.get(key) or {}, target.get(key)
            if not isinstance(target, dict):
                break
        else:
            if keys[-1] in source:
                target[keys[-1]] = source[keys[-1]]
    return data


def portable_neurons(neuron_set: NeuronSet, loaded: LoadedModel, out: Path) -> NeuronSet:
    return portable_neuron_set(neuron_set, loaded.source.ref, loaded.source.kind, out)


def verification_line(result: VerificationResult) -> str:
    """One line for the apply output: both legs, with the numbers the power rule compared."""
    effect = "not measured" if result.edit_effect is None else f"{result.edit_effect:.3g}"
    exact = f"{result.exact} ({result.exact_tensors_compared} tensors)" if result.exact != "not run" else (
        f"not run: {result.exact_note}")
    return (f"verification {'passed' if result.passed else 'FAILED'}: max |delta logit| "
            f"{result.max_abs_logit_delta:.3g} (tolerance {result.tolerance:.3g}, {result.dtype}), edit effect "
            f"{effect} (power rule {result.power}), exact leg {exact}" +
            "".join(f"; {note}" for note in result.notes))


def release_model(loaded: LoadedModel) -> None:
    """Drop ``loaded``'s model (tokenizer, layout, source and dtype stay) and collect it, before another model is
    loaded: apply holds one model at a time, whatever its size."""
    loaded.model = None  # type: ignore[assignment]
    gc.collect()
