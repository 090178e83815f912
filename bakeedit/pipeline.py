"""``bakeedit apply`` as a library call: recipe -> neurons -> plan -> fold -> save -> verify -> evidence.

Every check that can fail without loading the model (recipe schema, output folder, neuron file) runs first. The
base model is loaded once: reference logits are taken with the edit applied by hooks, then the same weights are
folded in place and saved into a staged folder, which is reloaded with plain ``from_pretrained`` and compared. Only a
verified folder is renamed into place.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bakeedit.edit import EditPlan, build_plan, fold_plan, runtime_edit
from bakeedit.errors import RecipeError, VerificationError
from bakeedit.export.provenance import (
    BaseModelInfo,
    Provenance,
    RecipeInfo,
    hash_written_files,
    write_provenance,
)
from bakeedit.export.save import save_checkpoint
from bakeedit.export.staging import check_output, staged_output
from bakeedit.export.verify import (
    VerificationResult,
    compare_logits,
    probe_inputs,
    probe_logits,
    prompts_digest,
)
from bakeedit.locate import LocateContext, run_locate
from bakeedit.models.embedded import cache_root
from bakeedit.models.load import LoadedModel, load_model
from bakeedit.neurons import NeuronSet
from bakeedit.recipe import LoadedRecipe

NEURONS_FILE = "neurons.json"
RECIPE_FILE = "recipe.yaml"

Reporter = Callable[[str], None]


@dataclass
class ApplyResult:
    out: Path
    provenance: Provenance
    timings_s: dict[str, float] = field(default_factory=dict)


@contextmanager
def _timed(timings: dict[str, float], step: str, report: Reporter) -> Iterator[None]:
    report(step)
    start = time.perf_counter()
    yield
    timings[step] = round(time.perf_counter() - start, 3)


def resolve_neurons(lr: LoadedRecipe, loaded: LoadedModel, progress=None) -> NeuronSet:
    """The recipe's neurons: an explicit list, a neurons.json, or the result of its ``locate:`` method."""
    recipe = lr.recipe
    if recipe.neurons is not None:
        return NeuronSet(
            method="explicit",
            params={"recipe": str(lr.path)},
            model_id=loaded.source.base_model or loaded.source.ref,
            model_revision=loaded.source.revision,
            neurons=recipe.neurons,
        )
    if recipe.neurons_file is not None:
        path = lr.resolve(recipe.neurons_file)
        if not path.is_file():
            raise RecipeError(f"{lr.path}: neurons_file: no such file '{path}'")
        return NeuronSet.load(path)
    assert recipe.locate is not None
    ctx = LocateContext(cache_dir=cache_root() / "locate", progress=progress, base_dir=lr.path.parent)
    return run_locate(recipe.locate, loaded, ctx, source=str(lr.path))


def verify_against_runtime(
    reference: torch.Tensor, folder: Path, loaded: LoadedModel, tolerance: float | None, prompts, inputs
) -> tuple[VerificationResult, torch.nn.Module]:
    """Reload ``folder`` with plain transformers and compare its probe logits with ``reference``.

    Returns the reloaded model too: it is the checkpoint as users will load it, so evaluations use it.
    """
    from transformers import AutoModelForCausalLM

    device = loaded.device
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=loaded.dtype).to(device).eval()
    candidate = probe_logits(reloaded, inputs)
    result = compare_logits(
        reference, candidate, loaded.dtype, tolerance, int(inputs["input_ids"].shape[0]),
        prompts_digest(prompts, loaded.tokenizer),
    )
    return result, reloaded


