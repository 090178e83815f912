"""Recipes: the YAML file that names a model, where its neurons come from, the edit and the evaluations.
The schema is ``schema``, reading a file ``loading``; the names users need are re-exported here."""

from bakeedit.recipe.loading import MAX_RECIPE_BYTES, LoadedRecipe, load_recipe, parse_recipe
from bakeedit.recipe.schema import (
    EditOverride,
    EditRule,
    EditSpec,
    EvaluateSpec,
    ExportSpec,
    FitSpec,
    LocateSpec,
    Recipe,
    SearchParam,
    SearchSpec,
    VerifySpec,
    shard_size_bytes,
)

__all__ = ["MAX_RECIPE_BYTES", "EditOverride", "EditRule", "EditSpec", "EvaluateSpec", "ExportSpec", "FitSpec",
           "LoadedRecipe", "LocateSpec", "Recipe", "SearchParam", "SearchSpec", "VerifySpec",
           "load_recipe", "parse_recipe", "shard_size_bytes"]
