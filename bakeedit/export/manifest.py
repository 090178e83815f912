"""The folder check behind ``verify``, ``card`` and ``push``: the folder is exactly its manifest, the record's own
digest matches, and the recorded plan is the one the recorded recipe and neurons give (``export/provenance.py``
describes the record). :func:`refresh_manifest` re-records the files bakeedit itself rewrites (card, ``eval/``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bakeedit.edit.fit import with_params
from bakeedit.edit.plan import EditPlan, build_plan
from bakeedit.errors import BakeeditError, ManifestError
from bakeedit.export.provenance import (
    DIGEST_FIELD,
    FORMAT_VERSION,
    NEURONS_FILE,
    PROVENANCE_FILE,
    REBAKE_HINT,
    RECIPE_FILE,
    Provenance,
    canonical_digest,
    folder_files,
    is_covered,
    read_provenance,
    read_raw,
    validate_record,
    write_provenance,
)
from bakeedit.io.hashing import file_sha256
from bakeedit.models.arch import ModelLayout
from bakeedit.models.custom import read_base_config
from bakeedit.neurons import NeuronSet
from bakeedit.recipe import EditSpec, parse_recipe


def file_problems(folder: Path, provenance: Provenance, skip: Iterable[str] = (),
                  hash_files: bool = True) -> dict[str, list[str]]:
    """``{"missing": [...], "changed": [...], "unlisted": [...]}`` against ``files_sha256``; names in ``skip``
    (files, or folders with a trailing ``/``) are about to be rewritten and are not checked."""
    folder, skip = Path(folder), tuple(skip)
    recorded = {n: d for n, d in provenance.files_sha256.items() if not is_covered(n, skip)}
    present = {n for n in folder_files(folder) if not is_covered(n, skip)}
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
    path, raw = read_raw(folder)
    _check_format(path, raw)
    provenance = validate_record(path, raw)
    problems = file_problems(folder, provenance, skip, hash_files)
    message = _files_message(problems)
    if message:
        raise ManifestError(lead + message, hint=_files_hint(problems))
    problem = check_consistency(folder, provenance, skip)
    if problem:
        raise ManifestError(f"{lead}{PROVENANCE_FILE}: {problem}", hint=REBAKE_HINT)
    if not _digest_matches(raw):
        raise ManifestError(f"{lead}{PROVENANCE_FILE}: {DIGEST_FIELD} does not match the file's content: it was "
                            "edited after bakeedit wrote it", hint=REBAKE_HINT)
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
    hashes = {n: d for n, d in provenance.files_sha256.items() if not is_covered(n, written)}
    hashes.update({n: file_sha256(folder / n) for n in folder_files(folder) if is_covered(n, written)})
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
    if not is_covered(RECIPE_FILE, skip) and copy.is_file() and copy.read_text(encoding="utf-8") != text:
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
    if is_covered(NEURONS_FILE, skip) or not path.is_file():
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
    layout = ModelLayout.for_config(read_base_config(folder), arch=prov.recipe.data.get("model", {}).get("arch"))
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
