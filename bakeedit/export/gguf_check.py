"""The folder check of a baked GGUF folder (``export/gguf.py``): it is exactly what its ``bakeedit.json`` lists.

As for a checkpoint (``export/manifest.py``) and an adapter (``adapter_record.check_adapter_folder``): no file
missing, changed or unlisted, and the record's own digest (``manifest_sha256``) matches, so a hand edit of the GGUF,
the Modelfile, the card or any field of the record is refused before the folder is pushed or verified.
"""

from __future__ import annotations

import json
from pathlib import Path

from bakeedit.errors import ManifestError
from bakeedit.export.gguf import RECORD_KIND, GgufRecord
from bakeedit.export.provenance import DIGEST_FIELD, PROVENANCE_FILE, canonical_digest, folder_files
from bakeedit.io.hashing import file_sha256

REEXPORT_HINT = "export the GGUF again (bakeedit export FOLDER --to gguf); do not edit it by hand"

__all__ = ["check_gguf_folder", "read_gguf_record"]


def _raw(folder: Path) -> dict:
    path = Path(folder) / PROVENANCE_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{path}: unreadable GGUF record ({str(exc).splitlines()[0]})",
                            hint=REEXPORT_HINT) from exc
    if not isinstance(raw, dict) or raw.get("record") != RECORD_KIND:
        raise ManifestError(f"{path}: not the record of a baked GGUF folder", hint=REEXPORT_HINT)
    return raw


def read_gguf_record(folder: Path) -> GgufRecord:
    """The folder's record, read without checking the files (``inspect``)."""
    raw = _raw(folder)
    try:
        return GgufRecord.model_validate(raw)
    except ValueError as exc:
        raise ManifestError(f"{Path(folder) / PROVENANCE_FILE}: unreadable GGUF record "
                            f"({str(exc).splitlines()[0]})", hint=REEXPORT_HINT) from exc


def check_gguf_folder(folder: Path, hash_files: bool = True) -> GgufRecord:
    """The record, if the folder holds exactly the files it lists with their sha256 (``hash_files=False``: names
    only, for a quick ``inspect``) and the record's digest matches; else a :class:`ManifestError` naming them."""
    folder = Path(folder)
    raw = _raw(folder)
    record = read_gguf_record(folder)
    present = set(folder_files(folder))
    recorded = record.files_sha256
    problems = sorted(set(recorded) ^ present)
    if hash_files:
        problems += sorted(n for n in recorded if n in present and file_sha256(folder / n) != recorded[n])
    if problems:
        raise ManifestError(f"{folder}: files missing, changed or not listed in {PROVENANCE_FILE}: "
                            f"{', '.join(problems)}", hint=REEXPORT_HINT)
    try:
        intact = raw.get(DIGEST_FIELD) == canonical_digest(raw)
    except ValueError:  # NaN/inf written by hand: bakeedit never writes them
        intact = False
    if not intact:
        raise ManifestError(f"{folder}: {PROVENANCE_FILE} was edited after bakeedit wrote it", hint=REEXPORT_HINT)
    if record.gguf_file not in recorded:
        raise ManifestError(f"{folder}: {PROVENANCE_FILE}: gguf_file '{record.gguf_file}' is not among its files",
                            hint=REEXPORT_HINT)
    return record
