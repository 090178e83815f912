"""``bakeedit.json``: the evidence that ships with every edited checkpoint, and the manifest of its folder.

It holds the recipe (text and validated data), the neuron set, the edit plan, the base model's id, revision and
input hashes, the bakeedit version and the verification result; for an edit saved as a custom module, the module's
file, hash and size (``custom_module``), and the parameter fit. Since format 2 it is also the folder's manifest:

* ``files_sha256`` lists **every** file of the folder (weights, config, tokenizer, chat template, card, heat map,
  ``eval/``, custom module, ``neurons.json``, ``recipe.yaml``), except ``bakeedit.json`` itself and hidden entries
  (``.*``, never uploaded: temporaries of an interrupted write, ``.cache``). A file missing, changed or not listed
  means the folder is not what was verified, and ``verify``, ``card`` and ``push`` refuse it, naming the file.
* ``manifest_sha256`` is the sha256 of the record itself (canonical JSON, this field blank), so a hand edit of any
  field, a lambda or a recorded hash, is refused too; :func:`check_consistency` then also re-derives the plan from
  the recorded recipe and neurons, so even a forger who recomputes the digest cannot make plan and recipe disagree.
  (A shard edited together with its recorded hash and a recomputed digest is consistent on paper: only the logit
  comparison of ``bakeedit verify`` against the base model catches that.)

Commands that rewrite files of a baked folder (``bakeedit card``, ``push`` regenerating the card, ``bakeedit eval``
writing ``eval/``) go through :func:`refresh_manifest`: it re-checks every *other* file, then records the new
hashes of the files bakeedit itself just wrote (atomic replace), so they keep a valid folder valid while a hand edit
still makes it invalid. No absolute local path is written: the recipe is recorded by its file name.
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
from bakeedit.edit.fit import with_params
from bakeedit.edit.plan import EditPlan, build_plan
from bakeedit.errors import BakeeditError, ManifestError
from bakeedit.export.verify import VerificationResult
from bakeedit.io.hashing import file_sha256
from bakeedit.models.arch import ModelLayout
from bakeedit.models.custom import read_base_config
from bakeedit.neurons import NeuronSet
from bakeedit.recipe import EditSpec, parse_recipe

PROVENANCE_FILE = "bakeedit.json"
FORMAT_VERSION = 2  # 2: every file hashed, README.md and eval/ included; manifest_sha256; recipe.path is a name
DIGEST_FIELD = "manifest_sha256"
RECIPE_FILE = "recipe.yaml"
NEURONS_FILE = "neurons.json"
_REBAKE = "re-run bakeedit apply to bake the folder again; do not edit a baked folder by hand"


class BaseModelInfo(BaseModel):
    ref: str
    kind: str
    hub_id: str | None = None
    revision: str | None = None
    license: str | None = None
    input_sha256: dict[str, str] = Field(default_factory=dict)


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
    baked_by: str = "in-memory"  # in-memory (fold the loaded model, save_pretrained) | stream (edit/stream.py)
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


def hash_written_files(folder: Path) -> dict[str, str]:
    """sha256 of every file of ``folder`` (see :func:`folder_files`), by relative path."""
    return {name: file_sha256(Path(folder) / name) for name in folder_files(folder)}


def _covered(name: str, patterns: Iterable[str]) -> bool:
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


def write_provenance(folder: Path, provenance: Provenance) -> Path:
    """Write ``bakeedit.json`` with its digest, atomically (temp file + rename: a reader never sees half of it)."""
    data = json.loads(provenance.model_dump_json(by_alias=True))  # JSON-safe: NaN/inf are written as null
    data[DIGEST_FIELD] = canonical_digest(data)
    path = Path(folder) / PROVENANCE_FILE
    tmp = path.with_name(f".{PROVENANCE_FILE}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    provenance.manifest_sha256 = data[DIGEST_FIELD]
    return path


def _read_raw(folder: Path) -> tuple[Path, dict[str, Any]]:
    path = Path(folder) / PROVENANCE_FILE
    if not path.is_file():
        raise ManifestError(f"{folder}: no {PROVENANCE_FILE}; not a folder written by bakeedit apply",
                            hint="point at the -o folder of a bakeedit apply run")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: unreadable provenance ({str(exc).splitlines()[0]})", hint=_REBAKE) from exc
    if not isinstance(raw, dict):
        raise ManifestError(f"{path}: unreadable provenance (not a JSON object)", hint=_REBAKE)
    return path, raw


def _validate(path: Path, raw: dict[str, Any]) -> Provenance:
    try:
        return Provenance.model_validate(raw)
    except ValueError as exc:
        raise ManifestError(f"{path}: unreadable provenance ({str(exc).splitlines()[0]})", hint=_REBAKE) from exc


def read_provenance(folder: Path) -> Provenance:
    """The folder's record, read without checking it (``inspect``, ``eval``); :func:`check_folder` checks."""
    path, raw = _read_raw(folder)
    return _validate(path, raw)


