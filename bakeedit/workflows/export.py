"""``bakeedit export FOLDER --to gguf|ia3|lora -o OUT``: the other artefacts of a baked folder's edit.

A baked folder records everything needed to make them: the recipe (and so the plan, re-derived here as ``verify``
does), the neurons and the base model. :func:`export_folder` checks the folder (every file against its
``bakeedit.json``), re-derives the plan, checks ``OUT`` (before any model loads), loads the recorded base once and

* ``ia3`` / ``lora``: writes a peft adapter (``export/adapter.py``), verified in a fresh process against the base
  with the edit hooked in, its ``merge_and_unload()`` against the baked folder's tensors;
* ``gguf``: when the base is a GGUF file (the embedded SmolLM2 is one), writes the edit into a copy of that file
  in its own quantization (``export/gguf.py``), verified in a fresh process; any other base is one line saying
  what to do instead.

``bakeedit apply`` writes the same artefacts beside its output when the recipe's ``export.formats`` asks
(:func:`write_artefact`, reusing the base it loaded). :func:`reverify` re-runs an artefact's verification
(``bakeedit verify`` on an adapter or GGUF folder).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from bakeedit.edit.plan import EditPlan
from bakeedit.errors import BakeeditError, EditError, ManifestError, RecipeError, VerificationError
from bakeedit.export.adapter import KINDS as ADAPTER_KINDS
from bakeedit.export.adapter import adapter_targets, export_adapter
from bakeedit.export.adapter_record import AdapterRecord, check_adapter_folder
from bakeedit.export.artefacts import ADAPTER, GGUF, folder_kind
from bakeedit.export.gguf import GgufRecord, bake_gguf
from bakeedit.export.gguf_check import check_gguf_folder
from bakeedit.export.gguf_tensors import plan_gguf_edits, read_gguf
from bakeedit.export.gguf_verify import GgufVerification
from bakeedit.export.manifest import check_folder, derive_plan
from bakeedit.export.provenance import BaseModelInfo, Provenance, relative_to_folder
from bakeedit.export.verify import probe_inputs
from bakeedit.export.verify_adapter import AdapterCheck, AdapterVerification, verify_adapter
from bakeedit.io.hashing import file_sha256
from bakeedit.io.ownership import Protected, check_output
from bakeedit.models.arch import ModelLayout
from bakeedit.models.embedded import EMBEDDED_ALIASES, cache_root, embedded_gguf_path
from bakeedit.models.load import LoadedModel, load_model, local_layout, resolve_source
from bakeedit.models.reference import ModelSpec
from bakeedit.neurons import NeuronSet
from bakeedit.recipe import LoadedRecipe
from bakeedit.workflows.outputs import protected_for_recipe

#: What ``bakeedit export --to`` and ``export.formats`` (besides ``safetensors``) can write.
EXPORT_KINDS: tuple[str, ...] = ("gguf", *ADAPTER_KINDS)
NOT_GGUF_HINT = ("bake from a GGUF base (model: embedded, or model: path/to/file.gguf), or convert the baked "
                 "safetensors folder with llama.cpp (convert_hf_to_gguf.py FOLDER, then llama-quantize)")

Reporter = Callable[[str], None]


@dataclass(frozen=True)
class ExportResult:
    """What was written: the artefact's kind, its folder and files, and its verification in one line."""

    kind: str
    folder: Path
    files: tuple[str, ...]
    passed: bool
    line: str
    gguf_file: str | None = None
    base: str | None = None  # the base an adapter loads on: its Hub id, else where it was loaded from


def sibling_folder(out: Path, kind: str) -> Path:
    """Where ``apply`` writes ``kind`` beside its checkpoint ``out``: ``<OUT>-gguf``, ``<OUT>-ia3``, ``<OUT>-lora``."""
    return Path(out).with_name(f"{Path(out).name}-{kind}")


def _refuse_kind(kind: str) -> None:
    if kind not in EXPORT_KINDS:
        raise EditError(f"--to: unknown artefact '{kind}'", hint=f"choose one of: {', '.join(EXPORT_KINDS)}")


# ------------------------------------------------------------------------------------------------ the recorded base


