"""Which kind of bakeedit folder a path is, and the check each kind passes before it is pushed or verified.

``bakeedit apply`` writes a baked checkpoint (``export/provenance.py``'s record); ``bakeedit export`` and a recipe's
``export.formats`` also write a peft adapter folder (``record: peft-adapter``, ``export/adapter_record.py``) and a
baked GGUF folder (``record: gguf``, ``export/gguf.py``). All three carry a format-2 ``bakeedit.json`` that hashes
every file; ``push``, ``inspect`` and ``verify`` tell them apart by its ``record`` field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from bakeedit.errors import ManifestError
from bakeedit.export.adapter_record import RECORD_KIND as ADAPTER_RECORD
from bakeedit.export.adapter_record import AdapterRecord, check_adapter_folder
from bakeedit.export.gguf import RECORD_KIND as GGUF_RECORD
from bakeedit.export.gguf import GgufRecord
from bakeedit.export.gguf_check import check_gguf_folder
from bakeedit.export.manifest import check_folder
from bakeedit.export.provenance import PROVENANCE_FILE, Provenance

CHECKPOINT = "checkpoint"
ADAPTER = "adapter"
GGUF = "gguf"

__all__ = ["ADAPTER", "CHECKPOINT", "GGUF", "CheckedFolder", "check_published", "folder_kind"]


def folder_kind(folder: Path) -> str:
    """``adapter``, ``gguf`` or ``checkpoint`` (also for a folder with no readable record: the checkpoint's
    checks then say what is wrong with it)."""
    try:
        raw = json.loads((Path(folder) / PROVENANCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return CHECKPOINT
    record = raw.get("record") if isinstance(raw, dict) else None
    return {ADAPTER_RECORD: ADAPTER, GGUF_RECORD: GGUF}.get(record, CHECKPOINT)


@dataclass
class CheckedFolder:
    """A folder that passed its kind's folder check: its record, whether its recorded verification passed (and
    why not), the code files it may carry, and a commit summary."""

    kind: str
    record: Provenance | AdapterRecord | GgufRecord
    failure: str | None  # None: the recorded verification passed
    hint: str
    commit_message: str
    allowed_code: set[str] = field(default_factory=set)

    @property
    def files_sha256(self) -> dict[str, str]:
        return dict(self.record.files_sha256)


def _with_purpose(exc: ManifestError, folder: Path, purpose: str | None) -> ManifestError:
    text, lead = str(exc), f"{folder}: "
    if purpose and text.startswith(lead):
        return ManifestError(f"{lead}{purpose}: {text[len(lead):]}", hint=exc.hint)
    return exc


def check_published(folder: Path, purpose: str | None = None) -> CheckedFolder:
    """The folder check of ``folder``'s kind (every file against ``files_sha256``, the record's digest; for a
    checkpoint also the plan against its recipe), or a :class:`ManifestError` naming the file or field."""
    folder = Path(folder)
    kind = folder_kind(folder)
    if kind == CHECKPOINT:
        prov = check_folder(folder, purpose=purpose)
        v = prov.verification
        return CheckedFolder(
            CHECKPOINT, prov,
            None if v.passed else f"its verification failed (max |delta logit| {v.max_abs_logit_delta:.3g} > "
                                  f"{v.tolerance:.3g})",
            "re-run bakeedit apply; only verified checkpoints are pushed",
            f"bakeedit: {prov.recipe.data.get('name', folder.name)} ({prov.neurons.method}, {prov.plan.n_neurons} "
            f"neurons, {prov.edit_form})",
            {prov.custom_module.module_file} if prov.custom_module else set())
    try:
        record = check_adapter_folder(folder) if kind == ADAPTER else check_gguf_folder(folder)
    except ManifestError as exc:
        raise _with_purpose(exc, folder, purpose) from None
    v = record.verification
    if v is None:
        failure = "it was written without its verification"
    else:
        failure = None if v.passed else f"its verification failed ({'; '.join(v.failures())})"
    if isinstance(record, AdapterRecord):
        base = record.base_model.hub_id or Path(record.base_model.ref).name
        message = f"bakeedit: {record.adapter.kind} adapter of {base} ({record.plan.n_neurons} neurons)"
        hint = "export the adapter again (bakeedit export FOLDER --to ia3|lora); only verified adapters are pushed"
    else:
        message = f"bakeedit: baked GGUF {record.gguf_file} ({record.plan.n_neurons} neurons)"
        hint = "export the GGUF again (bakeedit export FOLDER --to gguf); only verified files are pushed"
    return CheckedFolder(kind, record, failure, hint, message)