# ------------------------------------------------------------------------------------------------ checks


def file_problems(folder: Path, provenance: Provenance, skip: Iterable[str] = (),
                  hash_files: bool = True) -> dict[str, list[str]]:
    """``{"missing": [...], "changed": [...], "unlisted": [...]}`` against ``files_sha256``; names in ``skip``
    (files, or folders with a trailing ``/``) are about to be rewritten and are not checked."""
    folder, skip = Path(folder), tuple(skip)
    recorded = {n: d for n, d in provenance.files_sha256.items() if not _covered(n, skip)}
    present = {n for n in folder_files(folder) if not _covered(n, skip)}
    missing = sorted(n for n in recorded if n not in present)
    changed = sorted(n for n in recorded if n in present and hash_files and file_sha256(folder / n) != recorded[n])
    return {"missing": missing, "changed": changed, "unlisted": sorted(present - set(recorded))}


def check_file_hashes(folder: Path, provenance: Provenance) -> list[str]:
    """Names of files that are missing, changed or not listed (empty = the folder is exactly what was recorded)."""
    problems = file_problems(folder, provenance)
    return sorted({n for names in problems.values() for n in names})


def _files_message(problems: dict[str, list[str]]) -> str | None:
    parts = []
    if problems["changed"]:
        parts.append(f"files changed since they were written: {', '.join(problems['changed'])}")
    if problems["missing"]:
        parts.append(f"files missing: {', '.join(problems['missing'])}")
    if problems["unlisted"]:
        parts.append(f"files not listed in {PROVENANCE_FILE}: {', '.join(problems['unlisted'])}")
    return "; ".join(parts) or None


def _files_hint(problems: dict[str, list[str]]) -> str:
    if not problems["changed"] and not problems["missing"]:
        return ("a folder is published exactly as it was verified: move away the files bakeedit did not write, or "
                "re-run bakeedit apply")
    return ("a file was modified or deleted after bakeedit wrote it: re-run bakeedit apply (only a changed or deleted "
            "README.md or heat map is rewritten by `bakeedit card`)")


def _check_format(path: Path, raw: dict[str, Any]) -> None:
    version = raw.get("format_version", 1)
    if version == FORMAT_VERSION:
        return
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise ManifestError(f"{path}: format_version {version} was written by a newer bakeedit",
                            hint="upgrade bakeedit to read this folder")
    raise ManifestError(
        f"{path}: format_version {version} lists only some files (not README.md or eval/) and has no "
        f"{DIGEST_FIELD}, so it cannot show the folder is unchanged",
        hint="re-run bakeedit apply with this bakeedit to write a complete manifest",
    )


