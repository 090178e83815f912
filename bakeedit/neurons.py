"""``NeuronSet``: the contract between locating and editing.

A list of ``(layer, site, index, score)`` plus the method that found them, its parameters and the model they were
found on, saved as JSON. Any locate method can feed any edit; a neuron may carry its own ``lambda`` to override the
recipe's.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from bakeedit import __version__
from bakeedit.errors import NeuronSetError
from bakeedit.models.arch import SITES

FORMAT_VERSION = 1


class Neuron(BaseModel):
    """One neuron: channel ``index`` of ``site`` in block ``layer``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    layer: int = Field(ge=0)
    site: str
    index: int = Field(ge=0)
    score: float | None = None
    lambda_: float | None = Field(default=None, alias="lambda")

    @field_validator("site")
    @classmethod
    def _known_site(cls, site: str) -> str:
        if site not in SITES:
            raise ValueError(f"unknown site '{site}'; allowed: {', '.join(SITES)}")
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
        path.write_text(self.model_dump_json(indent=1, by_alias=True) + "\n")

    @classmethod
    def load(cls, path: Path) -> NeuronSet:
        try:
            raw = json.loads(Path(path).read_text())
        except FileNotFoundError as exc:
            raise NeuronSetError(f"{path}: no such neuron file") from exc
        except json.JSONDecodeError as exc:
            raise NeuronSetError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
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