def recorded_base_spec(provenance: Provenance, folder: Path, base: str | None = None) -> ModelSpec:
    """The recorded base model of a baked folder as a :class:`ModelSpec` usable here: the recipe's model block,
    placed on this machine's device, in the dtype apply's probe ran in, its id ``base`` or the recorded reference
    (a local path is recorded relative to the folder)."""
    folder = Path(folder)
    # Placement is this machine's business: a folder baked on cuda:1 is verified here on whatever this machine has.
    recorded = {**provenance.recipe.data["model"], "device": "auto", "device_map": None}
    try:
        spec = ModelSpec.model_validate(recorded)
    except ValueError as exc:
        raise VerificationError(f"{folder}/bakeedit.json: recipe.data.model: {str(exc).splitlines()[-1].strip()}",
                                hint="re-run bakeedit apply; the record does not follow the recipe schema") from None
    # The probe runs in the dtype apply ran it in (float32 on CPU for a bf16 checkpoint), so the power rule sees
    # the same resolution; records written before runtime_dtype existed ran in their stored dtype.
    runtime = provenance.verification.runtime_dtype or provenance.dtype
    return spec.model_copy(update={"id": _base_ref(provenance.base_model, base, folder), "dtype": runtime})


def _base_ref(info: BaseModelInfo, base: str | None, folder: Path) -> str:
    """``--base``, else the recorded reference. A local path is recorded relative to the folder that records it
    (no absolute path is written), so it is found from any working directory while the two keep their places; one
    not found there (nor from the current folder) is an error asking for ``--base``."""
    if base is not None:
        return base
    ref, kind = info.ref, info.kind
    if kind not in ("local", "gguf") or Path(ref).expanduser().is_absolute():
        return ref
    found = next((str(p) for p in (Path(folder) / ref, Path(ref)) if p.exists()), None)
    if found is not None:
        return found
    what = "folder" if kind == "local" else "file"
    raise VerificationError(
        f"bakeedit.json: base_model.ref '{ref}': no such {what} relative to {folder} (nor to {Path.cwd()})",
        hint="the base model moved: pass --base with its location",
    )


def gguf_file_of(model_id: str, kind: str | None = None) -> Path | None:
    """The GGUF file a model reference loads from (the embedded default's file, a ``.gguf`` path), else None."""
    if model_id in EMBEDDED_ALIASES or kind == "embedded":
        return embedded_gguf_path()
    path = Path(model_id).expanduser()
    return path if path.suffix == ".gguf" else None


def not_gguf_error(what: str, ref: str) -> EditError:
    return EditError(f"{what}: the base model '{ref}' is not a GGUF file, so there is no quantized file to write "
                     "the edit into", hint=NOT_GGUF_HINT)


def _protected(folder: Path, spec: ModelSpec, gguf: Path | None) -> list[Protected]:
    """What ``-o`` of an export must not replace: the baked folder (nor write into it), the base's folder or the
    folder of its GGUF file, and bakeedit's cache (the embedded model's converted weights)."""
    found = [Protected("the baked folder", Path(folder)), Protected("bakeedit's cache ($BAKEEDIT_CACHE)", cache_root())]
    ref = Path(spec.id).expanduser()
    if gguf is not None:
        found.append(Protected("the folder of the base's .gguf file", gguf.resolve().parent, inside=False))
    elif ref.is_dir():
        found.append(Protected("the base model's folder", ref.resolve()))
    return found


# ------------------------------------------------------------------------------------------------ writing


def _portable_neurons(prov: Provenance, folder: Path, out: Path) -> NeuronSet:
    """The recorded neuron set with a local ``model_id`` relative to ``out`` instead of the baked folder."""
    ns, ref = prov.neurons, prov.base_model.ref
    model_id = ns.model_id
    if model_id is not None and model_id == ref and prov.base_model.kind in ("local", "gguf") \
            and not os.path.isabs(model_id):
        model_id = relative_to_folder(os.path.abspath(Path(folder) / model_id), out)
    return ns.model_copy(update={"model_id": model_id})


