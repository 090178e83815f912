"""Reading a recipe file: size limit, ``yaml.safe_load``, the schema, and relative paths resolved.

Recipes are data, read with ``yaml.safe_load`` and validated by the schema (``recipe/schema.py``); an error names
the file, the field and what is allowed. :func:`load_recipe` resolves every relative path against the recipe's
folder (what ``recipes/README.md`` promises, whatever the working directory), checks that the files it names
exist, and refuses a file over :data:`MAX_RECIPE_BYTES` before parsing it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    ValidationError,
)

from bakeedit.errors import RecipeError
from bakeedit.models.embedded import EMBEDDED_ALIASES
from bakeedit.models.load import local_layout
from bakeedit.models.reference import HUB_ID
from bakeedit.neurons import check_neuron_count, format_validation_error
from bakeedit.recipe.schema import Recipe

#: A recipe is a page of YAML; a bigger file is a mistake (a data file passed as the recipe, a pasted dump).
MAX_RECIPE_BYTES = 1_000_000


class LoadedRecipe(BaseModel):
    """A validated recipe with where it came from (for relative paths and provenance)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    recipe: Recipe
    path: Path
    text: str
    sha256: str

    def resolve(self, relative: str) -> Path:
        """A path written in the recipe, relative to the recipe's folder."""
        p = Path(relative).expanduser()
        return p if p.is_absolute() else (self.path.parent / p)


def parse_recipe(raw: Any, source: str) -> Recipe:
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: a recipe must be a YAML mapping, got {type(raw).__name__}")
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(
            f"{source}: {format_validation_error(exc)}", hint="the schema is documented in recipes/README.md"
        ) from exc


def _read_text(path: Path) -> str:
    """The recipe's text, reading at most :data:`MAX_RECIPE_BYTES` + 1 bytes: a huge file (or a device such as
    ``/dev/zero``) is refused before it is read into memory or parsed."""
    try:
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise _too_big(path, size)
        with open(path, "rb") as fh:
            data = fh.read(MAX_RECIPE_BYTES + 1)
    except FileNotFoundError as exc:
        raise RecipeError(f"{path}: no such recipe file") from exc
    except IsADirectoryError as exc:
        raise RecipeError(f"{path}: not a readable YAML text file") from exc
    if len(data) > MAX_RECIPE_BYTES:
        raise _too_big(path, None)
    try:
        return data.decode()
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not a readable YAML text file") from exc


def _too_big(path: Path, size: int | None) -> RecipeError:
    what = f"{size:,} bytes" if size is not None else "more than that"
    return RecipeError(
        f"{path}: a recipe is at most {MAX_RECIPE_BYTES:,} bytes (1 MB); this file has {what}",
        hint="is this the recipe? list many neurons in a neurons_file (JSON) instead of the recipe",
    )


