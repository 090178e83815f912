"""The evaluation step of ``bakeedit apply``: base model, the baked checkpoint, and a random-neuron control.

Base and control are scored on the base weights before the fold (the control through runtime hooks: a random set
with the located set's per-layer/per-site counts, given the same edit); the edited model is the checkpoint reloaded
from the staged folder, i.e. exactly what users will load. All three score the same sampled items (same tasks,
limit and seed), so differences are paired. Without the control no debiasing claim stands, so it is on by default.

Under torchrun every evaluation splits its requests over the ranks (``evaluate/sharded.py``); what only one number
decides (the matched control's scale) is measured by rank 0 and handed to the others, so all score the same models.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bakeedit import parallel
from bakeedit.edit import EditPlan, build_plan
from bakeedit.evaluate.disturbance import Disturbance
from bakeedit.evaluate.report import PLOTS_DIR, REPORT_FILE, RESULTS_FILE, write_results
from bakeedit.evaluate.runner import EvalRun, evaluate_models, with_runtime_edit
from bakeedit.export.manifest import check_folder, refresh_manifest
from bakeedit.export.provenance import PROVENANCE_FILE
from bakeedit.locate.random import random_like
from bakeedit.models.load import LoadedModel
from bakeedit.neurons import NeuronSet
from bakeedit.recipe import EditSpec, EvaluateSpec
from bakeedit.workflows.matched_control import REL_TOL, MatchedControl, match_control

CONTROL_NEURONS_FILE = "neurons-random.json"
Bars = Callable[[str, int, int], None]


def control_set(neuron_set: NeuronSet, loaded: LoadedModel, seed: int) -> NeuronSet:
    """A random set with the located set's exact per-(layer, site) counts, avoiding its neurons."""
    control = random_like(neuron_set, loaded.layout, seed)
    control.model_id, control.model_revision = neuron_set.model_id, neuron_set.model_revision
    return control


def with_plan_lambdas(neuron_set: NeuronSet, plan: EditPlan) -> NeuronSet:
    """``neuron_set`` with each neuron of a linear scale of ``plan`` (folded or position-scoped) carrying its lambda.

    A neuron's own lambda keeps its rule's positions (``edit/plan.py``), so the written control set rebuilds the
    scaled plan exactly."""
    lambdas = {(g.layer, g.site, i): lam for g in plan.groups for i, lam in zip(g.indices, g.lambdas, strict=True)}
    lambdas |= {(g.layer, g.site, i): lam for g in plan.module_groups if g.map == "scale"
                for i, lam in zip(g.indices, g.params["lambda"], strict=True)}
    neurons = [n.model_copy(update={"lambda_": lambdas[n.address]}) if n.address in lambdas else n
               for n in neuron_set.neurons]
    return neuron_set.model_copy(update={"neurons": neurons})


def control_matching(matched: MatchedControl) -> str:
    """How the control's strength was set, for the report's description of it (the truth, also when unmatched)."""
    kls = f"KL {matched.kl_control:.3g} vs the edit's {matched.kl_edit:.3g} nats/token"
    if not matched.scalable:
        within = (f"within {REL_TOL:.0%} of the edit's KL by chance, not by matching" if matched.matched
                  else "not KL-matched")
        return f"the edit's own nonlinear parameters (no lambda to scale, so the control is {within}: {kls})"
    return (f"lambdas scaled by t = {matched.scale:.3g} so that the control disturbs the model as much as the edit "
            f"({kls}{'' if matched.matched else ', the closest reachable: not KL-matched'}; with the edit's own "
            f"lambdas: {matched.kl_same_lambda:.3g})")