def precheck(kinds: Sequence[str], plan: EditPlan, loaded: LoadedModel, gguf: Path | None) -> None:
    """Refuse, before the long steps of an apply, an artefact the plan cannot become (one line each): a nonlinear or
    position-scoped plan, a routed expert or an identity plan for the adapters; what the GGUF's types cannot carry."""
    if any(k in ADAPTER_KINDS for k in kinds):
        adapter_targets(plan, loaded.model, loaded.layout)
    if "gguf" in kinds and gguf is not None:
        permute = bool(loaded.layout.spec.facts.get("gguf_permute_qk", False))
        plan_gguf_edits(read_gguf(gguf), plan, loaded.layout, permute_qk=permute)


def write_artefact(kind: str, *, folder: Path, prov: Provenance, plan: EditPlan, out: Path,
                   loaded: Callable[[], LoadedModel], layout: Callable[[], ModelLayout], gguf: Path | None,
                   overwrite: bool = False, protected: Sequence[Protected] = (),
                   report: Reporter = lambda _step: None) -> ExportResult:
    """Write one artefact of the baked ``folder``'s ``plan`` to ``out`` (already checked by the caller) and verify
    it. ``loaded`` gives the unedited base (loaded on first use), ``layout`` its layout, ``gguf`` the base's file.

    An adapter's ``merge_and_unload()`` is compared with the baked tensors when the checkpoint is stored in the
    dtype the model runs in; otherwise (a bf16 checkpoint run in float32 on CPU) with bakeedit's fold of the base
    in that dtype, since the merge and the bake round differently."""
    _refuse_kind(kind)
    out = Path(out)
    if kind == "gguf":
        if gguf is None:
            raise not_gguf_error("--to gguf", prov.base_model.hub_id or prov.base_model.ref)
        model_layout = layout()
        report(f"write the edit into {gguf.name} and verify it (fresh process)")
        baked = bake_gguf(gguf, plan, model_layout, out, base_model=prov.base_model.hub_id,
                          license_=prov.base_model.license, overwrite=overwrite, protected=protected,
                          baked_folder=folder)
        files = tuple(sorted(p.name for p in out.iterdir() if not p.name.startswith(".")))
        return ExportResult("gguf", out, files, bool(baked.verification and baked.verification.passed),
                            gguf_line(baked.verification), gguf_file=baked.gguf.name)
    base = loaded()
    report(f"write the {kind} adapter and verify it (fresh process)")
    same_dtype = prov.dtype == (prov.verification.runtime_dtype or prov.dtype)
    export = export_adapter(kind, plan, base, out, baked_folder=folder if same_dtype else None,
                            neurons=_portable_neurons(prov, folder, out), overwrite=overwrite, protected=protected)
    return ExportResult(kind, out, export.files, bool(export.verification and export.verification.passed),
                        adapter_line(export.verification),
                        base=base.source.base_model or os.path.normpath(base.source.ref))


def export_folder(folder: Path, to: str, out: Path, overwrite: bool = False,
                  report: Reporter = lambda _step: None, base: str | None = None) -> ExportResult:
    """``bakeedit export``: check the baked ``folder``, re-derive its plan, check ``out``, then write and verify the
    ``to`` artefact from the recorded base (``base`` overrides where it is, as ``verify --base`` does)."""
    _refuse_kind(to)
    folder = Path(folder)
    prov = check_folder(folder, purpose=f"refusing to export it as {to}")
    plan = derive_plan(folder, prov)  # equal to the recorded one (check_folder compared them): the recipe's plan
    spec = recorded_base_spec(prov, folder, base)
    gguf = gguf_file_of(spec.id)  # the embedded default is recorded by its alias: its file is the package's
    if to == "gguf" and gguf is None:
        raise not_gguf_error(f"{folder}: --to gguf", prov.base_model.hub_id or prov.base_model.ref)
    protected = _protected(folder, spec, gguf)
    out = check_output(out, overwrite, protected)  # before any model loads
    cache: dict[str, object] = {}

    def source():
        if "source" not in cache:
            cache["source"] = resolve_source(spec)
        return cache["source"]

    def loaded() -> LoadedModel:
        if "loaded" not in cache:
            report("load base model")
            cache["loaded"] = load_model(spec, source())
        return cache["loaded"]

    def layout() -> ModelLayout:
        if "loaded" in cache:
            return cache["loaded"].layout
        report("read the base model's config")
        return local_layout(source().path, spec.arch) or loaded().layout

    return write_artefact(to, folder=folder, prov=prov, plan=plan, out=out, loaded=loaded,
                          layout=layout, gguf=gguf, overwrite=overwrite, protected=protected, report=report)