def check_folder(folder: Path, *, skip: Iterable[str] = (), purpose: str | None = None,
                 hash_files: bool = True) -> Provenance:
    """Everything that makes a baked folder trustworthy, or a :class:`ManifestError` naming the file or field:
    the manifest's format, every file against ``files_sha256`` (``skip``: files the caller is about to rewrite),
    the recorded fields against each other (:func:`check_consistency`), and the record's own digest.
    ``purpose`` prefixes the message (e.g. ``refusing to push``). Returns the record."""
    folder = Path(folder)
    lead = f"{folder}: {purpose}: " if purpose else f"{folder}: "
    path, raw = _read_raw(folder)
    _check_format(path, raw)
    provenance = _validate(path, raw)
    problems = file_problems(folder, provenance, skip, hash_files)
    message = _files_message(problems)
    if message:
        raise ManifestError(lead + message, hint=_files_hint(problems))
    problem = check_consistency(folder, provenance, skip)
    if problem:
        raise ManifestError(f"{lead}{PROVENANCE_FILE}: {problem}", hint=_REBAKE)
    if not _digest_matches(raw):
        raise ManifestError(f"{lead}{PROVENANCE_FILE}: {DIGEST_FIELD} does not match the file's content: it was "
                            "edited after bakeedit wrote it", hint=_REBAKE)
    return provenance


def _digest_matches(raw: dict[str, Any]) -> bool:
    try:
        return raw.get(DIGEST_FIELD) == canonical_digest(raw)
    except ValueError:  # NaN/inf written by hand: bakeedit never writes them
        return False


def refresh_manifest(folder: Path, written: Iterable[str], *, check: bool = True,
                     update: dict[str, Any] | None = None) -> Provenance:
    """After bakeedit rewrote ``written`` (files, or folders with a trailing ``/``) in a baked folder: re-check
    every other file (unless ``check`` is false because the caller just did), record the written files' new
    hashes (dropping those that are gone), apply ``update`` to the record, and write it atomically."""
    folder, written = Path(folder), tuple(written)
    provenance = check_folder(folder, skip=written) if check else read_provenance(folder)
    hashes = {n: d for n, d in provenance.files_sha256.items() if not _covered(n, written)}
    hashes.update({n: file_sha256(folder / n) for n in folder_files(folder) if _covered(n, written)})
    provenance = provenance.model_copy(update={"files_sha256": dict(sorted(hashes.items())), **(update or {})})
    write_provenance(folder, provenance)
    return provenance


# ------------------------------------------------------------------------------------------------ consistency


def first_difference(recorded: Any, derived: Any, where: str) -> str | None:
    """The path (``plan.groups[0].lambdas[1]``) of the first value in which two JSON-like values differ."""
    if isinstance(recorded, dict) and isinstance(derived, dict):
        for key in sorted(set(recorded) | set(derived), key=str):
            if key not in recorded or key not in derived:
                return f"{where}.{key}"
            found = first_difference(recorded[key], derived[key], f"{where}.{key}")
            if found:
                return found
        return None
    if isinstance(recorded, list) and isinstance(derived, list):
        if len(recorded) != len(derived):
            return where
        for i, (a, b) in enumerate(zip(recorded, derived, strict=True)):
            found = first_difference(a, b, f"{where}[{i}]")
            if found:
                return found
        return None
    return None if recorded == derived else where


def check_consistency(folder: Path, provenance: Provenance, skip: Iterable[str] = ()) -> str | None:
    """The first field of the record that disagrees with another (or with the folder's copy of it), or None.

    The recipe text must match its sha256, ``recipe.yaml`` and the recorded ``recipe.data.edit``; ``neurons.json``
    must be the recorded neuron set; and the recorded plan must be exactly what ``build_plan`` derives from the
    recipe's edit (with the fitted parameters of ``fit``) and the neurons, on the layout of the folder's config.
    """
    for check in (_recipe_problem, _neurons_problem, _plan_problem, _module_problem):
        problem = check(Path(folder), provenance, tuple(skip))
        if problem:
            return problem
    return None


