"""``NeuronSet``: the contract between locating and editing.

A list of ``(layer, site, index, score)`` plus the method that found them, its parameters and the model they were
found on, saved as JSON. Any locate method can feed any edit; a neuron may carry its own ``lambda`` to override the
recipe's.

Numbers are strict: YAML and JSON turn ``true`` and ``"2"`` into a bool and a string, and pydantic's lax mode would
quietly turn those into ``1.0`` and ``2.0``; a neuron or an edit written that way is almost always a typo, so
:data:`Number` and :data:`Integer` refuse them with a message that says what was found.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from bakeedit import __version__
from bakeedit.errors import NeuronSetError
from bakeedit.models.arch import ModelLayout
from bakeedit.models.spec import SITE_NAMES_HINT, is_site

FORMAT_VERSION = 1


def _described(value: Any) -> str:
    """How a wrong-typed value reads in an error: YAML's spelling, so the user finds it in the file."""
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return f"the string {value!r}"
        if "e" in value.lower() and "." not in value:  # YAML 1.1 reads 1e-4 (no dot) as text
            return f"the string {value!r} (YAML reads an exponent without a dot as text: write e.g. 1.0e-4)"
        return f"the string {value!r} (remove the quotes)"
    return f"{type(value).__name__} {value!r}"


def strict_number(value: Any) -> Any:
    """Before-validator of a real number: ints and floats pass, a bool or a string is a mistake, not a number."""
    if isinstance(value, (bool, str)):
        raise ValueError(f"expected a number, got {_described(value)}")
    return value


def strict_integer(value: Any) -> Any:
    """Before-validator of a whole number: a bool, a string or a float (``2.0``, ``2.5``) is refused."""
    if isinstance(value, (bool, str, float)):
        raise ValueError(f"expected a whole number, got {_described(value)}")
    return value


#: A real number as a recipe or a neuron file may write it (``2``, ``2.0``, ``-1``), never ``true`` or ``"2"``.
Number = Annotated[float, BeforeValidator(strict_number)]
#: A whole number (layer, index, start, limit...), never ``true``, ``"3"`` or ``3.0``.
Integer = Annotated[int, BeforeValidator(strict_integer)]


class Neuron(BaseModel):
    """One neuron: channel ``index`` of ``site`` in block ``layer``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    layer: Integer = Field(ge=0)
    site: str
    index: Integer = Field(ge=0)
    score: Number | None = None
    lambda_: Number | None = Field(default=None, alias="lambda")  # negative: the activation's sign is flipped

    @field_validator("site")
    @classmethod
    def _known_site(cls, site: str) -> str:
        if not is_site(site):
            raise ValueError(f"unknown site '{site}'; allowed: {SITE_NAMES_HINT}")
        return site

    @field_validator("lambda_")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError(f"lambda must be a finite number (got {value})")
        return value

    @property
    def address(self) -> tuple[int, str, int]:
        return (self.layer, self.site, self.index)


class NeuronSet(BaseModel):
    """Neurons found by one method on one model, with everything needed to reproduce the finding."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    method: str
    params: dict[str, Any] = Field(default_factory=dict)
    model_id: str | None = None
    model_revision: str | None = None
    created_with: str = f"bakeedit {__version__}"
    neurons: list[Neuron]

    def histogram(self) -> Counter[tuple[int, str]]:
        """Count of neurons per ``(layer, site)``."""
        return Counter((n.layer, n.site) for n in self.neurons)

    def save(self, path: Path) -> None:
        """Write the JSON; a buffered write's OSError (a full disk shows up at flush) names no file: name it."""
        try:
            Path(path).write_text(self.model_dump_json(indent=1, by_alias=True) + "\n")
        except OSError as exc:
            if exc.filename is not None or exc.errno is None:
                raise
            raise OSError(exc.errno, exc.strerror, str(path)) from exc

    @classmethod
    def load(cls, path: Path) -> NeuronSet:
        try:
            raw = json.loads(Path(path).read_text())
        except FileNotFoundError as exc:
            raise NeuronSetError(f"{path}: no such neuron file") from exc
        except json.JSONDecodeError as exc:
            raise NeuronSetError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
        except (IsADirectoryError, UnicodeDecodeError) as exc:
            raise NeuronSetError(f"{path}: not a readable JSON text file",
                                 hint="a neurons file is the neurons.json written by bakeedit locate or apply") from exc
        return cls.parse(raw, source=str(path))

    @classmethod
    def parse(cls, raw: Any, source: str) -> NeuronSet:
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise NeuronSetError(f"{source}: {format_validation_error(exc)}") from exc


def format_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """The first pydantic error as ``field.path: message``, the form every bakeedit error uses."""
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in (*([prefix] if prefix else []), *first["loc"]))
    message = first["msg"].removeprefix("Value error, ")
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"{loc}: {message}{more}" if loc else f"{message}{more}"


def neuron_capacity(layout: ModelLayout) -> int:
    """How many distinct neurons the model has: every channel of every site in every layer."""
    return layout.n_layers * sum(layout.site_size(site) for site in layout.sites)


def check_neuron_count(count: int, layout: ModelLayout, where: str, model: str) -> None:
    """Refuse a list longer than the model has neurons: it cannot be a real selection (a paste gone wrong, a file
    meant for a larger model), and reporting it now is cheaper than validating each of its entries."""
    capacity = neuron_capacity(layout)
    if count > capacity:
        raise NeuronSetError(
            f"{where}: {count} neuron entries, but {model} has only {capacity} neurons "
            f"({layout.n_layers} layers x {capacity // max(1, layout.n_layers)} channels of its sites)",
            hint="is this list meant for another (larger) model?",
        )


def _as_path(ref: str, base: Path | None) -> list[Path]:
    """The folders a recorded local model reference may have meant (absolute, or relative to cwd / the file)."""
    path = Path(ref).expanduser()
    if path.is_absolute():
        return [path.resolve()]
    return [p.resolve() for p in (path, *([base / path] if base is not None else []))]


def same_model(recorded: str, current: str, base: Path | None = None) -> bool:
    """Whether a NeuronSet's ``model_id`` names the model now loaded: the same Hub id, or the same folder or file
    however the path was spelt (``base`` is the folder a relative recorded path is also tried against)."""
    if recorded == current:
        return True
    here = Path(current).expanduser()
    if not here.exists():
        return False  # a Hub id (or the embedded model's): only an equal string is the same model
    return here.resolve() in _as_path(recorded, base)


def check_origin(neuron_set: NeuronSet, model_id: str, revision: str | None, where: str) -> None:
    """Refuse neurons located on another model: indices of one model mean nothing in another's weights, and a same
    architecture makes the mistake silent (the edit applies, to the wrong channels). Unknown origins pass."""
    if neuron_set.model_id is None:
        return
    base = Path(where).parent if where else None
    same = same_model(neuron_set.model_id, model_id, base)
    if same and (neuron_set.model_revision is None or revision is None or neuron_set.model_revision == revision):
        return

    def named(ref: str, rev: str | None) -> str:
        return f"'{ref}'" + (f" (revision {rev})" if rev else "")

    raise NeuronSetError(
        f"{where}: these neurons were located on {named(neuron_set.model_id, neuron_set.model_revision)}, but the "
        f"recipe's model is {named(model_id, revision)}",
        hint="locate them on this model (bakeedit locate), or set 'allow_foreign_neurons: true' in the recipe if you "
        "mean to transfer them",
    )
