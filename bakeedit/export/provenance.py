"""``bakeedit.json``: the evidence that ships with every edited checkpoint.

It holds the recipe (text and validated data), the neuron set, the edit plan, the base model's id, revision and
input hashes, the sha256 of every weight/config/code file written, the bakeedit version and the verification result;
for an edit saved as a custom module, the module's file, hash and size (``custom_module``), and the parameter fit.
``bakeedit verify`` and ``bakeedit push`` re-check the file hashes against it.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from bakeedit import __version__
from bakeedit.edit.plan import EditPlan
from bakeedit.errors import BakeeditError
from bakeedit.export.verify import VerificationResult
from bakeedit.models.embedded import file_sha256
from bakeedit.neurons import NeuronSet

PROVENANCE_FILE = "bakeedit.json"
HASHED_SUFFIXES = (".safetensors", ".json", ".py")
UNHASHED = {PROVENANCE_FILE}


class BaseModelInfo(BaseModel):
    ref: str
    kind: str
    hub_id: str | None = None
    revision: str | None = None
    license: str | None = None
    input_sha256: dict[str, str] = Field(default_factory=dict)


class RecipeInfo(BaseModel):
    path: str
    sha256: str
    text: str
    data: dict[str, Any]


class CustomModuleInfo(BaseModel):
    """The code a custom-module checkpoint asks its users to trust (``export/custom_module.py``)."""

    module_file: str
    module_sha256: str
    module_lines: int
    edit_file: str
    edit_sha256: str
    model_type: str
    base_model_type: str
    base_class: str
    n_groups: int


class Provenance(BaseModel):
    format_version: int = 1
    bakeedit_version: str = __version__
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    recipe: RecipeInfo
    base_model: BaseModelInfo
    neurons: NeuronSet
    plan: EditPlan
    edit_form: str = "folded"  # folded | custom_module | mixed
    folded_tensors: list[str] = Field(default_factory=list)
    baked_by: str = "in-memory"  # in-memory (fold the loaded model, save_pretrained) | stream (edit/stream.py)
    custom_module: CustomModuleInfo | None = None
    fit: dict[str, Any] | None = None
    dtype: str
    verification: VerificationResult
    files_sha256: dict[str, str] = Field(default_factory=dict)
    timings_s: dict[str, float] = Field(default_factory=dict)
    evaluation: dict[str, Any] | None = None


def hash_written_files(folder: Path) -> dict[str, str]:
    """sha256 of every weight shard and JSON config written in ``folder`` (recursively, relative names)."""
    return {
        str(p.relative_to(folder)): file_sha256(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.suffix in HASHED_SUFFIXES and p.name not in UNHASHED and "eval" not in p.parts
    }


def write_provenance(folder: Path, provenance: Provenance) -> Path:
    path = folder / PROVENANCE_FILE
    path.write_text(provenance.model_dump_json(indent=1, by_alias=True) + "\n")
    return path


def read_provenance(folder: Path) -> Provenance:
    path = Path(folder) / PROVENANCE_FILE
    if not path.exists():
        raise BakeeditError(
            f"{folder}: no {PROVENANCE_FILE}; not a folder written by bakeedit apply",
            hint="point at the -o folder of a bakeedit apply run",
        )
    try:
        return Provenance.model_validate(json.loads(path.read_text()))
    except (json.JSONDecodeError, ValueError) as exc:
        raise BakeeditError(f"{path}: unreadable provenance ({str(exc).splitlines()[0]})") from exc


def check_file_hashes(folder: Path, provenance: Provenance) -> list[str]:
    """Names of recorded files that are missing or whose sha256 changed (empty = all match)."""
    bad = []
    for name, digest in provenance.files_sha256.items():
        path = Path(folder) / name
        if not path.is_file() or file_sha256(path) != digest:
            bad.append(name)
    return bad