def control_model(loaded: LoadedModel, control: NeuronSet, edit: EditSpec, source: str,
                  matched_to: EditPlan | None = None) -> tuple[Any, EditPlan, MatchedControl | None]:
    """The random control as an evaluable model: ``edit`` applied to ``control``'s neurons of the unedited base by
    runtime hooks. The one builder for ``apply``'s control and ``bakeedit eval --control``. With ``matched_to`` (the
    edit's plan) its lambdas are scaled until it disturbs the model as much as that edit (``matched_control.py``)."""
    plan = build_plan(control.neurons, edit, loaded.layout, source=source)
    matched = None
    if matched_to is not None:  # torchrun: rank 0 measures, every rank scores the same control (not a near one)
        matched = parallel.from_main(match_control(Disturbance(loaded.model, loaded.layout, loaded.tokenizer),
                                                   matched_to, control, plan) if parallel.is_main() else None)
        plan = matched.plan
    return with_runtime_edit(loaded, plan), plan, matched


def _run(models: Mapping[str, Any], spec: EvaluateSpec, bars: Bars | None, descriptions: dict) -> EvalRun:
    return evaluate_models(
        models, spec.tasks, data_dir=spec.data_dir, limit=spec.limit, seed=spec.seed, progress=bars,
        descriptions=descriptions, split=spec.split,
    )


@dataclass
class BeforeFold:
    """What is measured on the unedited weights: base and control scores, the control set, the disturbances."""

    run: EvalRun
    control: NeuronSet | None
    kl_edit: float | None = None  # mean KL of the edit from the base on neutral text (nats per token)
    matched: MatchedControl | None = None


def evaluate_before_fold(
    loaded: LoadedModel, neuron_set: NeuronSet, edit: EditSpec, spec: EvaluateSpec, bars: Bars | None = None,
    edit_plan: EditPlan | None = None,
) -> BeforeFold:
    """Score the base model and (if ``spec.control``) the random control on the unedited weights.

    With ``control_match: kl`` (the default) and the edit's ``edit_plan``, the control's lambdas are scaled until it
    disturbs the model as much as the edit does (``workflows/matched_control.py``); both disturbances are recorded.
    """
    models: dict[str, Any] = {"base": loaded}
    name = loaded.source.base_model or loaded.source.ref
    descriptions: dict[str, dict[str, Any]] = {
        "base": {"ref": loaded.source.ref, "description": f"base model `{name}`"}}
    control, matched, kl_edit = None, None, None
    if spec.control:
        control = control_set(neuron_set, loaded, spec.seed)
        match = spec.control_match == "kl" and edit_plan is not None and loaded.tokenizer is not None
        models["control"], plan, matched = control_model(loaded, control, edit, "control",
                                                         matched_to=edit_plan if match else None)
        what = f"{plan.n_neurons} random neurons (same layer/site counts, seed {spec.seed})"
        if matched is not None:
            kl_edit = matched.kl_edit
            control = with_plan_lambdas(control, plan)  # neurons-random.json then describes the control exactly
            descriptions["control"] = {
                "description": f"base + {what}, {control_matching(matched)}",
                "kl": matched.kl_control, "control_scale": matched.scale, "kl_same_lambda": matched.kl_same_lambda,
                "kl_matched": matched.matched,
            }
        else:
            descriptions["control"] = {"description": f"base + the same edit on {what}"}
        descriptions["control"].update(ref=loaded.source.ref, neurons=CONTROL_NEURONS_FILE)
    return BeforeFold(_run(models, spec, bars, descriptions), control, kl_edit, matched)


def evaluate_edited(model: Any, tokenizer: Any, n_neurons: int, method: str, spec: EvaluateSpec,
                    bars: Bars | None = None, kl: float | None = None) -> EvalRun:
    """Score the baked checkpoint (reloaded from disk); ``kl``: its disturbance, measured before the fold."""
    descriptions: dict[str, dict[str, Any]] = {
        "edited": {"description": f"the baked checkpoint ({n_neurons} {method} neurons)"}}
    if kl is not None:
        descriptions["edited"]["kl"] = kl
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
        "split": run.config.get("split", "all"), "labels": list(run.results), "skipped": run.skipped,
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