def apply_recipe(
    lr: LoadedRecipe,
    out: Path,
    overwrite: bool = False,
    report: Reporter = lambda _step: None,
    progress=None,
) -> ApplyResult:
    """Run a recipe end to end and write the verified checkpoint to ``out``."""
    recipe = lr.recipe
    out = check_output(out, overwrite)
    timings: dict[str, float] = {}

    with _timed(timings, "load model", report):
        loaded = load_model(recipe.model)
    with _timed(timings, "locate neurons" if recipe.locate else "read neurons", report):
        neuron_set = resolve_neurons(lr, loaded, progress)
    plan: EditPlan = build_plan(neuron_set.neurons, recipe.edit, loaded.layout, source="neurons")
    if plan.n_neurons == 0:
        raise RecipeError(f"{lr.path}: the neuron set is empty; nothing to edit")

    prompts = recipe.verify.prompts
    inputs = probe_inputs(loaded.tokenizer, prompts, loaded.model.config)
    with _timed(timings, "reference logits (runtime hooks)", report), runtime_edit(
        loaded.model, loaded.layout, plan
    ):
        reference = probe_logits(loaded.model, inputs)

    with staged_output(out, overwrite) as tmp:
        with _timed(timings, "fold edit into weights", report):
            folded = fold_plan(loaded.model, loaded.layout, plan)
        with _timed(timings, "save checkpoint", report):
            save_checkpoint(
                loaded.model, loaded.tokenizer, tmp, recipe.export.max_shard_size, base_folder=loaded.source.path
            )
        with _timed(timings, "verify (reload + compare)", report):
            verification, reloaded = verify_against_runtime(
                reference, tmp, loaded, recipe.verify.tolerance, prompts, inputs
            )
        loaded.model = reloaded  # from here on, the model is the checkpoint exactly as users will load it
        if not verification.passed:
            raise VerificationError(
                f"the saved checkpoint differs from the runtime edit: max |delta logit| "
                f"{verification.max_abs_logit_delta:.3g} > tolerance {verification.tolerance:.3g}",
                hint="nothing was written; run with --debug and report the recipe if this is float32",
            )
        neuron_set.save(tmp / NEURONS_FILE)
        (tmp / RECIPE_FILE).write_text(lr.text)
        provenance = Provenance(
            recipe=RecipeInfo(
                path=str(lr.path), sha256=lr.sha256, text=lr.text,
                data=recipe.model_dump(mode="json", by_alias=True, exclude_none=True),
            ),
            base_model=BaseModelInfo(
                ref=loaded.source.ref, kind=loaded.source.kind, hub_id=loaded.source.base_model,
                revision=loaded.source.revision, license=loaded.source.license,
                input_sha256=loaded.source.hash_inputs(),
            ),
            neurons=neuron_set,
            plan=plan,
            folded_tensors=[f.name for f in folded],
            dtype=str(loaded.dtype).removeprefix("torch."),
            verification=verification,
            files_sha256=hash_written_files(tmp),
            timings_s=timings,
        )
        write_provenance(tmp, provenance)
    return ApplyResult(out=out, provenance=provenance, timings_s=timings)


def verify_output(folder: Path, base: str | None = None, tolerance: float | None = None) -> VerificationResult:
    """Re-run the verification of a written folder: file hashes, then baked vs runtime-hooked base logits."""
    from bakeedit.export.provenance import check_file_hashes, read_provenance
    from bakeedit.recipe import ModelSpec

    folder = Path(folder)
    provenance = read_provenance(folder)
    changed = check_file_hashes(folder, provenance)
    if changed:
        raise VerificationError(
            f"{folder}: files changed since they were written: {', '.join(changed)}",
            hint="re-run bakeedit apply; do not edit a baked folder by hand",
        )
    spec = ModelSpec.model_validate(provenance.recipe.data["model"])
    ref = base or provenance.base_model.ref
    recipe_dir = Path(provenance.recipe.path).parent
    if base is None and provenance.base_model.kind == "local" and not Path(ref).is_absolute():
        ref = str(recipe_dir / ref)
    spec = spec.model_copy(update={"id": ref, "dtype": provenance.dtype})
    loaded = load_model(spec)
    prompts = provenance.recipe.data.get("verify", {}).get("prompts")
    inputs = probe_inputs(loaded.tokenizer, prompts, loaded.model.config)
    with runtime_edit(loaded.model, loaded.layout, provenance.plan):
        reference = probe_logits(loaded.model, inputs)
    result, _ = verify_against_runtime(reference, folder, loaded, tolerance, prompts, inputs)
    return result
