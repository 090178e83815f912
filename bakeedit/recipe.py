"""Recipes: the YAML file that names a model, where its neurons come from, the edit and the evaluations.

Recipes are data, read with ``yaml.safe_load`` and validated by the pydantic schema below; an error names the
file, the field and what is allowed. The schema is documented in ``recipes/README.md``.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bakeedit.errors import RecipeError
from bakeedit.models.arch import SITES
from bakeedit.neurons import Neuron, format_validation_error

DType = Literal["auto", "float32", "bfloat16", "float16"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ModelSpec(_Strict):
    """Which model to load and how. ``id`` is a Hub id, a local folder, a ``.gguf`` file or ``embedded``."""

    id: str
    revision: str | None = None
    dtype: DType = "auto"
    device: str = "auto"
    device_map: str | None = None
    trust_remote_code: bool = False


def _finite(value: float, what: str = "lambda") -> float:
    if not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number (got {value})")
    return value


class LambdaOverride(_Strict):
    """A lambda for the neurons of some sites and/or layers; later overrides win over earlier ones."""

    sites: list[str] | None = None
    layers: list[int] | None = None
    lambda_: float = Field(alias="lambda")

    @field_validator("sites")
    @classmethod
    def _known_sites(cls, sites: list[str] | None) -> list[str] | None:
        for site in sites or []:
            if site not in SITES:
                raise ValueError(f"unknown site '{site}'; allowed: {', '.join(SITES)}")
        return sites

    @field_validator("lambda_")
    @classmethod
    def _lambda_finite(cls, value: float) -> float:
        return _finite(value)

    def matches(self, neuron: Neuron) -> bool:
        return (self.sites is None or neuron.site in self.sites) and (
            self.layers is None or neuron.layer in self.layers
        )


class EditSpec(_Strict):
    """A linear scaling ``a <- lambda * a`` of every listed neuron (0 masks, > 1 enhances)."""

    type: Literal["scale"] = "scale"
    lambda_: float = Field(default=2.0, alias="lambda")
    overrides: list[LambdaOverride] = Field(default_factory=list)

    @field_validator("lambda_")
    @classmethod
    def _lambda_finite(cls, value: float) -> float:
        return _finite(value)

    def lambda_for(self, neuron: Neuron) -> float:
        """The neuron's own lambda, else the last matching override, else the recipe's lambda."""
        if neuron.lambda_ is not None:
            return neuron.lambda_
        for override in reversed(self.overrides):
            if override.matches(neuron):
                return override.lambda_
        return self.lambda_


class LocateSpec(BaseModel):
    """``method`` plus that method's own parameters (validated by the method's schema)."""

    model_config = ConfigDict(extra="allow")

    method: str

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class VerifySpec(_Strict):
    """How the baked checkpoint is checked against the runtime edit."""

    tolerance: float | None = Field(default=None, gt=0)
    prompts: list[str] | None = None


class ExportSpec(_Strict):
    max_shard_size: str = "2GB"


class EvaluateSpec(_Strict):
    """Evaluations run on the base model, the edited model and a random-neuron control."""

    tasks: list[str] = Field(default_factory=list)
    limit: int | None = Field(default=None, gt=0)
    seed: int = 0
    data_dir: str | None = None
    control: bool = True


class Recipe(_Strict):
    name: str
    description: str = ""
    model: ModelSpec
    neurons: list[Neuron] | None = None
    neurons_file: str | None = None
    locate: LocateSpec | None = None
    edit: EditSpec = Field(default_factory=EditSpec)
    verify: VerifySpec = Field(default_factory=VerifySpec)
    export: ExportSpec = Field(default_factory=ExportSpec)
    evaluate: EvaluateSpec | None = None

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


def load_recipe(path: str | Path) -> LoadedRecipe:
    """Read and validate a recipe file; every failure is a :class:`RecipeError` naming the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError as exc:
        raise RecipeError(f"{path}: no such recipe file") from exc
    except (IsADirectoryError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: not a readable YAML text file") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise RecipeError(f"{path}: malformed YAML{at}: {problem}") from exc
    recipe = parse_recipe(raw, str(path))
    return LoadedRecipe(
        recipe=recipe, path=path.resolve(), text=text, sha256=hashlib.sha256(text.encode()).hexdigest()
    )
