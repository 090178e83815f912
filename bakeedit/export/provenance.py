"""``bakeedit.json``: the evidence that ships with every edited checkpoint, and the manifest of its folder.

It holds the recipe (text and validated data), the neuron set, the edit plan, the base model's id, revision and
input hashes, the bakeedit version and the verification result; for an edit saved as a custom module, the module's
file, hash and size (``custom_module``), and the parameter fit. Since format 2 it is also the folder's manifest:

* ``files_sha256`` lists **every** file of the folder (weights, config, tokenizer, chat template, card, heat map,
  ``eval/``, custom module, ``neurons.json``, ``recipe.yaml``), except ``bakeedit.json`` itself and hidden entries
  (``.*``, never uploaded: temporaries of an interrupted write, ``.cache``). A file missing, changed or not listed
  means the folder is not what was verified, and ``verify``, ``card`` and ``push`` refuse it, naming the file.
* ``manifest_sha256`` is the sha256 of the record itself (canonical JSON, this field blank), so a hand edit of any
  field, a lambda or a recorded hash, is refused too; ``export/manifest.py`` (``check_consistency``) then also
  re-derives the plan from the recorded recipe and neurons, so even a forger who recomputes the digest cannot make
  plan and recipe disagree.
  (A shard edited together with its recorded hash and a recomputed digest is consistent on paper: only the logit
  comparison of ``bakeedit verify`` against the base model catches that.)

Commands that rewrite files of a baked folder (``bakeedit card``, ``push`` regenerating the card, ``bakeedit eval``
writing ``eval/``) go through ``export/manifest.py``'s ``refresh_manifest``: it re-checks every *other* file, then
records the new hashes of the files bakeedit itself just wrote (atomic replace), so they keep a valid folder valid
while a hand edit still makes it invalid. No absolute local path is written: the recipe is recorded by its file name.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import BaseModel, Field

from bakeedit import __version__
from bakeedit.edit.plan import EditPlan
from bakeedit.errors import ManifestError
from bakeedit.export.verify import VerificationResult
from bakeedit.io.hashing import file_sha256
from bakeedit.neurons import NeuronSet

PROVENANCE_FILE = "bakeedit.json"
FORMAT_VERSION = 2  # 2: every file hashed, README.md and eval/ included; manifest_sha256; recipe.path is a name
DIGEST_FIELD = "manifest_sha256"
RECIPE_FILE = "recipe.yaml"
NEURONS_FILE = "neurons.json"
REBAKE_HINT = "re-run bakeedit apply to bake the folder again; do not edit a baked folder by hand"


class BaseModelInfo(BaseModel):
    ref: str
    kind: str
    hub_id: str | None = None
    revision: str | None = None
    license: str | None = None
    input_sha256: dict[str, str] = Field(default_factory=dict)
    #: For a GGUF source: the file whose weights were edited, its quantization, and that it was de-quantized.
    weights: str | None = None


class RecipeInfo(BaseModel):
    path: str  # the recipe's file name (format 1: its absolute path, which a public folder should not carry)
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


class ExecutionInfo(BaseModel):
    """Which path ``bakeedit apply`` took by the model's size, and why: ``full-model`` (the base loaded in memory,
    the baked folder reloaded to verify it) or ``low-memory`` (the bake streamed and verified block by block,
    ``export/verify_blocks.py``, no full model ever built)."""

    path: str  # full-model | low-memory
    reason: str


class Provenance(BaseModel):
    format_version: int = FORMAT_VERSION
    bakeedit_version: str = __version__
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    recipe: RecipeInfo
    base_model: BaseModelInfo
    neurons: NeuronSet
    plan: EditPlan
    edit_form: str = "folded"  # folded | custom_module | mixed
    folded_tensors: list[str] = Field(default_factory=list)
    baked_by: str = "in-memory"  # in-memory (fold the loaded model, save_pretrained) | stream (export/stream.py)
    execution: ExecutionInfo | None = None  # None in records written before apply chose its path by size
    custom_module: CustomModuleInfo | None = None
    fit: dict[str, Any] | None = None
    dtype: str
    verification: VerificationResult
    files_sha256: dict[str, str] = Field(default_factory=dict)
    timings_s: dict[str, float] = Field(default_factory=dict)
    evaluation: dict[str, Any] | None = None
    manifest_sha256: str = ""  # sha256 of this record's canonical JSON with this field blank (write_provenance)


# ------------------------------------------------------------------------------------------------ files


def is_hidden(name: str) -> bool:
    """Whether a relative path has a hidden part: such entries are neither listed, checked nor uploaded."""
    return any(part.startswith(".") for part in PurePosixPath(name).parts)


def folder_files(folder: Path) -> list[str]:
    """Every file the folder publishes, as relative POSIX paths: all but hidden entries and ``bakeedit.json``."""
    folder = Path(folder)
    names = (p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*")) if p.is_file())
    return [name for name in names if name != PROVENANCE_FILE and not is_hidden(name)]


def hash_written_files(folder: Path, known: dict[str, str] | None = None) -> dict[str, str]:
    """sha256 of every file of ``folder`` (see :func:`folder_files`), by relative path; ``known`` holds digests
    already taken of complete files (the shards, hashed while the stream wrote the next one)."""
    known = known or {}
    return {name: known.get(name) or file_sha256(Path(folder) / name) for name in folder_files(folder)}


def is_covered(name: str, patterns: Iterable[str]) -> bool:
    """Whether ``name`` is one of ``patterns`` (a file name, or a folder given with a trailing ``/``)."""
    return any(name == p or (p.endswith("/") and name.startswith(p)) for p in patterns)


def relative_to_folder(ref: str | None, folder: Path) -> str | None:
    """An absolute local path as seen from the baked ``folder`` (``../base-model``), anything else as it is: local
    paths in ``bakeedit.json`` and ``neurons.json`` are relative to the folder that holds them, so the record names
    no directory of the machine, and still finds the base when both are moved together."""
    if ref is None or not os.path.isabs(os.path.expanduser(ref)):
        return ref
    try:
        return os.path.relpath(os.path.realpath(os.path.expanduser(ref)), os.path.realpath(os.path.expanduser(folder)))
    except ValueError:  # another drive (Windows): no relative path exists
        return Path(ref).name


def local_ref_for(ref: str, kind: str, folder: Path) -> str:
    """How ``bakeedit.json`` records a model reference: a local folder or GGUF file (however the recipe loader
    spelt it: absolute, or relative to the working directory) relative to the baked ``folder``; others as is."""
    if kind not in ("local", "gguf"):
        return ref
    return relative_to_folder(os.path.abspath(os.path.expanduser(ref)), folder) or ref


def base_location(provenance: Provenance, folder: Path) -> str | None:
    """The recorded base model as a reference usable here: a Hub id or alias as it is, a local path resolved
    against the baked ``folder`` (then the current folder); None when a local base is no longer where recorded."""
    ref, kind = provenance.base_model.ref, provenance.base_model.kind
    if kind not in ("local", "gguf") or Path(ref).expanduser().is_absolute():
        return ref
    return next((str(p) for p in (Path(folder) / ref, Path(ref)) if p.exists()), None)


def portable_neuron_set(neuron_set: NeuronSet, ref: str, kind: str, folder: Path) -> NeuronSet:
    """The neuron set as published or written beside ``folder``: a local ``model_id`` relative to that folder
    (``check_origin`` reads a neurons.json's relative paths against its folder), and path parameters (a locate
    method's side ``report``) by file name."""
    model_id = neuron_set.model_id
    if model_id is not None and model_id == ref:
        model_id = local_ref_for(model_id, kind, folder)
    return neuron_set.model_copy(update={"params": portable_params(neuron_set.params),
                                         "model_id": relative_to_folder(model_id, folder)})


def portable_params(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with every absolute local path replaced by its file name (a locate method's side ``report``,
    data files): the neuron set is published, and a path of the machine it was found on helps nobody."""
    return {k: Path(v).name if isinstance(v, str) and os.path.isabs(os.path.expanduser(v)) else v
            for k, v in params.items()}


# ------------------------------------------------------------------------------------------------ read / write


def canonical_digest(data: dict[str, Any]) -> str:
    """sha256 of ``data`` as canonical JSON (sorted keys, no spaces, UTF-8) with the digest field blank."""
    blank = {**data, DIGEST_FIELD: ""}
    text = json.dumps(blank, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_record_file(folder: Path, record: BaseModel) -> Path:
    """Write ``record`` (a baked folder's :class:`Provenance`, a GGUF or adapter folder's record) as
    ``bakeedit.json`` with its digest, atomically (temp file + rename: a reader never sees half of it), and set
    its ``manifest_sha256``: the one writer of every ``bakeedit.json``."""
    data = json.loads(record.model_dump_json(by_alias=True))  # JSON-safe: NaN/inf are written as null
    data[DIGEST_FIELD] = canonical_digest(data)
    path = Path(folder) / PROVENANCE_FILE
    tmp = path.with_name(f".{PROVENANCE_FILE}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    record.manifest_sha256 = data[DIGEST_FIELD]
    return path


def write_provenance(folder: Path, provenance: Provenance) -> Path:
    """Write a baked folder's ``bakeedit.json`` (:func:`write_record_file`)."""
    return write_record_file(folder, provenance)


def read_raw(folder: Path) -> tuple[Path, dict[str, Any]]:
    path = Path(folder) / PROVENANCE_FILE
    if not path.is_file():
        raise ManifestError(f"{folder}: no {PROVENANCE_FILE}; not a folder written by bakeedit apply",
                            hint="point at the -o folder of a bakeedit apply run")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: unreadable provenance ({str(exc).splitlines()[0]})", hint=REBAKE_HINT) from exc
    if not isinstance(raw, dict):
        raise ManifestError(f"{path}: unreadable provenance (not a JSON object)", hint=REBAKE_HINT)
    return path, raw


def validate_record(path: Path, raw: dict[str, Any]) -> Provenance:
    try:
        return Provenance.model_validate(raw)
    except ValueError as exc:
        raise ManifestError(f"{path}: unreadable provenance ({str(exc).splitlines()[0]})", hint=REBAKE_HINT) from exc


def read_provenance(folder: Path) -> Provenance:
    """The folder's record, read without checking it (``inspect``, ``eval``); :func:`check_folder` checks."""
    path, raw = read_raw(folder)
    return validate_record(path, raw)


# ------------------------------------------------------------------------------------------------ checks
