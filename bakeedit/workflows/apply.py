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

Under torchrun every rank locates and evaluates its share (``bakeedit/parallel.py``); only rank 0 bakes, verifies and
writes. It hands the other ranks its staged folder once the folder is verified, and they load that checkpoint to
score their share of its evaluation (:func:`_follow_main`), so every rank scores the very weights that are saved.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from bakeedit import parallel
from bakeedit.edit import EditPlan, build_plan, fold_plan, runtime_edit
from bakeedit.edit.fit import FitReport
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
from bakeedit.models.arch import ModelLayout
from bakeedit.models.custom import is_custom_module
from bakeedit.models.embedded import cache_root
from bakeedit.models.load import LoadedModel, load_model, resolve_source, stored_dtype
from bakeedit.recipe import EvaluateSpec, LoadedRecipe
from bakeedit.workflows.apply_eval import evaluate_before_fold, evaluate_edited, merge_runs, write_evaluation
from bakeedit.workflows.apply_low_memory import LOW_MEMORY, apply_low_memory, choose_path
from bakeedit.workflows.apply_steps import (
    DEFAULT_MAX_SHARD_SIZE,
    NEURONS_FILE,
    RECIPE_FILE,
    ApplyResult,
    Bars,
    Reporter,
    portable_neurons,
    recipe_record,
    release_model,
    resolve_neurons,
    timed,
    verification_line,
)
from bakeedit.workflows.export import (
    check_export_outputs,
    gguf_file_of,
    precheck,
    recorded_base_spec,
    write_exports,
)
from bakeedit.workflows.fit_cache import cached_fit_edit
from bakeedit.workflows.outputs import protected_for_recipe


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
    custom = is_custom_module(folder)  # bakeedit wrote its code, and verify_output checked its hash first
    device = loaded.device
    release_model(loaded)  # the probe's logits are taken: never the base and the baked model at once
    reloaded = load_baked(folder, loaded.dtype, device)
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


def load_baked(folder: Path, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """``folder``'s checkpoint as its users load it: plain ``from_pretrained`` (with ``trust_remote_code`` for a
    custom module bakeedit wrote), in ``dtype`` (the dtype the base ran in), on ``device``."""
    from transformers import AutoModelForCausalLM  # start-up time: transformers loads when a model does

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=is_custom_module(folder))
    return model.to(device).eval()


@contextmanager
def _handing_over(needed: bool) -> Iterator[Callable[[Path | None], None]]:
    """Rank 0's side of :func:`_follow_main`: ``hand_over(folder)`` sends the verified staged folder (``None``: it
    failed) and waits until every rank has loaded it; an error before that sends ``None``, so that the other ranks
    stop with an error instead of waiting for a folder that will not come. A no-op without an evaluation to share
    or in a plain run."""
    pending = [needed and parallel.ranks().world_size > 1]

    def hand_over(folder: Path | None) -> None:
        if pending[0]:
            pending[0] = False
            parallel.from_main(None if folder is None else str(folder))
            if folder is not None:
                parallel.barrier()  # every rank has opened the folder before it is renamed into place

    try:
        yield hand_over
    except Exception:
        hand_over(None)
        raise