def _recipe_problem(folder: Path, prov: Provenance, skip: tuple[str, ...]) -> str | None:
    import yaml


    text = prov.recipe.text
    if hashlib.sha256(text.encode()).hexdigest() != prov.recipe.sha256:
        return "recipe.text does not match recipe.sha256"
    copy = folder / RECIPE_FILE
    if not _covered(RECIPE_FILE, skip) and copy.is_file() and copy.read_text(encoding="utf-8") != text:
        return f"recipe.text differs from {RECIPE_FILE}"
    try:
        parsed = parse_recipe(yaml.safe_load(text), "recipe.text")
    except (BakeeditError, yaml.YAMLError):
        return "recipe.text is not a valid recipe"
    edit = parsed.edit.model_dump(mode="json", by_alias=True, exclude_none=True)
    found = first_difference(prov.recipe.data.get("edit"), edit, "recipe.data.edit")
    if found:
        return f"{found} differs from the recipe text (recipe.text)"
    if parsed.neurons is not None and parsed.neurons != prov.neurons.neurons:
        return "neurons.neurons differs from the neuron list of the recipe text (recipe.text)"
    return None


def _neurons_problem(folder: Path, prov: Provenance, skip: tuple[str, ...]) -> str | None:
    path = folder / NEURONS_FILE
    if _covered(NEURONS_FILE, skip) or not path.is_file():
        return None
    try:
        on_disk = NeuronSet.load(path)
    except BakeeditError:
        return f"{NEURONS_FILE} is not a readable neuron set"
    if on_disk != prov.neurons:
        found = first_difference(prov.neurons.model_dump(mode="json"), on_disk.model_dump(mode="json"), "neurons")
        return f"{found or 'neurons'} differs from {NEURONS_FILE}"
    return None


def derive_plan(folder: Path, prov: Provenance) -> EditPlan:
    """The plan ``bakeedit apply`` builds from the recorded recipe edit (fitted parameters from ``fit``) and the
    recorded neurons, on the layout of the folder's ``config.json`` (read without weights or custom code)."""
    try:
        edit = EditSpec.model_validate(prov.recipe.data.get("edit", {}))
    except ValueError as exc:  # pydantic: a recorded edit that is not a valid edit
        raise ManifestError(f"recipe.data.edit is not a valid edit ({str(exc).splitlines()[0]})") from None
    if edit.fit is not None:
        if not prov.fit or not isinstance(prov.fit.get("chosen"), dict):
            raise ManifestError("fit.chosen is missing, but recipe.data.edit.fit asks for fitted parameters")
        edit = with_params(edit, prov.fit["chosen"])
    layout = ModelLayout.for_config(read_base_config(folder))
    return build_plan(prov.neurons.neurons, edit, layout, source="neurons")


def _plan_problem(folder: Path, prov: Provenance, skip: tuple[str, ...]) -> str | None:
    try:
        derived = derive_plan(folder, prov)
    except ManifestError as exc:
        return str(exc)
    except (BakeeditError, OSError, ValueError, KeyError) as exc:  # config.json unreadable, a neuron out of range
        return f"the plan cannot be re-derived from recipe.data.edit and the neurons ({str(exc).splitlines()[0]})"
    source = "recipe.data.edit" + (" and fit.chosen" if prov.fit else "")
    found = first_difference(prov.plan.model_dump(mode="json"), derived.model_dump(mode="json"), "plan")
    if found:
        return f"{found} does not match the plan re-derived from {source} and the neurons"
    if prov.edit_form != derived.edit_form:
        return f"edit_form '{prov.edit_form}' does not match the plan ('{derived.edit_form}')"
    return None


def _module_problem(folder: Path, prov: Provenance, skip: tuple[str, ...]) -> str | None:
    module = prov.custom_module
    if module is None:
        return None
    for field_name, name, digest in (("module_sha256", module.module_file, module.module_sha256),
                                     ("edit_sha256", module.edit_file, module.edit_sha256)):
        if prov.files_sha256.get(name) != digest:
            return f"custom_module.{field_name} does not match files_sha256['{name}']"
    return None
