"""``bakeedit apply`` as a library call: recipe -> neurons -> plan -> fold -> save -> verify -> evidence.

Every check that can fail without loading the model (recipe schema, output folder, neuron file) runs first. The
base model is loaded once: reference logits are taken with the edit applied by hooks, then the same weights are
folded in place and saved into a staged folder, which is reloaded with plain ``from_pretrained`` and compared. Only a
verified folder is renamed into place. A plan with nonlinear or position-scoped parts folds only its linear part and
saves the rest as a custom module (``export/custom_module.py``); that folder is reloaded with
``trust_remote_code=True``, exactly as its users will load it. ``edit.fit`` first chooses the edit's parameters on
the locate split (``edit/fit.py``).

With an ``evaluate:`` block, the base model and a random-neuron control are scored before the fold (both on the
unedited weights, the control through hooks) and the edited model after verification, on the reloaded checkpoint;
the report goes to ``eval/`` and the model card (``README.md``) is written last, from everything in the folder.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bakeedit.edit import EditPlan, build_plan, fold_plan, runtime_edit
from bakeedit.edit.fit import FitReport, fit_edit
from bakeedit.errors import BakeeditError, EditError, ModelLoadError, RecipeError, VerificationError
from bakeedit.evaluate.runner import expand_tasks
from bakeedit.export.card import write_card
from bakeedit.export.custom_module import check_module_supported, write_custom_module
from bakeedit.export.manifest import check_folder
from bakeedit.export.provenance import (
    BaseModelInfo,
    Provenance,
    RecipeInfo,
    hash_written_files,
    local_ref_for,
    portable_neuron_set,
    portable_params,
    read_provenance,
    write_provenance,
)
from bakeedit.export.save import save_checkpoint
from bakeedit.export.stream import carried_files, stream_for_apply
from bakeedit.export.verify import (
    ExactCheck,
    VerificationResult,
    compare_logits,
    conclude,
    fold_exact_check,
    probe_inputs,
    probe_logits,
    prompts_digest,
    streamed_exact_result,
)
from bakeedit.export.verify_blocks import exact_check
from bakeedit.io.ownership import check_output
from bakeedit.io.shards import Checkpoint
from bakeedit.io.staging import staged_output
from bakeedit.locate import LocateContext, run_locate
from bakeedit.models.arch import ModelLayout
from bakeedit.models.custom import is_custom_module
from bakeedit.models.embedded import cache_root
from bakeedit.models.load import LoadedModel, load_model, stored_dtype
from bakeedit.neurons import NeuronSet, check_neuron_count, check_origin
from bakeedit.recipe import LoadedRecipe, parse_recipe
from bakeedit.workflows.apply_eval import evaluate_before_fold, evaluate_edited, merge_runs, write_evaluation
from bakeedit.workflows.export import (
    ADAPTER_KINDS,
    ExportResult,
    check_export_outputs,
    gguf_file_of,
    precheck,
    recorded_base_spec,
    write_exports,
)
from bakeedit.workflows.outputs import protected_for_recipe

NEURONS_FILE = "neurons.json"
DEFAULT_MAX_SHARD_SIZE = "2GB"
RECIPE_FILE = "recipe.yaml"

Reporter = Callable[[str], None]
Bars = Callable[[str, int, int], None]


@dataclass
class ApplyResult:
    out: Path
    provenance: Provenance
    timings_s: dict[str, float] = field(default_factory=dict)
    exports: list[ExportResult] = field(default_factory=list)  # export.formats: the artefacts beside ``out``


@contextmanager
def _timed(timings: dict[str, float], step: str, report: Reporter) -> Iterator[None]:
    report(step)
    start = time.perf_counter()
    yield
    timings[step] = round(time.perf_counter() - start, 3)


def resolve_neurons(lr: LoadedRecipe, loaded: LoadedModel, progress=None) -> NeuronSet:
    """The recipe's neurons: an explicit list, a neurons.json, or the result of its ``locate:`` method.

    A list longer than the model has neurons is refused right after loading (when the model's config.json was not
    local, ``load_recipe`` could not check it before); a neurons.json located on another model is refused unless
    the recipe sets ``allow_foreign_neurons: true``.
    """
    recipe = lr.recipe
    model_id, revision = loaded.source.base_model or loaded.source.ref, loaded.source.revision
    if recipe.neurons is not None:
        check_neuron_count(len(recipe.neurons), loaded.layout, f"{lr.path}: neurons", f"'{model_id}'")
        return NeuronSet(
            method="explicit",
            params={"recipe": lr.path.name},  # a name, not a local path: the card is public
            model_id=model_id,
            model_revision=revision,
            neurons=recipe.neurons,
        )
    if recipe.neurons_file is not None:
        path = lr.resolve(recipe.neurons_file)
        if not path.is_file():
            raise RecipeError(f"{lr.path}: neurons_file: no such file '{path}'")
        neuron_set = NeuronSet.load(path)
        check_neuron_count(len(neuron_set.neurons), loaded.layout, str(path), f"'{model_id}'")
        if not recipe.allow_foreign_neurons:
            check_origin(neuron_set, model_id, revision, str(path))
        return neuron_set
    assert recipe.locate is not None
    ctx = LocateContext(cache_dir=cache_root() / "locate", progress=progress, base_dir=lr.path.parent)
    return run_locate(recipe.locate, loaded, ctx, source=str(lr.path))


@dataclass
class Probe:
    """The probe and the base model's answers to it, taken before the fold: with the edit hooked (the reference
    the checkpoint must reproduce) and without (the edit's own effect, which the power rule of
    ``export/verify.py`` compares the baked-vs-hooked delta with)."""

    prompts: list[str] | None
    inputs: dict[str, torch.Tensor]
    reference: torch.Tensor
    base: torch.Tensor


def take_probe(loaded: LoadedModel, plan: EditPlan, prompts: list[str] | None) -> Probe:
    inputs = probe_inputs(loaded.tokenizer, prompts, loaded.model.config)
    base = probe_logits(loaded.model, inputs)
    with runtime_edit(loaded.model, loaded.layout, plan):
        reference = probe_logits(loaded.model, inputs)
    return Probe(prompts, inputs, reference, base)


def exact_leg(base_folder: Path, folder: Path, layout: ModelLayout, plan: EditPlan, baked_by: str) -> ExactCheck:
    """Every tensor of ``folder`` against the fold of ``base_folder``'s (read from its files): a streamed bake must
    keep names and bytes too (``verify_blocks.exact_check``); an in-memory one was laid out by save_pretrained."""
    if baked_by != "stream":
        return fold_exact_check(base_folder, folder, layout, plan)
    try:  # bakeedit verify --base may name a base that is no safetensors folder
        compared, mismatched = exact_check(Checkpoint.open(base_folder), Checkpoint.open(folder), layout, plan)
    except (EditError, ModelLoadError) as exc:
        return ExactCheck("not run", note=str(exc), decisive=not plan.module_groups)
    return streamed_exact_result(compared, mismatched, plan)


_COMPARED = ("saved checkpoint ({load}) vs base model with the edit applied by hooks (logits; the edit's own effect "
             "from the unhooked base), and every saved tensor vs the fold of the base checkpoint's (bit-exact)")


def verify_against_runtime(
    probe: Probe, folder: Path, loaded: LoadedModel, plan: EditPlan, tolerance: float | None,
    saved_dtype: torch.dtype, baked_by: str,
) -> tuple[VerificationResult, torch.nn.Module]:
    """Both legs of ``export/verify.py``: reload ``folder`` with plain transformers (in the dtype the probe ran in)
    and compare its probe logits with the reference, then compare its tensors with the fold of the base files.

    ``saved_dtype`` is the dtype the edited weights were saved in (bf16 even when the model ran in float32): the
    default tolerance is that dtype's, the power rule's floor the runtime dtype's. Returns the reloaded model too:
    it is the checkpoint as users will load it, so evaluations use it.
    """
    from transformers import AutoModelForCausalLM  # start-up time: transformers loads when a model does

    custom = is_custom_module(folder)  # bakeedit wrote its code, and verify_output checked its hash first
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=loaded.dtype, trust_remote_code=custom)
    reloaded = reloaded.to(loaded.device).eval()
    candidate = probe_logits(reloaded, probe.inputs)
    logits = compare_logits(
        probe.reference, candidate, saved_dtype, tolerance, int(probe.inputs["input_ids"].shape[0]),
        prompts_digest(probe.prompts, loaded.tokenizer), base=probe.base, runtime_dtype=loaded.dtype,
    )
    result = conclude(logits, exact_leg(Path(loaded.source.path), Path(folder), loaded.layout, plan, baked_by))
    result.compared = _COMPARED.format(load="from_pretrained with trust_remote_code=True" if custom
                                       else "plain from_pretrained")
    if saved_dtype != loaded.dtype:
        result.notes.append(f"the model ran in {_dtype_name(loaded.dtype)}; the checkpoint is stored in "
                            f"{_dtype_name(saved_dtype)}, whose tolerance applies")
    return result, reloaded


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def save_dtype(requested: str, loaded: LoadedModel) -> tuple[torch.dtype, bool]:
    """The dtype the in-memory bake saves in, and whether that converts the base: the base's stored dtype unless
    the recipe's ``model.dtype`` names one (``auto`` runs a bf16 checkpoint in float32 on CPU, and saving that would
    double the folder's size for nothing)."""
    stored = stored_dtype(Path(loaded.source.path), loaded.model.config) or loaded.dtype
    wanted = stored if requested == "auto" else getattr(torch, requested)
    return wanted, wanted != stored


