"""``bakeedit apply`` for a model that does not fit in memory, and the choice of that path.

The full-model path (``workflows/apply.py``) loads the base, takes probe logits, bakes, and reloads the baked folder
to compare: memory for one whole model, in the dtype it runs in (float32 on CPU: twice a bf16 checkpoint). A 70B
model on a 64 GB workstation cannot take it. This path never instantiates a full-depth model:

* the config, the layout (``ModelLayout.for_config``) and the neurons (a list or a ``neurons.json``) are read without
  weights; a ``locate:`` method runs on a *blockwise* model (``models/lazy.py``: parameters on the meta device, each
  block read from the shards just before its forward and released after);
* the bake is streamed tensor by tensor from the base shards (``export/stream.py``), byte-identical to the
  full-model path's streamed bake;
* it is verified block by block (``export/verify_blocks.py``): every tensor bit-exact against the fold of the base's,
  and each edited block, as baked, against the base block with the edit's hooks (memory: one block);
* an ``evaluate:`` block scores base, control and edited on blockwise models (the edited one reads the staged
  folder).

:func:`choose_path` decides, before any weight is read: ``--low-memory``, or the checkpoint in the dtype it would run
in does not fit in available memory (``models.lazy.fits_in_memory``) and nothing in the recipe needs the model in
memory (a nonlinear edit's custom module, ``edit.fit``, re-sharding, peft adapters). The choice and its reason are
reported and recorded in ``bakeedit.json`` (``execution``). :func:`verify_output_blocks` is ``bakeedit verify
--blocks``: the same block check of a written folder against its recorded base.
"""

from __future__ import annotations

from pathlib import Path

import torch

