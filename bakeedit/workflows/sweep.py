"""``bakeedit sweep``: evaluate one neuron set at several lambdas and draw the bias-vs-capability trade-off.

No checkpoint is written per lambda: the base model is loaded once and each strength is applied with runtime hooks
(the same hooks the baked weights are verified against), so a sweep costs one model load plus the evaluations. Every
neuron gets the swept lambda (the recipe's overrides and per-neuron lambdas are ignored: a sweep varies one
strength); lambda 1 is the unedited base. The output folder holds ``eval/`` (results.json, report.md and plots of
every lambda, labelled ``lambda=X``), ``sweep.json``, ``sweep.md`` and ``tradeoff.png``.

Under torchrun every rank locates and evaluates its share (``bakeedit/parallel.py``: each evaluation's requests are
split by ``evaluate/sharded.py``), every rank then holds every result, and only rank 0 writes the folder.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from bakeedit import __version__, parallel
from bakeedit.edit import build_plan
from bakeedit.errors import RecipeError
from bakeedit.evaluate.report import ideal_of, primary_metric, write_results
from bakeedit.evaluate.runner import EvalRun, evaluate_models, with_runtime_edit
from bakeedit.evaluate.tasks.base import TaskResult
from bakeedit.io.ownership import check_output
from bakeedit.io.staging import staged_output
from bakeedit.models.load import load_model
from bakeedit.recipe import EditSpec, LoadedRecipe
from bakeedit.workflows.apply_steps import resolve_neurons
from bakeedit.workflows.outputs import protected_for_recipe
from bakeedit.workflows.pareto import SweepPoint, pareto_front, plot_tradeoff


@dataclass(frozen=True)
class Axis:
    """Which task and metric a trade-off axis reads, and how (distance from the ideal, or the raw value)."""

    task: str
    metric: str
    ideal: float | None

    @property
    def label(self) -> str:
        if self.ideal is None:
            return f"{self.task} {self.metric}"
        return f"{self.task} |{self.metric} - {self.ideal:g}|"

    def read(self, results: Sequence[TaskResult]) -> tuple[float, float | None]:
        result = next(r for r in results if r.task == self.task)
        m = result.metrics[self.metric]
        return (abs(m.value - self.ideal) if self.ideal is not None else m.value), m.stderr


def label_of(lam: float) -> str:
    return f"lambda={lam:g}"


def choose_axis(run: EvalRun, kind: str, task: str | None) -> Axis:
    """The named task, or the first evaluated task of ``kind``; its headline metric."""
    first_label = next(iter(run.results))
    candidates = [r for r in run.results[first_label] if (r.task == task if task else r.kind == kind)]
    if not candidates:
        raise RecipeError(
            f"sweep: no {kind} task {'named ' + task if task else ''} among the evaluated tasks",
            hint=f"evaluate at least one {kind} task (evaluate.tasks in the recipe, or --tasks)",
        )
    result = candidates[0]
    metric = primary_metric(result)
    return Axis(result.task, metric, ideal_of(result, metric) if kind == "bias" else None)


def sweep_points(run: EvalRun, lambdas: Sequence[float], bias: Axis, capability: Axis) -> list[SweepPoint]:
    points = []
    for lam in lambdas:
        results = run.results[label_of(lam)]
        b, b_se = bias.read(results)
        c, c_se = capability.read(results)
        points.append(SweepPoint(lam, b, c, b_se, c_se))
    return points


def render_sweep_md(points: Sequence[SweepPoint], bias: Axis, capability: Axis) -> str:
    front = {p.lam for p in pareto_front(points)}

    def cell(value: float, se: float | None) -> str:
        return f"{value:.4g}" + (f" ± {se:.2g}" if se is not None and math.isfinite(se) else "")

    lines = [
        "# Lambda sweep", "",
        f"Bias axis: {bias.label} (lower is better). Capability axis: {capability.task} {capability.metric} "
        "(higher is better). ± is the bootstrap standard error. Pareto-optimal settings are marked.", "",
        f"| lambda | {bias.label} | {capability.task} {capability.metric} | Pareto |",
        "|---|---|---|---|",
    ]
    for p in points:
        lines.append(f"| {p.lam:g} | {cell(p.bias, p.bias_stderr)} | {cell(p.capability, p.capability_stderr)} | "
                     f"{'yes' if p.lam in front else ''} |")
    lines += ["", "![trade-off](tradeoff.png)", "", "Full per-task results: [eval/report.md](eval/report.md)", ""]
    return "\n".join(lines)


def sweep_recipe(
    lr: LoadedRecipe,
    lambdas: Sequence[float],
    out: Path,
    overwrite: bool = False,
    tasks: str | Sequence[str] | None = None,
    limit: int | None = None,
    seed: int | None = None,
    data_dir: str | Path | None = None,
    bias_task: str | None = None,
    capability_task: str | None = None,
    report: Callable[[str], None] = lambda _step: None,
    progress=None,
    bars: Callable[[str, int, int], None] | None = None,
) -> tuple[Path, list[SweepPoint]]:
    """Evaluate the recipe's neurons at each lambda; write the trade-off to ``out`` (under torchrun: rank 0 does)."""
    if not lambdas or any(not math.isfinite(lam) for lam in lambdas):
        raise RecipeError("--lambda: give finite numbers, e.g. 0,1,2,3")
    evaluate = lr.recipe.evaluate
    tasks = tasks or (evaluate.tasks if evaluate else None)
    if not tasks:
        raise RecipeError(f"{lr.path}: evaluate.tasks is empty", hint="add evaluate.tasks or pass --tasks")
    out = check_output(out, overwrite, protected_for_recipe(lr))
    report("load model")
    loaded = load_model(lr.recipe.model)
    report("locate neurons" if lr.recipe.locate else "read neurons")
    neuron_set = resolve_neurons(lr, loaded, progress)
    neurons = [n.model_copy(update={"lambda_": None}) for n in neuron_set.neurons]
    models = {}
    for lam in dict.fromkeys(lambdas):
        plan = build_plan(neurons, EditSpec.model_validate({"lambda": lam}), loaded.layout)
        models[label_of(lam)] = loaded if lam == 1 else with_runtime_edit(loaded, plan)
    report("evaluate")
    run = evaluate_models(
        models, tasks, data_dir=data_dir if data_dir is not None else (evaluate.data_dir if evaluate else None),
        limit=limit if limit is not None else (evaluate.limit if evaluate else None),
        seed=seed if seed is not None else (evaluate.seed if evaluate else 0), progress=bars,
        descriptions={label_of(lam): {"description": f"{len(neurons)} {neuron_set.method} neurons x {lam:g}"}
                      for lam in lambdas},
    )
    bias, capability = choose_axis(run, "bias", bias_task), choose_axis(run, "capability", capability_task)
    points = sweep_points(run, list(dict.fromkeys(lambdas)), bias, capability)
    if not parallel.is_main():  # torchrun: the same points on every rank; rank 0 writes them
        return out, points
    with staged_output(out, overwrite) as tmp:
        write_results(tmp / "eval", run)
        neuron_set.save(tmp / "neurons.json")
        plot_tradeoff(points, tmp / "tradeoff.png", bias.label, f"{capability.task} {capability.metric}")
        (tmp / "sweep.md").write_text(render_sweep_md(points, bias, capability))
        (tmp / "sweep.json").write_text(json.dumps({
            # bakeedit_version + format_version: the marker by which --overwrite knows the folder is bakeedit's
            "bakeedit_version": __version__, "format_version": 1, "kind": "sweep",
            "recipe": str(lr.path), "recipe_sha256": lr.sha256, "lambdas": list(dict.fromkeys(lambdas)),
            "bias_axis": asdict(bias), "capability_axis": asdict(capability),
            "points": [asdict(p) for p in points], "pareto": [p.lam for p in pareto_front(points)],
        }, indent=1) + "\n")
    return out, points