def _resolve_ref(value: str, folder: Path, hub_ok: bool) -> tuple[str, bool]:
    """``(the path it names, whether it exists)``: absolute as written, else relative to ``folder`` (the recipe's);
    or, if ``hub_ok`` and nothing of that name is beside the recipe, ``value`` itself (an ``org/name`` Hub id)."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path), path.exists()
    beside = os.path.normpath(folder / path)  # lexically: "../models/base" reads as the folder it names
    if os.path.exists(beside):
        return beside, True
    if hub_ok and HUB_ID.match(value):
        return value, False
    return beside, False


def _from_here(value: str, resolved: str) -> str:
    """What a consumer that opens paths from the working directory must be given: ``resolved`` relative to it.

    Not the absolute path, on purpose: ``bakeedit.json`` records the model reference and the recipe's data, and a
    published file must not hold the machine's paths; relative to the working directory, ``bakeedit verify`` run
    where ``apply`` ran finds the same base. A path written absolute stays as written."""
    if Path(value).expanduser().is_absolute():
        return value
    try:
        return os.path.relpath(resolved)
    except (OSError, ValueError):  # no working directory any more, or another drive: the absolute path works
        return resolved


def _resolve_model(recipe: Recipe, folder: Path, source: str) -> None:
    """``model.id`` against the recipe's folder: an existing path wins, ``org/name`` is a Hub id, anything else is
    an error now (before a model loads) that says where it was looked for."""
    spec, ref = recipe.model, recipe.model.id
    if ref in EMBEDDED_ALIASES:
        return
    resolved, exists = _resolve_ref(ref, folder, hub_ok=not ref.endswith(".gguf"))
    if resolved == ref and not exists and not Path(ref).expanduser().is_absolute():
        spec._hub_only = True  # an org/name with no such path beside the recipe: the cwd is never consulted
        return
    if not exists:
        kind = "GGUF file" if resolved.endswith(".gguf") else "model folder"
        raise RecipeError(
            f"{source}: model.id: unknown model '{ref}': no {kind} '{resolved}' (relative paths are relative to the "
            "recipe's folder), and it is neither the embedded default nor a Hub id 'org/name'",
            hint="use 'embedded', a path (relative to the recipe), a .gguf file or a Hub id 'org/name'",
        )
    spec.id = _from_here(ref, resolved)


def _resolve_paths(recipe: Recipe, folder: Path, source: str) -> None:
    """Every relative path of the recipe means the file beside the recipe, from any working directory.

    ``model.id`` and ``evaluate.data_dir``, which the loader and the evaluation open as given, are rewritten to the
    same file relative to the working directory (:func:`_from_here`); ``neurons_file`` and ``edit.fit.data`` stay as
    written, since their readers resolve them with :meth:`LoadedRecipe.resolve`; files that must exist are checked
    now. Locate methods resolve their own path parameters against the recipe's folder."""
    _resolve_model(recipe, folder, source)
    if recipe.neurons_file is not None:
        path, exists = _resolve_ref(recipe.neurons_file, folder, hub_ok=False)
        if not exists:
            raise RecipeError(f"{source}: neurons_file: no such file '{path}' (relative paths are relative to the "
                              "recipe's folder)", hint="write it with bakeedit locate -o FILE")
    fit = recipe.edit.fit
    if fit is not None and fit.data is not None:
        path, exists = _resolve_ref(fit.data, folder, hub_ok=False)
        if not exists:
            raise RecipeError(f"{source}: edit.fit.data: no such file '{path}' (relative paths are relative "
                              "to the recipe's folder)")
    evaluate = recipe.evaluate
    if evaluate is not None and evaluate.data_dir is not None:
        # a missing folder is reported by the task that needs it (it may also be a dataset id, or unused: --no-eval)
        path, exists = _resolve_ref(evaluate.data_dir, folder, hub_ok=True)
        if path != evaluate.data_dir or exists:
            evaluate.data_dir = _from_here(evaluate.data_dir, path)


def _check_neuron_count(recipe: Recipe, source: str) -> None:
    """An explicit list longer than the model has neurons, refused before the model loads when its folder is
    local (the count comes from config.json); otherwise ``resolve_neurons`` checks right after loading."""
    if recipe.neurons is None or recipe.model.hub_only or recipe.model.id in EMBEDDED_ALIASES:
        return
    layout = local_layout(Path(recipe.model.id), recipe.model.arch)
    if layout is not None:
        check_neuron_count(len(recipe.neurons), layout, f"{source}: neurons", f"'{recipe.model.id}'")


def load_recipe(path: str | Path) -> LoadedRecipe:
    """Read and validate a recipe file; every failure is a :class:`RecipeError` naming the file.

    Relative paths mean the files beside the recipe (see :func:`_resolve_paths`; ``text`` keeps the file as
    written), and a local model folder's ``config.json`` is read, so a malformed one or a neuron list longer than
    the model fails here, before any weights load.
    """
    path = Path(path)
    text = _read_text(path)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise RecipeError(f"{path}: malformed YAML{at}: {problem}") from exc
    recipe = parse_recipe(raw, str(path))
    resolved = path.resolve()
    _resolve_paths(recipe, resolved.parent, str(path))
    _check_neuron_count(recipe, str(path))
    return LoadedRecipe(
        recipe=recipe, path=resolved, text=text, sha256=hashlib.sha256(text.encode()).hexdigest()
    )