def apply_recipe(
    lr: LoadedRecipe,
    out: Path,
    overwrite: bool = False,
    report: Reporter = lambda _step: None,
    progress=None,
    bars: Bars | None = None,
    evaluate: bool = True,
    in_memory: bool = False,
) -> ApplyResult:
    """Run a recipe end to end and write the verified checkpoint, its evaluation and its card to ``out``.

    ``evaluate=False`` skips the recipe's ``evaluate:`` block (a quick bake; ``bakeedit eval`` can add it later).
    ``bars(description, done, total)`` receives the evaluations' progress. A linear plan is streamed into the
    checkpoint tensor by tensor from the base shards (``export/stream.py``, byte-identical to the in-memory fold);
    ``in_memory=True`` folds the loaded model and saves it instead.
    """
    recipe = lr.recipe
    # -o may not be (or contain) the recipe's, the neurons file's or the base model's folder, nor ., $HOME, /
    out = check_output(out, overwrite, protected_for_recipe(lr))
    siblings = check_export_outputs(lr, out, overwrite)  # export.formats: <OUT>-gguf, -ia3, -lora, checked now too
    timings: dict[str, float] = {}
    if evaluate and recipe.evaluate is not None and recipe.evaluate.tasks:
        try:
            expand_tasks(recipe.evaluate.tasks)  # an unknown task fails now, not after locating and baking
        except BakeeditError as exc:
            raise RecipeError(f"{lr.path}: evaluate.tasks: {exc.args[0]}", hint=exc.hint) from None

    with _timed(timings, "load model", report):
        loaded = load_model(recipe.model)
    with _timed(timings, "locate neurons" if recipe.locate else "read neurons", report):
        neuron_set = resolve_neurons(lr, loaded, progress)
    edit, fit = recipe.edit, None
    if edit.fit is not None:
        with _timed(timings, "fit edit parameters", report):
            edit, fit = fit_edit(edit, neuron_set.neurons, loaded, lr.resolve(edit.fit.data) if edit.fit.data else None)
    plan: EditPlan = build_plan(neuron_set.neurons, edit, loaded.layout, source="neurons")
    if plan.n_neurons == 0:
        raise RecipeError(f"{lr.path}: the neuron set is empty; nothing to edit")
    check_module_supported(loaded.layout, plan)  # before references, evaluations and the bake
    if siblings:  # an artefact the plan cannot become is refused now, not after the bake
        precheck(list(siblings), plan, loaded, gguf_file_of(loaded.source.ref, loaded.source.kind))
    # The adapters are built from the unedited base: keep it while the edited checkpoint is evaluated (a streamed
    # bake leaves it alone; the in-memory fold edits it in place, and the base is then loaded again at the end).
    unedited = loaded.model if any(k in ADAPTER_KINDS for k in siblings) else None

    with _timed(timings, "reference logits (runtime hooks)", report):
        probe = take_probe(loaded, plan, recipe.verify.prompts)  # with and without the hooks: the edit's effect

    eval_spec = recipe.evaluate if evaluate and recipe.evaluate and recipe.evaluate.tasks else None
    before = control = kl_edit = None
    if eval_spec is not None:
        with _timed(timings, "evaluate base and random control", report):
            measured = evaluate_before_fold(loaded, neuron_set, edit, eval_spec, bars, edit_plan=plan)
            before, control, kl_edit = measured.run, measured.control, measured.kl_edit

    with staged_output(out, overwrite) as tmp:
        with _timed(timings, "fold edit into weights", report):
            reshard = recipe.export.max_shard_size is not None  # a new shard layout: save_pretrained writes it
            streamed = stream_for_apply(loaded, plan, tmp, dtype=recipe.model.dtype, in_memory=in_memory or reshard,
                                        trust_remote_code=recipe.model.trust_remote_code, report=report)
            if streamed is None:
                folded = fold_plan(loaded.model, loaded.layout, plan)
                unedited = None  # folded in place
        if streamed is None:
            with _timed(timings, "save checkpoint", report):
                stored, converted = save_dtype(recipe.model.dtype, loaded)
                if stored != loaded.dtype:
                    report(f"saving in {_dtype_name(stored)}, " + (
                        "as the recipe's model.dtype asks" if converted else "the checkpoint's stored dtype") +
                        f" (the model ran in {_dtype_name(loaded.dtype)})")
                base = Path(loaded.source.path)
                save_checkpoint(  # the base's non-weight files, as the streaming bake carries them
                    loaded.model, loaded.tokenizer, tmp, recipe.export.max_shard_size or DEFAULT_MAX_SHARD_SIZE,
                    base_folder=base, dtype=stored, base_files=carried_files(base)[0], converted=converted,
                )
                module = write_custom_module(tmp, loaded.model, loaded.layout, plan) if plan.module_groups else None
        else:  # streamed tensor by tensor from the base shards: same layout, the stored dtype kept
            folded, module, stored = streamed.folded, None, streamed.stored_dtype
        with _timed(timings, "verify (reload + compare)", report):
            verification, reloaded = verify_against_runtime(
                probe, tmp, loaded, plan, recipe.verify.tolerance, stored,
                "stream" if streamed is not None else "in-memory",
            )
        loaded.model = reloaded  # from here on, the model is the checkpoint exactly as users will load it
        report(_verification_line(verification))
        if not verification.passed:
            raise VerificationError(
                f"the saved checkpoint differs from the runtime edit: {'; '.join(verification.failures())}",
                hint="nothing was written; run with --debug and report the recipe if this is float32",
            )
        neuron_set = _portable_neurons(neuron_set, loaded, out)  # no absolute local path in a published file
        neuron_set.save(tmp / NEURONS_FILE)
        (tmp / RECIPE_FILE).write_text(lr.text)
        evaluation = None
        if eval_spec is not None and before is not None:
            with _timed(timings, "evaluate edited checkpoint", report):
                after = evaluate_edited(reloaded, loaded.tokenizer, plan.n_neurons, neuron_set.method, eval_spec, bars,
                                        kl=kl_edit)
                evaluation = write_evaluation(tmp, merge_runs(before, after), control)
        provenance = Provenance(
            recipe=RecipeInfo(
                path=lr.path.name, sha256=lr.sha256, text=lr.text,  # the name: no local path in a public file
                data=_recipe_record(lr),
            ),
            base_model=BaseModelInfo(
                ref=local_ref_for(loaded.source.ref, loaded.source.kind, out), kind=loaded.source.kind,
                hub_id=loaded.source.base_model,
                revision=loaded.source.revision, license=loaded.source.license,
                input_sha256=loaded.source.hash_inputs(), weights=loaded.source.weights,
            ),
            neurons=neuron_set,
            plan=plan,
            edit_form=plan.edit_form,
            folded_tensors=[f.name for f in folded],
            custom_module=module,
            fit=_fit_record(fit),
            dtype=_dtype_name(stored),  # as stored, whatever the model ran in (verification.runtime_dtype)
            baked_by="stream" if streamed is not None else "in-memory",
            verification=verification,
            files_sha256=hash_written_files(tmp),
            timings_s=timings,
            evaluation=evaluation,
        )
        write_provenance(tmp, provenance)
        with _timed(timings, "write model card", report):  # the card and heat map join the manifest
            write_card(tmp, local_name=out.name, check=False)
        provenance = read_provenance(tmp)
    exports = write_exports(lr, siblings, out, provenance, plan, loaded, unedited, overwrite, report, timings)
    return ApplyResult(out=out, provenance=provenance, timings_s=timings, exports=exports)