from bakeedit import parallel
from bakeedit.edit import EditPlan, build_plan
from bakeedit.errors import EditError, ModelLoadError, RecipeError, VerificationError
from bakeedit.export.card import write_card
from bakeedit.export.manifest import check_folder
from bakeedit.export.provenance import (
    BaseModelInfo,
    ExecutionInfo,
    Provenance,
    RecipeInfo,
    hash_written_files,
    local_ref_for,
    read_provenance,
    write_provenance,
)
from bakeedit.export.stream import edited_dtype, load_config, stream_bake, streaming_blocker
from bakeedit.export.verify import VerificationResult
from bakeedit.export.verify_blocks import verify_blocks
from bakeedit.io.hashing import BackgroundHashes
from bakeedit.io.shards import Checkpoint, is_safetensors_checkpoint
from bakeedit.io.staging import staged_output
from bakeedit.models.arch import ModelLayout
from bakeedit.models.custom import is_custom_module
from bakeedit.models.lazy import fits_in_memory, lazy_model
from bakeedit.models.load import (
    LoadedModel,
    ModelSource,
    check_architecture,
    load_model,
    read_config_json,
    resolve_device,
    resolve_dtype,
    resolve_source,
    stored_dtype,
)
from bakeedit.recipe import EditSpec, LoadedRecipe
from bakeedit.workflows.apply_eval import evaluate_before_fold, evaluate_edited, merge_runs, write_evaluation
from bakeedit.workflows.apply_steps import (
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
from bakeedit.workflows.export import ADAPTER_KINDS, gguf_file_of, precheck, recorded_base_spec, write_exports

FULL_MODEL = "full-model"
LOW_MEMORY = "low-memory"


# ------------------------------------------------------------------------------------------------ the choice


def _linear_edit(edit: EditSpec) -> bool:
    """Whether every rule of ``edit`` is a linear scale at all positions (what streaming can fold). Read from the
    recipe, before any neuron is known; the plan itself is checked again once built (``streaming_blocker``)."""
    if edit.type != "scale" or edit.positions != "all":
        return False
    return not any(o.type == "nonlinear" or o.map is not None or o.positions not in (None, "all")
                   for o in edit.overrides)


def low_memory_blocker(lr: LoadedRecipe, source: ModelSource, siblings: dict[str, Path], *,
                       in_memory: bool = False) -> str | None:
    """Why this recipe cannot run without the whole model in memory, as a phrase, or ``None`` when it can."""
    recipe = lr.recipe
    if in_memory:
        return "--in-memory folds the loaded model"
    if parallel.ranks().world_size > 1:
        return "under torchrun the ranks share a model in memory; the low-memory path runs in one process"
    if recipe.model.device_map:
        return "model.device_map places the whole model over devices (accelerate), which is its own way to fit"
    if is_custom_module(source.path):
        return "the base is a bakeedit custom-module checkpoint, loaded only with its own code"
    if not is_safetensors_checkpoint(source.path):
        return f"{source.path} is not a folder of safetensors shards, which the stream reads"
    if not _linear_edit(recipe.edit):
        return "the edit is nonlinear or position-scoped: its custom module is written from the model in memory"
    if recipe.edit.fit is not None:
        return "edit.fit chooses the edit's parameters by running the model in memory"
    if recipe.export.max_shard_size is not None:
        return "export.max_shard_size re-shards the checkpoint, which save_pretrained of the loaded model writes"
    adapters = [k for k in siblings if k in ADAPTER_KINDS]
    if adapters:
        return (f"export.formats {', '.join(adapters)}: the adapters are built and verified on the base model in "
                "memory (bakeedit export can write them later, where the model fits)")
    stored = stored_dtype(source.path)
    if recipe.model.dtype != "auto" and stored is not None and getattr(torch, recipe.model.dtype) != stored:
        return (f"model.dtype {recipe.model.dtype} converts the checkpoint (stored in {_name(stored)}); the stream "
                "never does")
    return None


def choose_path(lr: LoadedRecipe, source: ModelSource, siblings: dict[str, Path], *, low_memory: bool = False,
                in_memory: bool = False, report: Reporter = lambda _line: None) -> ExecutionInfo:
    """The path ``bakeedit apply`` takes, and why (recorded as ``bakeedit.json``'s ``execution``).

    ``low_memory`` (``--low-memory``) insists: a recipe that needs the model in memory is then refused in one line.
    Otherwise the low-memory path is taken when the checkpoint, in the dtype the model would run in, does not fit in
    available memory and the recipe allows it; when it does not fit but the recipe needs it in memory, the full
    path is tried anyway and ``report`` says it may run out of memory."""
    read_config_json(source.path)  # a malformed config.json, named, before the size is weighed from it
    if low_memory and in_memory:
        raise RecipeError("--low-memory and --in-memory exclude each other: one streams the bake, the other folds "
                          "the loaded model")
    blocker = low_memory_blocker(lr, source, siblings, in_memory=in_memory)
    if low_memory:
        if blocker is not None:
            raise RecipeError(f"{lr.path}: --low-memory cannot run this recipe: {blocker}",
                              hint="drop --low-memory where the model fits in memory")
        return ExecutionInfo(path=LOW_MEMORY, reason="--low-memory was given")
    if in_memory:
        return ExecutionInfo(path=FULL_MODEL, reason="--in-memory was given")
    locate = lr.recipe.locate
    if locate is not None and locate.execution == "blockwise":  # the recipe asks for it whatever the size
        if blocker is None:
            return ExecutionInfo(path=LOW_MEMORY, reason="the recipe's locate.execution is blockwise")
        report(f"warning: locate.execution is blockwise, but {blocker}: the model is loaded in full")
    fits, why = fits_in_memory(source.path, _run_dtype(lr, source))
    if fits:
        return ExecutionInfo(path=FULL_MODEL, reason=why)
    if blocker is None:
        return ExecutionInfo(path=LOW_MEMORY, reason=why)
    reason = f"{why}, but {blocker}: loading it in full anyway (it may run out of memory)"
    report(f"warning: {reason}")
    return ExecutionInfo(path=FULL_MODEL, reason=reason)


def _run_dtype(lr: LoadedRecipe, source: ModelSource) -> torch.dtype:
    """The dtype the full-model path would run the model in (``auto``: float32 on CPU, which doubles a bf16
    checkpoint): what has to fit."""
    model = lr.recipe.model
    try:
        config = load_config(source.path, model.trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError):  # load_model reports a bad config, naming the file
        return stored_dtype(source.path) or torch.float32
    return resolve_dtype(model.dtype, config, resolve_device(model.device))


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ------------------------------------------------------------------------------------------------ the path


def _weightless(lr: LoadedRecipe, source: ModelSource) -> tuple[LoadedModel, object]:
    """The base as far as this path knows it without weights: layout, source and run dtype (``model`` is ``None``,
    and no tokenizer: nothing here runs the full model). Returns the config too."""
    spec = lr.recipe.model
    read_config_json(source.path)  # a malformed config.json, named, before transformers trips over it
    try:
        config = load_config(source.path, spec.trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelLoadError(f"model.id: cannot read {source.path / 'config.json'}: {first}") from exc
    check_architecture(config, spec.arch)
    layout = ModelLayout.for_config(config, arch=spec.arch)
    dtype = resolve_dtype(spec.dtype, config, resolve_device(spec.device))
    return LoadedModel(model=None, tokenizer=None, layout=layout, source=source, dtype=dtype), config  # type: ignore[arg-type]


def _blockwise(lr: LoadedRecipe, source: ModelSource) -> LoadedModel:
    """The base as a blockwise model (meta parameters; each block read from the shards for its forward only)."""
    return load_model(lr.recipe.model, source, execution="blockwise")


def apply_low_memory(
    lr: LoadedRecipe,
    out: Path,
    source: ModelSource,
    execution: ExecutionInfo,
    siblings: dict[str, Path],
    *,
    overwrite: bool = False,
    report: Reporter = lambda _step: None,
    progress=None,
    bars: Bars | None = None,
    evaluate: bool = True,
) -> ApplyResult:
    """``apply_recipe`` on the low-memory path (module docstring): ``out`` and ``siblings`` were checked by the
    caller, ``execution`` is :func:`choose_path`'s answer. Memory: a few streamed blocks, or one model block."""
    recipe = lr.recipe
    report(f"low-memory path: {execution.reason}; the bake is streamed and verified block by block")
    timings: dict[str, float] = {}
    eval_spec = recipe.evaluate if evaluate and recipe.evaluate and recipe.evaluate.tasks else None
    with timed(timings, "read config", report):
        loaded, config = _weightless(lr, source)
    if recipe.locate is not None or eval_spec is not None:
        with timed(timings, "open blockwise model", report):
            loaded = _blockwise(lr, source)
    with timed(timings, "locate neurons (blockwise)" if recipe.locate else "read neurons", report):
        neuron_set = resolve_neurons(lr, loaded, progress)
    plan: EditPlan = build_plan(neuron_set.neurons, recipe.edit, loaded.layout, source="neurons")
    if plan.n_neurons == 0:
        raise RecipeError(f"{lr.path}: the neuron set is empty; nothing to edit")
    blocker = streaming_blocker(source.path, plan, recipe.model.dtype, recipe.model.trust_remote_code, loaded.layout)
    if blocker is not None:
        raise RecipeError(f"{lr.path}: the low-memory path ({execution.reason}) cannot stream this bake: {blocker}",
                          hint="where the model fits in memory, run with --in-memory")
    if siblings:  # gguf only (the adapters were refused by choose_path): its types are checked before the bake
        precheck(list(siblings), plan, loaded, gguf_file_of(source.ref, source.kind))

    before = control = kl_edit = None
    if eval_spec is not None:
        with timed(timings, "evaluate base and random control (blockwise)", report):
            measured = evaluate_before_fold(loaded, neuron_set, recipe.edit, eval_spec, bars, edit_plan=plan)
            before, control, kl_edit = measured.run, measured.control, measured.kl_edit

    with staged_output(out, overwrite) as tmp:
        with timed(timings, "fold edit into weights (stream)", report), BackgroundHashes() as hashes:
            # each base shard just read and baked shard just written is hashed on the other core meanwhile (from
            # the page cache): bakeedit.json needs both digests, and equal digests spare the exact leg a re-read
            folded = stream_bake(source.path, plan, tmp, layout=loaded.layout,
                                 trust_remote_code=recipe.model.trust_remote_code, report=report,
                                 on_shard=lambda base, baked: (hashes.add(base), hashes.add(baked)))
            stored = edited_dtype(source.path, plan, loaded.layout)
            digests = hashes.result()
        base_digests = {p.name: d for p, d in digests.items() if p.parent == Path(source.path)}
        baked_digests = {p.name: d for p, d in digests.items() if p.parent == Path(tmp)}
        source.file_hashes.update(base_digests)
        same = {name for name, d in baked_digests.items() if base_digests.get(name) == d}
        with timed(timings, "verify (block by block)", report):
            verification = verify_blocks(source.path, tmp, plan, tolerance=recipe.verify.tolerance,
                                         trust_remote_code=recipe.model.trust_remote_code, layout=loaded.layout,
                                         same_files=same).result
        if recipe.verify.prompts:
            verification.notes.append("verify.prompts are not used: the blocks run on random hidden states")
        report(verification_line(verification))
        if not verification.passed:
            raise VerificationError(
                f"the streamed checkpoint differs from the runtime edit: {'; '.join(verification.failures())}",
                hint="nothing was written; run with --debug and report the recipe",
            )
        neuron_set = portable_neurons(neuron_set, loaded, out)
        neuron_set.save(tmp / NEURONS_FILE)
        (tmp / RECIPE_FILE).write_text(lr.text)
        evaluation = None
        if eval_spec is not None and before is not None:
            tokenizer, device = loaded.tokenizer, loaded.device
            release_model(loaded)  # the base's blockwise model: the edited one reads the staged folder
            with timed(timings, "evaluate edited checkpoint (blockwise)", report):
                edited = lazy_model(tmp, config, loaded.dtype, device,
                                    trust_remote_code=recipe.model.trust_remote_code, arch=recipe.model.arch)
                after = evaluate_edited(edited, tokenizer, plan.n_neurons, neuron_set.method, eval_spec, bars,
                                        kl=kl_edit)
                evaluation = write_evaluation(tmp, merge_runs(before, after), control)
            del edited
        provenance = Provenance(
            recipe=RecipeInfo(path=lr.path.name, sha256=lr.sha256, text=lr.text, data=recipe_record(lr)),
            base_model=BaseModelInfo(
                ref=local_ref_for(source.ref, source.kind, out), kind=source.kind, hub_id=source.base_model,
                revision=source.revision, license=source.license, input_sha256=source.hash_inputs(),
                weights=source.weights,
            ),
            neurons=neuron_set,
            plan=plan,
            edit_form=plan.edit_form,
            folded_tensors=[f.name for f in folded],
            dtype=_name(stored),
            baked_by="stream",
            execution=execution,
            verification=verification,
            files_sha256=hash_written_files(tmp, known=baked_digests),
            timings_s=timings,
            evaluation=evaluation,
        )
        write_provenance(tmp, provenance)
        with timed(timings, "write model card", report):
            write_card(tmp, local_name=out.name, check=False)
        provenance = read_provenance(tmp)
    release_model(loaded)
    exports = write_exports(lr, siblings, out, provenance, plan, loaded, None, overwrite, report, timings)
    return ApplyResult(out=out, provenance=provenance, timings_s=timings, exports=exports)


# ------------------------------------------------------------------------------------------------ verify --blocks


def verify_output_blocks(folder: Path, base: str | None = None, tolerance: float | None = None) -> VerificationResult:
    """``bakeedit verify --blocks``: the manifest check of ``bakeedit verify``, then ``verify_blocks`` of the folder
    against the base its ``bakeedit.json`` records (``base`` overrides where it is), never loading a full model.

    The base's shards are hashed on the other core while the manifest check hashes the folder's, and a shard whose
    digest equals its baked namesake's (which the manifest check has just confirmed) is not read again for its
    untouched tensors: every file is read once, and only the shards that differ twice (as apply does)."""
    folder = Path(folder)
    provenance = check_folder(folder, hash_files=False)  # the record alone: which base, which edit
    plan = provenance.plan
    if plan.kind != "scale" or plan.module_groups:
        raise VerificationError(f"{folder}: --blocks checks folded linear edits; this folder's edit is (partly) a "
                                "custom module, which runs only in the whole model",
                                hint="run bakeedit verify FOLDER without --blocks")
    spec = recorded_base_spec(provenance, folder, base)
    source = resolve_source(spec)
    if not is_safetensors_checkpoint(source.path):
        raise VerificationError(f"{folder}: the base '{spec.id}' is not a folder of safetensors shards, which "
                                "--blocks reads block by block", hint="pass --base with the base's safetensors folder")
    try:
        shards = [shard.path for shard in Checkpoint.open(source.path).shards]
        with BackgroundHashes() as hashes:
            for shard in shards:
                hashes.add(shard)
            provenance = check_folder(folder)  # every file of the folder hashed, meanwhile
            base_digests = {path.name: digest for path, digest in hashes.result().items()}
        same = {name for name, digest in base_digests.items() if provenance.files_sha256.get(name) == digest}
        layout = ModelLayout.for_config(load_config(source.path, spec.trust_remote_code), arch=spec.arch)
        checked = verify_blocks(source.path, folder, plan, tolerance=tolerance, layout=layout,
                                trust_remote_code=spec.trust_remote_code, baked_by=provenance.baked_by,
                                same_files=same)
    except (EditError, ModelLoadError) as exc:
        raise VerificationError(f"{folder}: the block verification could not run: {exc}", hint=exc.hint) from exc
    return checked.result