# ------------------------------------------------------------------------------------------------ apply's siblings


def _apply_protected(lr: LoadedRecipe, out: Path) -> list[Protected]:
    return [*protected_for_recipe(lr), Protected("the checkpoint folder (-o)", Path(out))]


def check_export_outputs(lr: LoadedRecipe, out: Path, overwrite: bool) -> dict[str, Path]:
    """The sibling folders a recipe's ``export.formats`` asks for (``<OUT>-gguf``, ...), each checked like ``-o``
    (exists, ownership, ``--overwrite``) before any model loads; ``gguf`` needs a GGUF base (the embedded one, or
    a .gguf file)."""
    kinds = lr.recipe.export.extra_formats
    if "gguf" in kinds and gguf_file_of(lr.recipe.model.id) is None:
        raise RecipeError(f"{lr.path}: export.formats: gguf needs a GGUF base model, and model.id "
                          f"'{lr.recipe.model.id}' is not a .gguf file", hint=NOT_GGUF_HINT)
    protected = _apply_protected(lr, out)
    return {kind: check_output(sibling_folder(out, kind), overwrite, protected) for kind in kinds}


def write_exports(lr: LoadedRecipe, siblings: dict[str, Path], out: Path, provenance: Provenance, plan: EditPlan,
                  loaded: LoadedModel, unedited: nn.Module | None, overwrite: bool, report: Reporter,
                  timings: dict[str, float]) -> list[ExportResult]:
    """``apply``'s artefacts, written and verified beside its checkpoint ``out`` once that is complete, verified
    and in place (a failure here leaves it there and says so). ``unedited`` is the base model apply loaded, if its
    weights are still the base's; otherwise the base is loaded again for the adapters."""
    base: list[LoadedModel] = [] if unedited is None else [
        LoadedModel(unedited, loaded.tokenizer, loaded.layout, loaded.source, loaded.dtype)]

    def base_model() -> LoadedModel:
        if not base:
            report("reload the base model for the adapters (apply holds one model at a time)")
            base.append(load_model(lr.recipe.model))
        return base[0]

    gguf = gguf_file_of(loaded.source.ref, loaded.source.kind)
    results = []
    for kind, folder in siblings.items():
        report(f"export {kind} to {folder.name} (write + verify in a fresh process)")
        started = time.perf_counter()
        try:
            results.append(write_artefact(kind, folder=out, prov=provenance, plan=plan, out=folder,
                                          loaded=base_model, layout=lambda: loaded.layout, gguf=gguf,
                                          overwrite=overwrite, protected=_apply_protected(lr, out)))
        except BakeeditError as exc:
            raise type(exc)(f"{out} was written and verified, but export.formats {kind} failed: {exc}",
                            hint=exc.hint) from exc
        timings[f"export {kind}"] = round(time.perf_counter() - started, 3)
    return results


# ------------------------------------------------------------------------------------------------ one-line results


def adapter_line(v: AdapterVerification | None) -> str:
    if v is None:
        return "not verified"
    return (f"max |delta logit| {v.max_abs_logit_delta:.2e} (tolerance {v.tolerance:.1e}, {v.dtype}, {v.n_tokens} "
            f"tokens); edit effect {v.edit_effect:.2e} (power: {v.power}); keys: {v.keys}; merge_and_unload() vs "
            f"{v.merge_reference}: {v.merge}")


def gguf_line(v: GgufVerification | None) -> str:
    if v is None:
        return "not verified"
    return (f"max |delta logit| {v.max_abs_logit_delta:.2e} (bound {v.bound:.1e}, {v.kind}, {v.n_tokens} tokens); "
            f"edit effect {v.edit_effect:.2e} (power: {v.power}); exact leg: {v.exact}")