def _follow_main(loaded: LoadedModel, n_neurons: int, method: str, eval_spec: EvaluateSpec | None,
                 bars: Bars | None, kl: float | None) -> None:
    """A rank other than 0 after the evaluations of the unedited weights: wait for rank 0's verified staged folder,
    load it as rank 0's verification reloaded it, and score its share of the edited checkpoint's evaluation (the
    requests are split in ``evaluate/sharded.py``; rank 0 writes the results)."""
    if eval_spec is None:
        return
    folder = parallel.from_main(None)
    if folder is None:
        raise VerificationError("rank 0 wrote no checkpoint (its error is above); this rank stops too")
    device = loaded.device
    release_model(loaded)  # the base is not needed any more: never two models in memory
    reloaded = load_baked(Path(folder), loaded.dtype, device)
    parallel.barrier()  # rank 0 keeps the staged folder where it is until every rank has loaded it
    evaluate_edited(reloaded, loaded.tokenizer, n_neurons, method, eval_spec, bars, kl=kl)


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
    low_memory: bool = False,
) -> ApplyResult | None:
    """Run a recipe end to end and write the verified checkpoint, its evaluation and its card to ``out``.

    ``evaluate=False`` skips the recipe's ``evaluate:`` block (a quick bake; ``bakeedit eval`` can add it later).
    ``bars(description, done, total)`` receives the evaluations' progress. A linear plan is streamed into the
    checkpoint tensor by tensor from the base shards (``export/stream.py``, byte-identical to the in-memory fold);
    ``in_memory=True`` folds the loaded model and saves it instead. ``low_memory=True`` (or a checkpoint that does
    not fit in memory) takes the path of ``workflows/apply_low_memory.py``: no full model is built. Under
    torchrun, ranks other than 0 return ``None`` once they have taken their part in every evaluation.
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

    source = resolve_source(recipe.model)  # fetched once (a Hub model), whichever path runs
    execution = choose_path(lr, source, siblings, low_memory=low_memory, in_memory=in_memory, report=report)
    if execution.path == LOW_MEMORY:
        return apply_low_memory(lr, out, source, execution, siblings, overwrite=overwrite, report=report,
                                progress=progress, bars=bars, evaluate=evaluate)
    with timed(timings, "load model", report):
        loaded = load_model(recipe.model, source)
    with timed(timings, "locate neurons" if recipe.locate else "read neurons", report):
        neuron_set = resolve_neurons(lr, loaded, progress)
    edit, fit = recipe.edit, None
    if edit.fit is not None:
        with timed(timings, "fit edit parameters", report):
            edit, fit = parallel.from_main(  # torchrun: rank 0 fits, every rank evaluates its choice
                cached_fit_edit(edit, neuron_set.neurons, loaded,
                                lr.resolve(edit.fit.data) if edit.fit.data else None, cache_root() / "fit")
                if parallel.is_main() else None)
    plan: EditPlan = build_plan(neuron_set.neurons, edit, loaded.layout, source="neurons")
    if plan.n_neurons == 0:
        raise RecipeError(f"{lr.path}: the neuron set is empty; nothing to edit")
    check_module_supported(loaded.layout, plan)  # before references, evaluations and the bake
    if siblings:  # an artefact the plan cannot become is refused now, not after the bake
        precheck(list(siblings), plan, loaded, gguf_file_of(loaded.source.ref, loaded.source.kind))

    with timed(timings, "reference logits (runtime hooks)", report):
        # with and without the hooks: the edit's effect (only rank 0 verifies)
        probe = take_probe(loaded, plan, recipe.verify.prompts) if parallel.is_main() else None

    eval_spec = recipe.evaluate if evaluate and recipe.evaluate and recipe.evaluate.tasks else None
    before = control = kl_edit = None
    if eval_spec is not None:
        with timed(timings, "evaluate base and random control", report):
            measured = evaluate_before_fold(loaded, neuron_set, edit, eval_spec, bars, edit_plan=plan)
            before, control, kl_edit = measured.run, measured.control, measured.kl_edit
    if not parallel.is_main():  # torchrun: rank 0 bakes and writes; the others score their share of the result
        _follow_main(loaded, plan.n_neurons, neuron_set.method, eval_spec, bars, kl_edit)
        return None

    with staged_output(out, overwrite) as tmp, _handing_over(eval_spec is not None) as hand_over:
        with timed(timings, "fold edit into weights", report):
            reshard = recipe.export.max_shard_size is not None  # a new shard layout: save_pretrained writes it
            streamed = stream_for_apply(loaded, plan, tmp, dtype=recipe.model.dtype, in_memory=in_memory or reshard,
                                        trust_remote_code=recipe.model.trust_remote_code, report=report)
            if streamed is None:
                folded = fold_plan(loaded.model, loaded.layout, plan)
        if streamed is None:
            with timed(timings, "save checkpoint", report):
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
        with timed(timings, "verify (reload + compare)", report):
            verification, reloaded = verify_against_runtime(
                probe, tmp, loaded, plan, recipe.verify.tolerance, stored,
                "stream" if streamed is not None else "in-memory",
            )
        loaded.model = reloaded  # from here on, the model is the checkpoint exactly as users will load it
        hand_over(tmp if verification.passed else None)
        report(verification_line(verification))
        if not verification.passed:
            raise VerificationError(
                f"the saved checkpoint differs from the runtime edit: {'; '.join(verification.failures())}",
                hint="nothing was written; run with --debug and report the recipe if this is float32",
            )
        neuron_set = portable_neurons(neuron_set, loaded, out)  # no absolute local path in a published file
        neuron_set.save(tmp / NEURONS_FILE)
        (tmp / RECIPE_FILE).write_text(lr.text)
        evaluation = None
        if eval_spec is not None and before is not None:
            with timed(timings, "evaluate edited checkpoint", report):
                after = evaluate_edited(reloaded, loaded.tokenizer, plan.n_neurons, neuron_set.method, eval_spec, bars,
                                        kl=kl_edit)
                evaluation = write_evaluation(tmp, merge_runs(before, after), control)
        provenance = Provenance(
            recipe=RecipeInfo(
                path=lr.path.name, sha256=lr.sha256, text=lr.text,  # the name: no local path in a public file
                data=recipe_record(lr),
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
            execution=execution,
            verification=verification,
            files_sha256=hash_written_files(tmp),
            timings_s=timings,
            evaluation=evaluation,
        )
        write_provenance(tmp, provenance)
        with timed(timings, "write model card", report):  # the card and heat map join the manifest
            write_card(tmp, local_name=out.name, check=False)
        provenance = read_provenance(tmp)
    del reloaded  # the adapters are built from the base, loaded again: one model at a time
    release_model(loaded)
    exports = write_exports(lr, siblings, out, provenance, plan, loaded, None, overwrite, report, timings)
    return ApplyResult(out=out, provenance=provenance, timings_s=timings, exports=exports)


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
