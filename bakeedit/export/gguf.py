"""Bake a linear edit into a GGUF file: the quantized file itself, with a Modelfile for Ollama and a card beside it.

:func:`bake_gguf` maps the plan onto the file's tensors (``export/gguf_tensors.py``: names, the llama Q/K row
permutation, rows vs columns), scales them in their own quantization (``export/gguf_blocks.py``), writes the copy,
checks it (``export/gguf_verify.py``: the file-level exact leg, then the logits in a fresh process) and only then
renames the staged folder into place. The folder holds::

    <name>.gguf     the edited file: same types, tensor order, metadata and tokenizer as the source
    Modelfile       FROM ./<name>.gguf, the stop tokens, TEMPLATE/SYSTEM for a chat template we recognise
    README.md       a small card: base_model + base_model_relation: quantized, tags gguf
    bakeedit.json   the plan, every changed tensor with what its scaling did, the verification, file hashes

``bakeedit.json`` carries ``bakeedit_version``/``format_version`` and ``files_sha256`` (every file), so an
``--overwrite`` run may replace the folder, and ``manifest_sha256`` as in export/provenance.py (``record: gguf``
tells it apart from a checkpoint's record). docs/export.md, "Baked GGUF", has the bounds and the numbers.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, Field

from bakeedit import __version__
from bakeedit.edit.plan import EditPlan
from bakeedit.errors import VerificationError
from bakeedit.export.card_context import CARD_FILE, TAGS
from bakeedit.export.gguf_blocks import offset_part
from bakeedit.export.gguf_tensors import (
    GgufChange,
    GgufSource,
    TensorEdit,
    apply_edits,
    exact_problems,
    plan_gguf_edits,
    read_gguf,
    write_gguf,
)
from bakeedit.export.gguf_verify import GgufVerification, RoundedRows, verify_gguf
from bakeedit.export.model_card import model_card
from bakeedit.export.provenance import FORMAT_VERSION, hash_written_files, write_record_file
from bakeedit.io.hashing import file_sha256
from bakeedit.io.ownership import Protected
from bakeedit.io.staging import staged_output
from bakeedit.models.arch import ModelLayout

__all__ = ["GgufBakeResult", "GgufRecord", "bake_gguf", "modelfile_text", "verify_gguf"]

MODELFILE = "Modelfile"
RECORD_KIND = "gguf"
BASE_MODEL_RELATION = "quantized"

#: Ollama's form of ChatML (Go template over the conversation), for a GGUF whose chat template uses
#: ``<|im_start|>``/``<|im_end|>`` (SmolLM2, Qwen).
CHATML_TEMPLATE = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""
#: Gemma's turns (``<start_of_turn>user`` / ``model``); Gemma has no system role: a system message opens the user turn.
GEMMA_TEMPLATE = """{{- if .System }}<start_of_turn>user
{{ .System }}<end_of_turn>
{{ end }}
{{- range .Messages }}<start_of_turn>{{ if eq .Role "assistant" }}model{{ else }}user{{ end }}
{{ .Content }}<end_of_turn>
{{ end }}<start_of_turn>model
"""
_CHATML_SYSTEM = re.compile(r"<\|im_start\|>system\n([^{}'\"<\\]+)<\|im_end\|>")


class GgufSourceInfo(BaseModel):
    file: str  # the source's path relative to the baked folder (a local path names no directory of the machine)
    sha256: str
    architecture: str
    file_type: str | None = None


class GgufRecord(BaseModel):
    """``bakeedit.json`` of a baked GGUF folder."""

    format_version: int = FORMAT_VERSION
    bakeedit_version: str = __version__
    record: str = RECORD_KIND
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    gguf_file: str
    source: GgufSourceInfo
    base_model: str | None = None
    baked_folder: str | None = None  # the safetensors checkpoint of the same plan, relative to this folder
    plan: EditPlan
    permute_qk: bool
    changes: list[GgufChange]
    verification: GgufVerification | None = None
    files_sha256: dict[str, str] = Field(default_factory=dict)
    timings_s: dict[str, float] = Field(default_factory=dict)
    manifest_sha256: str = ""


@dataclass
class GgufBakeResult:
    folder: Path
    gguf: Path
    changes: list[GgufChange]
    verification: GgufVerification | None
    record: GgufRecord


def write_record(folder: Path, record: GgufRecord) -> Path:
    """Hash every file of ``folder`` into ``record`` and write it as ``bakeedit.json`` with its digest (the same
    canonical JSON and digest as a baked folder's, ``provenance.write_record_file``), atomically."""
    record.files_sha256 = hash_written_files(folder)
    return write_record_file(Path(folder), record)


# ------------------------------------------------------------------------------------------------ Modelfile, card


def _token(source: GgufSource, key: str) -> str | None:
    index = source.field(key)
    tokens = source.reader.fields.get("tokenizer.ggml.tokens")
    if index is None or tokens is None or not 0 <= int(index) < len(tokens.data):
        return None
    return tokens.contents(int(index))


def modelfile_text(source: GgufSource, gguf_name: str) -> str:
    """Ollama's Modelfile for the baked file: ``FROM ./<file>``, a TEMPLATE (and the default SYSTEM prompt) when
    the GGUF's ``tokenizer.chat_template`` is ChatML or Gemma's, and the stop tokens (the template's end-of-turn
    markers and the end-of-sequence token). An unrecognised template gets no TEMPLATE: Ollama then reads the
    file's own metadata."""
    template = source.field("tokenizer.chat_template") or ""
    eos = _token(source, "tokenizer.ggml.eos_token_id")
    lines = [f"FROM ./{gguf_name}", ""]
    stops: list[str] = []
    if "<|im_start|>" in template and "<|im_end|>" in template:
        lines.append(f'TEMPLATE """{CHATML_TEMPLATE}"""')
        system = _CHATML_SYSTEM.search(template)
        if system:
            lines.append(f'SYSTEM """{system.group(1).strip()}"""')
        stops = ["<|im_start|>", "<|im_end|>"]
    elif "<start_of_turn>" in template:
        lines.append(f'TEMPLATE """{GEMMA_TEMPLATE}"""')
        stops = ["<end_of_turn>"]
    if eos and eos not in stops:
        stops.append(eos)
    lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    return "\n".join(lines).rstrip() + "\n"


def card_text(record: GgufRecord, license_: str | None) -> str:
    """A minimal card: front matter from huggingface_hub's ModelCardData (never written by hand)."""
    from huggingface_hub import ModelCardData

    data = ModelCardData(base_model=record.base_model,
                         base_model_relation=BASE_MODEL_RELATION if record.base_model else None,
                         license=license_ or "unknown", pipeline_tag="text-generation", tags=["gguf", *TAGS])
    sites = sorted({s for c in record.changes for s in c.sites})
    rows = "\n".join(f"| `{c.tensor}` | {c.type} | {c.axis} | {c.n_channels} | {c.method} | "
                     f"{'exact' if c.exact else f'{c.rel_error:.2g}'} |" for c in record.changes)
    v = record.verification
    check = ("not verified" if v is None else
             f"max |delta logit| {v.max_abs_logit_delta:.3g} against the runtime edit on the source file "
             f"(bound {v.bound:.3g}: {v.bound_rule}; the edit's own effect {v.edit_effect:.3g}); "
             f"{'passed' if v.passed else 'FAILED'}")
    body = f"""
# {Path(record.gguf_file).stem}

`{Path(record.source.file).name}` ({record.source.file_type or "quantization unknown"}) with a neuron edit written
into its quantized tensors by [bakeedit](https://pypi.org/project/bakeedit/): {'; '.join(record.plan.describe())},
{record.plan.n_neurons} neuron(s) at {', '.join(sites)}. Everything else (tensor types and order, metadata,
tokenizer) is the source file's.

| tensor | type | edited | channels | how | max block deviation |
|---|---|---|---|---|---|
{rows}

Verification: {check}. `bakeedit.json` holds the plan, every change and the file hashes.

Run it with Ollama (`ollama create NAME -f Modelfile`), llama.cpp (`llama-cli -m {record.gguf_file}`) or
transformers (`AutoModelForCausalLM.from_pretrained(".", gguf_file="{record.gguf_file}")`).
"""
    return str(model_card(body, data))


# ------------------------------------------------------------------------------------------------ the bake


def _file_type(source: GgufSource) -> str | None:
    from gguf import LlamaFileType

    value = source.field("general.file_type")
    try:
        return LlamaFileType(int(value)).name.removeprefix("MOSTLY_") if value is not None else None
    except ValueError:
        return None


def bake_gguf(source: Path, plan: EditPlan, layout: ModelLayout, out: Path, *, base_model: str | None = None,
              license_: str | None = None, name: str | None = None, overwrite: bool = False,
              protected: Sequence[Protected | tuple] = (), verify: bool = True,
              prompts: Sequence[str] | None = None, tokenizer: bool | None = None,
              permute_qk: bool | None = None, baked_folder: Path | None = None) -> GgufBakeResult:
    """Write ``plan`` into a copy of the GGUF file ``source`` in the folder ``out`` (module docstring).

    ``layout`` is the model's as loaded from ``source``; ``base_model`` is the Hub id the card points at (the base,
    or a baked safetensors model). ``tokenizer`` (default: when the file has one) probes the check with the
    file's tokenizer and ``prompts``; otherwise with fixed random token ids. ``permute_qk`` overrides the family's
    ``gguf_permute_qk`` fact (a file converted without the permutation); ``baked_folder``, the safetensors
    checkpoint of the same plan, is recorded relative to ``out``. Nothing is written unless every edit can
    be carried and, with ``verify``, the check passes (:class:`~bakeedit.errors.VerificationError` otherwise)."""
    timings: dict[str, float] = {}
    started = time.monotonic()
    source = Path(source)
    src = read_gguf(source)
    permute = bool(layout.spec.facts.get("gguf_permute_qk", False)) if permute_qk is None else permute_qk
    edits = plan_gguf_edits(src, plan, layout, permute_qk=permute)
    replaced, changes = apply_edits(src, edits)
    timings["edit"] = time.monotonic() - started
    file_name = name if name and name.endswith(".gguf") else f"{name or source.stem + '-bakeedit'}.gguf"
    guard = [*protected, Protected("the source GGUF's folder", source.resolve().parent, inside=False)]
    use_tokenizer = tokenizer if tokenizer is not None else "tokenizer.ggml.tokens" in src.reader.fields
    with staged_output(Path(out), overwrite, guard) as tmp:
        mark = time.monotonic()
        write_gguf(src, tmp / file_name, replaced)
        timings["write"] = time.monotonic() - mark
        problems = exact_problems(src, tmp / file_name, replaced, changes)
        verification = None
        if verify:
            mark = time.monotonic()
            verification = verify_gguf(source, tmp / file_name, plan, changes, exact_problems=problems,
                                       rounded=_rounded_rows(src, edits, changes, layout), arch=layout.arch,
                                       prompts=prompts, tokenizer=use_tokenizer)
            timings["verify"] = time.monotonic() - mark
            if not verification.passed:
                raise VerificationError(f"the baked GGUF does not reproduce the edit: "
                                        f"{'; '.join(verification.failures())}",
                                        hint="nothing was written; docs/export.md explains the bounds")
        elif problems:
            raise VerificationError(f"the baked GGUF is not the edit of its source: {problems[0]}")
        record = GgufRecord(
            gguf_file=file_name, base_model=base_model, plan=plan, permute_qk=permute, changes=changes,
            baked_folder=None if baked_folder is None else _relative(Path(baked_folder), Path(out)),
            verification=verification,
            source=GgufSourceInfo(file=_relative(source, Path(out)), sha256=file_sha256(source),
                                  architecture=src.architecture, file_type=_file_type(src)),
        )
        (tmp / MODELFILE).write_text(modelfile_text(src, file_name), encoding="utf-8")
        (tmp / CARD_FILE).write_text(card_text(record, license_ or src.field("general.license")), encoding="utf-8")
        timings["total"] = time.monotonic() - started
        record.timings_s = {k: round(v, 3) for k, v in timings.items()}
        write_record(tmp, record)
    return GgufBakeResult(Path(out), Path(out) / file_name, changes, verification, record)


def _rounded_rows(source: GgufSource, edits: Sequence[TensorEdit], changes: Sequence[GgufChange],
                  layout: ModelLayout) -> list[RoundedRows]:
    """The weight rows whose scaling rounded, as the check's bound needs them (gguf_verify): the fields' measured
    roundings and, for two-field types, the part of each value the second field scales."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    rounded = []
    for edit, change in zip(edits, changes, strict=True):
        if change.axis != "row" or change.exact or not edit.tensor.endswith(".weight"):
            continue
        qtype = GGMLQuantizationType[change.type]
        offsets = offset_part(source.tensors[edit.tensor].data[list(edit.indices)], qtype)
        rounded.append(RoundedRows(
            module=edit.module, channels=list(edit.channels), factors=list(edit.factors),
            block=GGML_QUANT_SIZES[qtype][0],  # float types: each value rounds alone, a block of one
            eps=change.field_eps[0], eps_offset=change.field_eps[1] if len(change.field_eps) > 1 else 0.0,
            offsets=offsets.tolist() if offsets is not None else None, transposed=layout.spec.transposed_weights))
    return rounded


def _relative(path: Path, folder: Path) -> str:
    try:
        return os.path.relpath(os.path.realpath(path), os.path.realpath(Path(folder).expanduser()))
    except ValueError:  # another drive (Windows)
        return Path(path).name