# ------------------------------------------------------------------------------------------------ verify again


@dataclass(frozen=True)
class Reverified:
    kind: str
    record: AdapterRecord | GgufRecord
    passed: bool
    line: str
    failures: list[str]


def _load_adapter_base(record: AdapterRecord, folder: Path, base: str | None) -> LoadedModel:
    dtype = record.verification.dtype if record.verification is not None else "auto"
    return load_model(ModelSpec(id=_base_ref(record.base_model, base, folder), dtype=dtype))


def _reverify_adapter(folder: Path, base: str | None) -> Reverified:
    record = check_adapter_folder(folder)
    loaded = _load_adapter_base(record, folder, base)
    inputs = probe_inputs(loaded.tokenizer, None, loaded.model.config)
    v = verify_adapter(AdapterCheck(adapter=folder, base_folder=Path(loaded.source.path), model=loaded.model,
                                    layout=loaded.layout, plan=record.plan, kind=record.adapter.kind,
                                    inputs=inputs))
    return Reverified(ADAPTER, record, v.passed, adapter_line(v), v.failures())


def _reverify_gguf(folder: Path, base: str | None) -> Reverified:
    record = check_gguf_folder(folder)
    found = base if base is not None else next(
        (str(p) for p in (folder / record.source.file, Path(record.source.file)) if p.is_file()), None)
    if found is None:
        raise VerificationError(f"{folder}/bakeedit.json: source.file '{record.source.file}': no such file relative "
                                f"to {folder}", hint="the source GGUF moved: pass --base with its location")
    source = Path(found)
    if file_sha256(source) != record.source.sha256:
        raise VerificationError(f"{source}: not the GGUF file this folder was baked from (sha256 differs from "
                                "bakeedit.json's source.sha256)", hint="pass --base with the original file")
    layout = local_layout(resolve_source(ModelSpec(id=str(source))).path)
    if layout is None:
        layout = load_model(ModelSpec(id=str(source))).layout
    # Bake the recorded plan into the source again, with bake_gguf's own checks (the exact leg, then the logits in a
    # fresh process); the folder's file must be byte-identical to that freshly verified one.
    with tempfile.TemporaryDirectory(prefix="bakeedit-gguf-reverify-") as work:
        try:
            again = bake_gguf(source, record.plan, layout, Path(work) / "gguf", name=record.gguf_file,
                              permute_qk=record.permute_qk)
        except VerificationError as exc:  # the bake's own check failed: so would this folder's file
            return Reverified(GGUF, record, False, str(exc), [str(exc)])
        same = file_sha256(again.gguf) == file_sha256(folder / record.gguf_file)
    v = again.verification
    failures = v.failures() if v is not None else ["not verified"]
    if not same:
        failures.append(f"{record.gguf_file} differs from a fresh bake of its source with the recorded plan")
    line = gguf_line(v) + ("; the file is byte-identical to a fresh bake of its source" if same else "")
    return Reverified(GGUF, record, bool(v and v.passed) and same, line, failures)


def reverify(folder: Path, base: str | None = None) -> Reverified:
    """Check an adapter or GGUF folder against its record, then run its fresh-process verification again: an
    adapter on the recorded base (logits vs the hooked base, keys, ``merge_and_unload()`` vs bakeedit's fold of the
    base), a GGUF file against its recorded source (the exact leg, then the logits)."""
    folder = Path(folder)
    kind = folder_kind(folder)
    if kind == ADAPTER:
        return _reverify_adapter(folder, base)
    if kind == GGUF:
        return _reverify_gguf(folder, base)
    raise ManifestError(f"{folder}: not an adapter or GGUF folder")  # callers dispatch checkpoints themselves


__all__ = ["ADAPTER_KINDS", "EXPORT_KINDS", "ExportResult", "Reverified", "adapter_line", "check_export_outputs",
           "export_folder", "gguf_file_of", "gguf_line", "not_gguf_error", "precheck", "recorded_base_spec",
           "reverify", "sibling_folder", "write_artefact", "write_exports"]
