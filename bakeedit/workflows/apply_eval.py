"""The evaluation step of ``bakeedit apply``: base model, the baked checkpoint, and a random-neuron control.

Base and control are scored on the base weights before the fold (the control through runtime hooks: a random set
with the located set's per-layer/per-site counts, given the same edit); the edited model is the checkpoint reloaded
from the staged folder, i.e. exactly what users will load. All three score the same sampled items (same tasks,
limit and seed), so differences are paired. Without the control no debiasing claim stands, so it is on by default.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from bakeedit.edit import EditPlan, build_plan
from bakeedit.evaluate.report import PLOTS_DIR, REPORT_FILE, RESULTS_FILE, write_results
from bakeedit.evaluate.runner import EvalRun, evaluate_models, with_runtime_edit
from bakeedit.export.manifest import check_folder, refresh_manifest
from bakeedit.export.provenance import PROVENANCE_FILE
from bakeedit.locate.random import random_like
from bakeedit.models.load import LoadedModel
from bakeedit.neurons import NeuronSet
from bakeedit.recipe import EditSpec, EvaluateSpec

CONTROL_NEURONS_FILE = "neurons-random.json"
Bars = Callable[[str, int, int], None]


def control_set(neuron_set: NeuronSet, loaded: LoadedModel, seed: int) -> NeuronSet:
    """A random set with the located set's exact per-(layer, site) counts, avoiding its neurons."""
    control = random_like(neuron_set, loaded.layout, seed)
    control.model_id, control.model_revision = neuron_set.model_id, neuron_set.model_revision
    return control


def control_model(loaded: LoadedModel, control: NeuronSet, edit: EditSpec, source: str) -> tuple[Any, EditPlan]:
    """The random control as an evaluable model: ``edit`` applied to ``control``'s neurons of the unedited base by
    runtime hooks. The one builder for ``apply``'s control and ``bakeedit eval --control``."""
    plan = build_plan(control.neurons, edit, loaded.layout, source=source)
    return with_runtime_edit(loaded, plan), plan


def _run(models: Mapping[str, Any], spec: EvaluateSpec, bars: Bars | None, descriptions: dict) -> EvalRun:
    return evaluate_models(
        models, spec.tasks, data_dir=spec.data_dir, limit=spec.limit, seed=spec.seed, progress=bars,
        descriptions=descriptions,
    )


def evaluate_before_fold(
    loaded: LoadedModel, neuron_set: NeuronSet, edit: EditSpec, spec: EvaluateSpec, bars: Bars | None = None
) -> tuple[EvalRun, NeuronSet | None]:
    """Score the base model and (if ``spec.control``) the random control on the unedited weights."""
    models: dict[str, Any] = {"base": loaded}
    name = loaded.source.base_model or loaded.source.ref
    descriptions = {"base": {"ref": loaded.source.ref, "description": f"base model `{name}`"}}
    control = None
    if spec.control:
        control = control_set(neuron_set, loaded, spec.seed)
        models["control"], plan = control_model(loaded, control, edit, "control")
        descriptions["control"] = {
            "ref": loaded.source.ref, "neurons": CONTROL_NEURONS_FILE,
            "description": f"base + the same edit on {plan.n_neurons} random neurons (same layer/site counts, "
                           f"seed {spec.seed})",
        }
    return _run(models, spec, bars, descriptions), control


def evaluate_edited(model: Any, tokenizer: Any, n_neurons: int, method: str, spec: EvaluateSpec,
                    bars: Bars | None = None) -> EvalRun:
    """Score the baked checkpoint (reloaded from disk)."""
    descriptions = {"edited": {"description": f"the baked checkpoint ({n_neurons} {method} neurons)"}}
    return _run({"edited": (model, tokenizer)}, spec, bars, descriptions)


def merge_runs(first: EvalRun, second: EvalRun) -> EvalRun:
    """One run with the labels of both (same tasks, limit and seed by construction)."""
    return EvalRun(
        results={**first.results, **second.results},
        skipped={**first.skipped, **second.skipped},
        config=first.config,
        models={**first.models, **second.models},
        timings_s={**first.timings_s, **second.timings_s},
    )


def write_evaluation(folder: Path, run: EvalRun, control: NeuronSet | None) -> dict[str, Any]:
    """Write ``eval/`` (results.json, report.md, plots) and the control neurons; returns the provenance summary."""
    write_results(folder / "eval", run)
    if control is not None:
        control.save(folder / CONTROL_NEURONS_FILE)
    return {
        "results": f"eval/{RESULTS_FILE}", "report": f"eval/{REPORT_FILE}",
        "tasks": run.config.get("tasks"), "limit": run.config.get("limit"), "seed": run.config.get("seed"),
        "labels": list(run.results), "skipped": run.skipped,
        "control_neurons": CONTROL_NEURONS_FILE if control is not None else None,
    }


# ------------------------------------------------------------------ ``bakeedit eval`` writing into a baked folder


def baked_folder_of(out: Path) -> Path | None:
    """The baked folder (one holding ``bakeedit.json``) that ``out`` is, or lies inside; None for other outputs."""
    out = Path(out).expanduser().resolve()
    return next((p for p in (out, *out.parents) if (p / PROVENANCE_FILE).is_file()), None)


def eval_outputs(folder: Path, out: Path) -> tuple[str, ...]:
    """What ``write_results`` writes into ``out``, relative to the baked ``folder`` (``plots/`` as a whole)."""
    rel = Path(out).expanduser().resolve().relative_to(Path(folder).resolve()).as_posix()
    prefix = "" if rel == "." else f"{rel}/"
    return (f"{prefix}{RESULTS_FILE}", f"{prefix}{REPORT_FILE}", f"{prefix}{PLOTS_DIR}/")


def check_before_eval(out: Path) -> Path | None:
    """Before evaluating into a baked folder: every file it does not rewrite must match ``bakeedit.json`` (an
    hour of evaluation is not spent on a folder that cannot be made valid again). Returns the baked folder."""
    folder = baked_folder_of(out)
    if folder is not None:
        check_folder(folder, skip=eval_outputs(folder, out), purpose="refusing to write an evaluation into it")
    return folder


def record_evaluation(folder: Path, out: Path, run: EvalRun) -> None:
    """After ``bakeedit eval`` wrote ``out`` inside the baked ``folder``: re-check every other file, then record the
    new files' hashes and the run's summary in ``bakeedit.json`` (``provenance.refresh_manifest``), so the folder
    stays valid for verify, card and push."""
    written = eval_outputs(folder, out)
    prefix = written[0].removesuffix(RESULTS_FILE)
    summary = {
        "results": f"{prefix}{RESULTS_FILE}", "report": f"{prefix}{REPORT_FILE}", "written_by": "bakeedit eval",
        "tasks": run.config.get("tasks"), "limit": run.config.get("limit"), "seed": run.config.get("seed"),
        "labels": list(run.results), "skipped": run.skipped, "control_neurons": None,
    }
    refresh_manifest(folder, written, update={"evaluation": summary})
