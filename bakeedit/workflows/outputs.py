"""The folders an ``apply`` or ``sweep`` reads, which its ``-o`` must never replace (``io/ownership.py``)."""

from __future__ import annotations

from pathlib import Path

from bakeedit.io.ownership import Protected
from bakeedit.models.embedded import EMBEDDED_ALIASES, cache_root
from bakeedit.recipe import LoadedRecipe


def protected_for_recipe(lr: LoadedRecipe) -> list[Protected]:
    """The folders an ``apply``/``sweep`` of ``lr`` reads from: the recipe's, the neurons file's, the base model's,
    and bakeedit's cache (the embedded model's converted weights, locate caches, Hub downloads live there).

    A relative model path is protected as resolved against the current directory (where it is loaded from) and
    against the recipe's folder (where ``verify`` looks for it). The recipe's and the neurons file's folders refuse
    only themselves and the folders above them: a new output beside the recipe is the usual case."""
    protected = [Protected("the recipe's folder", lr.path.parent, inside=False),
                 Protected("bakeedit's cache ($BAKEEDIT_CACHE)", cache_root())]
    if lr.recipe.neurons_file is not None:
        protected.append(Protected("the neurons_file's folder", lr.resolve(lr.recipe.neurons_file).parent,
                                   inside=False))
    model = lr.recipe.model.id
    if model and model not in EMBEDDED_ALIASES:
        ref = Path(model).expanduser()
        for candidate in [ref] if ref.is_absolute() else [Path.cwd() / ref, lr.path.parent / ref]:
            if candidate.suffix == ".gguf":
                protected.append(Protected("the folder of the model's .gguf file", candidate.parent, inside=False))
            elif candidate.is_dir():
                protected.append(Protected("the base model's folder", candidate))
    return protected