#: Recipe fields ``load_recipe`` makes absolute; ``bakeedit.json`` records them as the recipe file spells them.
_RECIPE_PATHS = (("model", "id"), ("neurons_file",), ("edit", "fit", "data"), ("evaluate", "data_dir"))


def _recipe_record(lr: LoadedRecipe) -> dict:
    """The recipe as run (with ``--eval-limit``), its paths as written in the file (relative to the recipe),
    not as resolved on this machine: the record is published, and its edit must equal the text's."""
    import yaml


    data = lr.recipe.model_dump(mode="json", by_alias=True, exclude_none=True)
    written = parse_recipe(yaml.safe_load(lr.text), lr.path.name).model_dump(mode="json", by_alias=True,
                                                                             exclude_none=True)
    for keys in _RECIPE_PATHS:
        source, target = written, data
        for key in keys[:-1]:
            source, target = source.get(key) or {}, target.get(key)
            if not isinstance(target, dict):
                break
        else:
            if keys[-1] in source:
                target[keys[-1]] = source[keys[-1]]
    return data


def _portable_neurons(neuron_set: NeuronSet, loaded: LoadedModel, out: Path) -> NeuronSet:
    return portable_neuron_set(neuron_set, loaded.source.ref, loaded.source.kind, out)


def _fit_record(fit: FitReport | None) -> dict | None:
    """The fit as recorded: every point tried; its data file by name only (the record is published)."""
    if fit is None:
        return None
    record = fit.model_dump(mode="json")
    record["data"] = portable_params(record.get("data") or {})
    return record


def verify_output(folder: Path, base: str | None = None, tolerance: float | None = None) -> VerificationResult:
    """Re-run the verification of a written folder: the manifest (every file, the record's own digest, the plan
    against the recipe: ``provenance.check_folder``), then baked vs runtime-hooked base logits."""
    folder = Path(folder)
    provenance = check_folder(folder)
    loaded = load_model(recorded_base_spec(provenance, folder, base))  # the recipe's model, on this machine
    prompts = provenance.recipe.data.get("verify", {}).get("prompts")
    probe = take_probe(loaded, provenance.plan, prompts)
    result, _ = verify_against_runtime(probe, folder, loaded, provenance.plan, tolerance,
                                       getattr(torch, provenance.dtype), provenance.baked_by)
    return result


def _verification_line(result: VerificationResult) -> str:
    """One line for the apply output: both legs, with the numbers the power rule compared."""
    effect = "not measured" if result.edit_effect is None else f"{result.edit_effect:.3g}"
    exact = f"{result.exact} ({result.exact_tensors_compared} tensors)" if result.exact != "not run" else (
        f"not run: {result.exact_note}")
    return (f"verification {'passed' if result.passed else 'FAILED'}: max |delta logit| "
            f"{result.max_abs_logit_delta:.3g} (tolerance {result.tolerance:.3g}, {result.dtype}), edit effect "
            f"{effect} (power rule {result.power}), exact leg {exact}" +
            "".join(f"; {note}" for note in result.notes))
