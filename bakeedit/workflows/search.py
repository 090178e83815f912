"""``bakeedit search``: choose a recipe's locate parameters and lambda on dev data, against a matched control.

A recipe's parameters (KnowBias' tau and beta, COCO's top fraction, INE's k, the sites, a layer range, the edit's
lambda) decide whether the edit debiases; choosing them on the items that are then reported would make every
number a fit. So each trial of an Optuna TPE study (as heretic does) locates with the suggested parameters (the
per-item attributions and responses come from the locate cache, so only the first trial pays for them), applies
the edit with runtime hooks, and scores on the **dev** split of the search's tasks (``Task.load_split``) only:

* the edit's *bias reduction*, per bias task ``(d_base - d_edit) / d_base`` where ``d`` is the distance of the
  task's headline metric from its unbiased value, and the same for a **KL-matched random control** (the located
  set's shape, lambdas scaled until it disturbs the model as much as the edit: ``workflows/matched_control.py``);
  the objective is the mean over tasks of the edit's reduction minus the control's: what the located neurons do
  that random ones of equal disturbance do not;
* the edit's disturbance, the mean KL from the base on neutral text (the second objective, minimised);
* the capability drop (mean headline metric of ``capability_tasks``) and the KL against the budget
  (``max_capability_drop``, ``max_kl``): a trial over budget is infeasible (Optuna's ``constraints_func``).

The study lives in an SQLite file in bakeedit's cache, keyed by the recipe (without ``search.trials``) and the
options, so running the same command again continues it: ``--trials N`` is the total number of finished trials.
The output folder (written once, at the end, through a temporary folder) holds ``search.json``, every trial
(``trials.jsonl``, ``trials.md``), the Pareto front (``front.md``, ``front.png``), the chosen trial as a recipe
ready for ``bakeedit apply`` (``recipe.yaml``, with ``evaluate.split: test``: its report reads the held-out items,
once) and its ``neurons.json``, and a copy of the study (``study.db``).
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bakeedit import __version__
from bakeedit.edit import EditPlan, build_plan
from bakeedit.errors import RecipeError
from bakeedit.evaluate.compare import ideal_of
from bakeedit.evaluate.disturbance import Disturbance
from bakeedit.evaluate.report import primary_metric
from bakeedit.evaluate.runner import evaluate_models, expand_tasks, with_runtime_edit
from bakeedit.evaluate.tasks.base import TaskResult
from bakeedit.io.ownership import SEARCH_MARKER, check_output
from bakeedit.io.staging import staged_output
from bakeedit.locate.cache import cache_key
from bakeedit.locate.registry import LocateContext, run_locate, validate_params
from bakeedit.models.embedded import EMBEDDED_ALIASES, cache_root
from bakeedit.models.load import LoadedModel, load_model
from bakeedit.neurons import NeuronSet
from bakeedit.recipe import EditSpec, LoadedRecipe, LocateSpec, SearchParam, SearchSpec
from bakeedit.workflows.apply_eval import control_set
from bakeedit.workflows.apply_steps import resolve_neurons
from bakeedit.workflows.fit_cache import cached_fit_edit
from bakeedit.workflows.matched_control import match_control
from bakeedit.workflows.outputs import protected_for_recipe

SPLIT = "dev"
FORMAT_VERSION = 1
LAYER_RANGE = "locate.layer_range"
#: The search space of each method when the recipe's ``search.space`` is empty: the parameters that decide which
#: neurons are kept (cheap to vary: the per-item scores are cached) and the edit's strength.
DEFAULT_SPACES: dict[str, dict[str, dict[str, Any]]] = {
    "knowbias": {"locate.tau": {"low": 0.05, "high": 0.6}, "locate.beta": {"low": 0.05, "high": 0.6},
                 "lambda": {"low": 0.0, "high": 3.0}},
    "coco": {"locate.top_fraction": {"low": 0.001, "high": 0.03, "log": True}, "lambda": {"low": 0.0, "high": 3.0}},
    "ine": {"locate.k": {"low": 5, "high": 100, "int": True}, "lambda": {"low": 0.0, "high": 1.0}},
    "random": {"lambda": {"low": 0.0, "high": 3.0}},
    None: {"lambda": {"low": 0.0, "high": 3.0}},  # explicit neurons or a neurons_file: only the strength
}
Report = Callable[[str], None]


# ------------------------------------------------------------------------------------------- scoring one trial


def distance(result: TaskResult) -> tuple[str, float, float | None, float | None]:
    """(headline metric, its distance from the unbiased value, that value, its standard error). Bias metrics with
    no ideal read as ``value`` (lower better) or ``-value`` (higher better)."""
    metric = primary_metric(result)
    m = result.metrics[metric]
    ideal = ideal_of(result, metric)
    d = abs(m.value - ideal) if ideal is not None else (-m.value if m.higher_is_better else m.value)
    return metric, d, ideal, m.stderr


def headline(result: TaskResult) -> float:
    return result.metrics[primary_metric(result)].value


@dataclass
class Baseline:
    """The base model's dev-split numbers every trial is compared with (stored in the study, so a resumed study
    compares with exactly the same ones)."""

    bias: dict[str, dict[str, Any]]  # task -> {metric, ideal, value, distance, stderr}
    capability: float | None

    def to_json(self) -> dict[str, Any]:
        return {"bias": self.bias, "capability": self.capability}

    @classmethod
    def from_results(cls, results: Sequence[TaskResult], bias_tasks: Sequence[str]) -> Baseline:
        bias = {}
        for r in results:
            if r.task in bias_tasks:
                metric, d, ideal, se = distance(r)
                bias[r.task] = {"metric": metric, "ideal": ideal, "value": headline(r), "distance": d, "stderr": se}
        caps = [headline(r) for r in results if r.task not in bias_tasks]
        return cls(bias, sum(caps) / len(caps) if caps else None)


def reduction(base: Mapping[str, Any], result: TaskResult) -> float:
    """``(d_base - d) / d_base`` of one bias task: 1 removes the base's bias, 0 keeps it, < 0 adds to it. The
    denominator is at least the base's standard error, so a base already near its ideal does not blow up."""
    _, d, _, _ = distance(result)
    scale = max(base["distance"], base.get("stderr") or 0.0, 1e-9)
    return (base["distance"] - d) / scale


def score_trial(baseline: Baseline, edited: Sequence[TaskResult], control: Sequence[TaskResult]) -> dict[str, Any]:
    """The recorded numbers of one trial: per bias task base/edited/control, both reductions, the advantage (mean
    reduction of the edit minus the control's) and the capability of each."""
    by_e, by_c = {r.task: r for r in edited}, {r.task: r for r in control}
    bias, red_e, red_c = {}, [], []
    for task, base in baseline.bias.items():
        e, c = reduction(base, by_e[task]), reduction(base, by_c[task])
        red_e.append(e)
        red_c.append(c)
        bias[task] = {"metric": base["metric"], "ideal": base["ideal"], "base": base["value"],
                      "edited": headline(by_e[task]), "control": headline(by_c[task]),
                      "reduction_edited": e, "reduction_control": c}
    caps = [t for t in by_e if t not in baseline.bias]

    def cap(by: Mapping[str, TaskResult]) -> float | None:
        return sum(headline(by[t]) for t in caps) / len(caps) if caps else None

    return {"bias": bias, "reduction_edited": sum(red_e) / len(red_e), "reduction_control": sum(red_c) / len(red_c),
            "advantage": sum(red_e) / len(red_e) - sum(red_c) / len(red_c),
            "capability": {"base": baseline.capability, "edited": cap(by_e), "control": cap(by_c)}}


# ------------------------------------------------------------------------------------------- the search space


def search_space(lr: LoadedRecipe) -> dict[str, SearchParam]:
    """The recipe's ``search.space``, or the method's default; each ``locate.<param>`` checked against the
    method's schema now (not after an hour of trials)."""
    spec, method = lr.recipe.search, lr.recipe.locate.method if lr.recipe.locate else None
    assert spec is not None
    space = dict(spec.space) or {k: SearchParam.model_validate(v)
                                 for k, v in DEFAULT_SPACES.get(method, DEFAULT_SPACES[None]).items()}
    locate_names = [k.removeprefix("locate.") for k in space if k.startswith("locate.") and k != LAYER_RANGE]
    if (locate_names or LAYER_RANGE in space) and lr.recipe.locate is None:
        raise RecipeError(f"{lr.path}: search.space names locate parameters but the recipe has no locate: block",
                          hint="search only 'lambda' for explicit neurons, or add a locate method")
    if locate_names:
        from bakeedit.locate.registry import get_method

        known = set(get_method(method).params.model_fields)
        unknown = [n for n in locate_names if n not in known]
        if unknown:
            raise RecipeError(f"{lr.path}: search.space: locate.{unknown[0]} is not a parameter of the {method} "
                              "method", hint="its parameters: " + ", ".join(sorted(known)))
    layers = space.get(LAYER_RANGE)
    if layers is not None and (layers.choices is not None or layers.low % 1 or layers.high % 1):
        raise RecipeError(f"{lr.path}: search.space.{LAYER_RANGE}: give whole-number 'low' and 'high' layers")
    return space


def suggest(trial: Any, space: Mapping[str, SearchParam]) -> dict[str, Any]:
    """The trial's value of every searched parameter (``locate.layer_range`` as ``[first, last]``)."""
    values: dict[str, Any] = {}
    for name, p in space.items():
        if name == LAYER_RANGE:
            low, high = int(p.low), int(p.high)
            first = trial.suggest_int("layer_first", low, high)
            span = trial.suggest_int("layer_span", 0, high - low)
            values[name] = [first, min(first + span, high)]
        elif p.choices is not None:  # Optuna's categorical values must be scalars: lists travel as JSON text
            values[name] = json.loads(trial.suggest_categorical(name, [json.dumps(c) for c in p.choices]))
        elif p.int_:
            values[name] = trial.suggest_int(name, int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
        else:
            values[name] = trial.suggest_float(name, p.low, p.high, log=p.log, step=p.step)
    return values


def with_values(lr: LoadedRecipe, values: Mapping[str, Any]) -> tuple[LocateSpec | None, EditSpec]:
    """The recipe's locate block and edit with the trial's values in place."""
    recipe = lr.recipe
    locate = None
    if recipe.locate is not None:
        data = recipe.locate.model_dump()
        data.update({k.removeprefix("locate."): v for k, v in values.items() if k.startswith("locate.")})
        locate = LocateSpec.model_validate(data)
    edit = recipe.edit
    if "lambda" in values:
        edit = EditSpec.model_validate({**edit.model_dump(by_alias=True, exclude_none=True),
                                        "lambda": values["lambda"]})
    return locate, edit


# ------------------------------------------------------------------------------------------- the study


def study_key(lr: LoadedRecipe, limit: int | None, data_dir: str | Path | None) -> str:
    """What a trial's numbers depend on: the recipe as data (without ``search.trials``, which only says how many
    to run) and the options that override it. A data directory counts as the folder it names, not as it is spelt:
    ``$BAKEEDIT_DATA_DIR=../shared/data`` and its absolute path continue the same study (before, they started two)."""
    raw = yaml.safe_load(lr.text)
    raw.get("search", {}).pop("trials", None)
    where = Path(data_dir).resolve() if data_dir is not None and Path(data_dir).is_dir() else data_dir
    return cache_key({"recipe": raw, "limit": limit, "data_dir": where, "split": SPLIT, "format": FORMAT_VERSION})


def default_storage(lr: LoadedRecipe, key: str) -> Path:
    return cache_root() / "search" / f"{lr.recipe.name}-{key}.db"


def _optuna():
    try:
        import optuna
    except ImportError as exc:  # a dependency; a broken environment gets one line
        raise RecipeError("bakeedit search needs optuna", hint="pip install optuna") from exc
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def finished(study: Any) -> list[Any]:
    optuna = _optuna()
    return [t for t in study.get_trials(deepcopy=False)
            if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]


def constraints_of(trial: Any) -> list[float]:
    """Optuna's feasibility values (<= 0 feasible) recorded by the objective; a trial without them is infeasible."""
    return list(trial.user_attrs.get("constraints", [1.0]))


@dataclass
class TrialRow:
    """One finished trial as the outputs show it."""

    number: int
    state: str
    values: dict[str, Any]
    advantage: float | None
    kl: float | None
    feasible: bool
    attrs: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"number": self.number, "state": self.state, "values": self.values, "advantage": self.advantage,
                "kl": self.kl, "feasible": self.feasible, **self.attrs}


def trial_rows(study: Any) -> list[TrialRow]:
    rows = []
    for t in finished(study):
        attrs = dict(t.user_attrs)
        values = attrs.pop("values", {})
        complete = t.state.name == "COMPLETE"
        rows.append(TrialRow(t.number, t.state.name.lower(), values,
                             t.values[0] if complete else None, attrs.get("kl"),
                             complete and all(c <= 0 for c in constraints_of(t)), attrs))
    return rows


def front_of(rows: Sequence[TrialRow]) -> list[TrialRow]:
    """Feasible trials no other feasible trial beats on both objectives (higher advantage, lower KL)."""
    ok = [r for r in rows if r.feasible and r.advantage is not None and r.kl is not None]
    front = [r for r in ok if not any(
        q.advantage >= r.advantage and q.kl <= r.kl and (q.advantage > r.advantage or q.kl < r.kl) for q in ok)]
    return sorted(front, key=lambda r: (r.kl, -r.advantage))


def reduces_bias(row: TrialRow) -> bool:
    """The trial's edit itself lowered the dev bias, and by more than its matched control did."""
    own = row.attrs.get("reduction_edited")
    return row.advantage is not None and row.advantage > 0 and own is not None and own > 0


def chosen_of(rows: Sequence[TrialRow]) -> TrialRow | None:
    """The feasible trial with the largest advantage over its matched control (the smaller KL on a tie) among those
    whose edit itself reduced the dev bias; when none did, the front's largest advantage (``render_front`` then says
    that no trial reduced bias). An edit that raised bias, only less than its control did, is a debiasing tool's
    last resort, not its answer."""
    key = lambda r: (r.advantage, -r.kl)  # noqa: E731
    good = [r for r in rows if r.feasible and r.kl is not None and reduces_bias(r)]
    if good:
        return max(good, key=key)
    front = front_of(rows)
    return max(front, key=key) if front else None


# ------------------------------------------------------------------------------------------- running it


@dataclass
class SearchResult:
    out: Path
    rows: list[TrialRow]
    chosen: TrialRow | None
    storage: Path


class _Trials:
    """The objective of the study: one locate + edit + matched control + dev evaluation per trial."""

    def __init__(self, lr: LoadedRecipe, loaded: LoadedModel, spec: SearchSpec, space: Mapping[str, SearchParam],
                 baseline: Baseline, limit: int | None, data_dir: str | None, progress: Any, bars: Any,
                 report: Report = lambda _step: None) -> None:
        self.lr, self.loaded, self.spec, self.space, self.baseline = lr, loaded, spec, space, baseline
        self.report = report
        self.limit, self.data_dir, self.progress, self.bars = limit, data_dir, progress, bars
        self.disturbance = Disturbance(loaded.model, loaded.layout, loaded.tokenizer)
        self.tasks = [*spec.tasks, *spec.capability_tasks]

    def neurons(self, locate: LocateSpec | None) -> NeuronSet:
        if locate is None:
            return resolve_neurons(self.lr, self.loaded, self.progress)
        ctx = LocateContext(cache_dir=cache_root() / "locate", progress=self.progress, base_dir=self.lr.path.parent)
        return run_locate(locate, self.loaded, ctx, source=str(self.lr.path))

    def plan(self, values: Mapping[str, Any]) -> tuple[NeuronSet, EditPlan, EditSpec]:
        locate, edit = with_values(self.lr, values)
        neuron_set = self.neurons(locate)
        if edit.fit is not None:  # as apply does: the map's parameters fitted on the locate split, per trial
            data = self.lr.resolve(edit.fit.data) if edit.fit.data else None
            edit, _ = cached_fit_edit(edit, neuron_set.neurons, self.loaded, data, cache_root() / "fit")
        return neuron_set, build_plan(neuron_set.neurons, edit, self.loaded.layout), edit

    def __call__(self, trial: Any) -> tuple[float, float]:
        optuna = _optuna()
        start = time.perf_counter()
        values = suggest(trial, self.space)
        trial.set_user_attr("values", values)
        self.report(f"trial {trial.number}: locate and plan (" + ", ".join(f"{k}={_fmt(v)}" for k, v in values.items())
                    + ")")
        try:
            neuron_set, plan, edit = self.plan(values)
        except RecipeError as exc:  # e.g. a layer range that keeps no neuron, a threshold that keeps none
            why = str(exc).removeprefix(f"{self.lr.path}: ")
            trial.set_user_attr("pruned", why)
            raise optuna.TrialPruned(why) from None
        kl = self.disturbance.kl(plan)
        counts: dict[str, int] = {}
        for n in neuron_set.neurons:
            counts[n.site] = counts.get(n.site, 0) + 1
        trial.set_user_attr("n_neurons", len(neuron_set.neurons))
        trial.set_user_attr("sites", counts)
        trial.set_user_attr("kl", kl)
        if self.spec.max_kl is not None and kl > self.spec.max_kl:
            trial.set_user_attr("pruned", f"KL {kl:.3g} over the budget max_kl {self.spec.max_kl:g}")
            trial.set_user_attr("constraints", [kl - self.spec.max_kl])
            trial.set_constraint("kl", kl - self.spec.max_kl)
            raise optuna.TrialPruned()
        self.report(f"trial {trial.number}: match a random control to KL {kl:.3g}")
        control = control_set(neuron_set, self.loaded, self.spec.seed)
        matched = match_control(self.disturbance, plan, control,
                                build_plan(control.neurons, edit, self.loaded.layout, source="control"))
        self.report(f"trial {trial.number}: evaluate edit and control (dev split)")
        run = evaluate_models(
            {"edited": with_runtime_edit(self.loaded, plan), "control": with_runtime_edit(self.loaded, matched.plan)},
            self.tasks, data_dir=self.data_dir, limit=self.limit, seed=self.spec.seed, progress=self.bars,
            split=SPLIT,
        )
        scores = score_trial(self.baseline, run.results["edited"], run.results["control"])
        cap = scores["capability"]
        drop = None if cap["base"] is None else cap["base"] - cap["edited"]
        constraints = [kl - self.spec.max_kl if self.spec.max_kl is not None else 0.0,
                       drop - self.spec.max_capability_drop
                       if drop is not None and self.spec.max_capability_drop is not None else 0.0]
        for k, v in scores.items():
            trial.set_user_attr(k, v)
        trial.set_user_attr("kl_control", matched.kl_control)
        trial.set_user_attr("control_scale", matched.scale)
        trial.set_user_attr("control_matched", matched.matched)
        trial.set_user_attr("capability_drop", drop)
        trial.set_user_attr("constraints", constraints)
        for name, value in zip(("kl", "capability_drop"), constraints, strict=True):
            trial.set_constraint(name, value)  # the TPE sampler prefers feasible trials (Optuna >= 5)
        trial.set_user_attr("seconds", round(time.perf_counter() - start, 1))
        return scores["advantage"], kl


def search_recipe(
    lr: LoadedRecipe,
    out: Path,
    trials: int | None = None,
    overwrite: bool = False,
    fresh: bool = False,
    storage: Path | None = None,
    limit: int | None = None,
    data_dir: str | None = None,
    report: Report = lambda _step: None,
    progress: Any = None,
    bars: Any = None,
) -> SearchResult:
    """Run (or continue) the recipe's search study to ``trials`` finished trials; write ``out``."""
    spec = lr.recipe.search
    if spec is None:
        raise RecipeError(f"{lr.path}: no search: block", hint="add search: {tasks: [...], trials: N} "
                          "(recipes/README.md); recipes/search-smollm2.yaml is an example")
    space = search_space(lr)
    if lr.recipe.locate is not None:
        validate_params(lr.recipe.locate, str(lr.path))
    expand_tasks([*spec.tasks, *spec.capability_tasks])  # an unknown task name fails now
    out = check_output(out, overwrite, protected_for_recipe(lr))
    total = trials if trials is not None else spec.trials
    limit = limit if limit is not None else spec.limit
    data_dir = data_dir if data_dir is not None else (lr.recipe.evaluate.data_dir if lr.recipe.evaluate else None)
    key = study_key(lr, limit, data_dir)
    db = Path(storage) if storage is not None else default_storage(lr, key)
    db.parent.mkdir(parents=True, exist_ok=True)
    if fresh:
        db.unlink(missing_ok=True)
    optuna = _optuna()
    name, url = f"{lr.recipe.name}-{key}", f"sqlite:///{db.resolve()}"
    study = optuna.create_study(study_name=name, storage=url, load_if_exists=True,
                                directions=["maximize", "minimize"])
    # A seeded sampler draws the same first values every time it is made: seeded with ``seed`` alone, a resumed
    # study re-ran its first trials' values (Gemma NE-COCO: trial 2 repeated trial 0). Seeding with the number of
    # trials already stored keeps a run reproducible from its study and makes every resumed draw a new one.
    sampler = optuna.samplers.TPESampler(seed=spec.seed + len(study.trials),
                                         n_startup_trials=max(3, min(10, total // 3)))
    study = optuna.load_study(study_name=name, storage=url, sampler=sampler)
    done = len(finished(study))
    report(f"study {db} ({done} of {total} trials finished)")
    report("load model")
    loaded = load_model(lr.recipe.model)
    if "baseline" in study.user_attrs:
        baseline = Baseline(**study.user_attrs["baseline"])
    else:
        report("evaluate the base model (dev split)")
        run = evaluate_models({"base": loaded}, [*spec.tasks, *spec.capability_tasks], data_dir=data_dir,
                              limit=limit, seed=spec.seed, progress=bars, split=SPLIT)
        bias_tasks, _ = expand_tasks(spec.tasks)
        baseline = Baseline.from_results(run.results["base"], bias_tasks)
        study.set_user_attr("baseline", baseline.to_json())
    objective = _Trials(lr, loaded, spec, space, baseline, limit, data_dir, progress, bars, report)

    def after(_study: Any, trial: Any) -> None:
        n = len(finished(_study))
        a, kl = trial.user_attrs.get("advantage"), trial.user_attrs.get("kl")
        what = (f"advantage over the matched control {a:+.3f}, KL {kl:.3g}" if a is not None
                else f"pruned: {trial.user_attrs.get('pruned', 'no neurons')}")
        report(f"trial {trial.number} done ({n} of {total}): {what}")

    remaining = max(0, total - done)
    if remaining:
        study.optimize(objective, n_trials=remaining, callbacks=[after], catch=())
    rows = trial_rows(study)
    chosen = chosen_of(rows)
    report("write the front, the trials and the chosen recipe")
    chosen_set = objective.plan(chosen.values)[0] if chosen is not None else None
    with staged_output(out, overwrite) as tmp:
        write_search(tmp, lr, rows, chosen, chosen_set, baseline, spec, key, db, limit, out)
    return SearchResult(out, rows, chosen, db)


# ------------------------------------------------------------------------------------------- the outputs


def write_search(folder: Path, lr: LoadedRecipe, rows: Sequence[TrialRow], chosen: TrialRow | None,
                 chosen_set: NeuronSet | None, baseline: Baseline, spec: SearchSpec, key: str, db: Path,
                 limit: int | None, final_out: Path) -> None:
    front = front_of(rows)
    with open(folder / "trials.jsonl", "w") as fh:
        for r in rows:
            fh.write(json.dumps(r.to_json(), default=_jsonable) + "\n")
    (folder / "trials.md").write_text(render_trials(rows, front, chosen))
    plot_front(rows, front, chosen, folder / "front.png")
    (folder / "front.md").write_text(render_front(lr, front, chosen, baseline, spec, limit, len(rows)))
    if chosen is not None and chosen_set is not None:
        (folder / "recipe.yaml").write_text(chosen_recipe(lr, chosen, key, final_out))
        chosen_set.save(folder / "neurons.json")
    with sqlite3.connect(db) as src, sqlite3.connect(folder / "study.db") as dst:
        src.backup(dst)
    (folder / SEARCH_MARKER).write_text(json.dumps({
        # bakeedit_version + format_version: the marker by which --overwrite knows the folder is bakeedit's
        "bakeedit_version": __version__, "format_version": FORMAT_VERSION, "kind": "search",
        "recipe": lr.path.name, "recipe_sha256": lr.sha256, "study": "study.db", "study_key": key,
        "split": SPLIT, "limit": limit, "trials": len(rows), "baseline": baseline.to_json(),
        "front": [r.number for r in front], "chosen": None if chosen is None else chosen.number,
        "chosen_values": None if chosen is None else chosen.values,
    }, indent=1, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def _fmt(value: Any, spec: str = ".3g") -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return format(value, spec)
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v, spec) for v in value) + "]"
    return str(value)


def _control_kl(row: TrialRow) -> str:
    """The trial's control KL, flagged where the control could not be matched to the edit's."""
    kl = _fmt(row.attrs.get("kl_control"))
    return f"{kl} *not matched*" if kl and row.attrs.get("control_matched") is False else kl


def render_trials(rows: Sequence[TrialRow], front: Sequence[TrialRow], chosen: TrialRow | None) -> str:
    names = list(dict.fromkeys(k for r in rows for k in r.values))
    on_front = {r.number for r in front}
    lines = ["# Search trials", "",
             "Every finished trial, scored on the dev split. advantage: the edit's mean bias reduction minus the "
             "KL-matched random control's; KL: the edit's mean KL from the base on neutral text (nats per token); "
             "control KL: the control's, marked *not matched* where no scale of its lambdas reached the edit's "
             "(a nonlinear map has none). Pruned trials kept no neuron or went over the KL budget.", "",
             "| trial | state | " + " | ".join(names) + " | neurons | KL | control KL | advantage | capability drop "
             "| feasible | front |", "|" + "---|" * (len(names) + 9)]
    for r in rows:
        mark = "chosen" if chosen is not None and r.number == chosen.number else ("yes" if r.number in on_front
                                                                                  else "")
        lines.append(f"| {r.number} | {r.state} | " + " | ".join(_fmt(r.values.get(n)) for n in names)
                     + f" | {r.attrs.get('n_neurons', '')} | {_fmt(r.kl)} | {_control_kl(r)} | "
                       f"{_fmt(r.advantage, '+.3f')} | {_fmt(r.attrs.get('capability_drop'), '+.3f')} | "
                       f"{'yes' if r.feasible else 'no'} | {mark} |")
    return "\n".join(lines) + "\n"


def render_front(lr: LoadedRecipe, front: Sequence[TrialRow], chosen: TrialRow | None, baseline: Baseline,
                 spec: SearchSpec, limit: int | None, n_trials: int) -> str:
    budget = ", ".join(x for x in (f"KL <= {spec.max_kl:g}" if spec.max_kl is not None else "",
                                   f"capability drop <= {spec.max_capability_drop:g}"
                                   if spec.max_capability_drop is not None else "") if x) or "none"
    lines = [f"# Search: {lr.recipe.name}", "",
             f"{n_trials} trials on the **dev** split of {', '.join(spec.tasks)}"
             + (f" (capability: {', '.join(spec.capability_tasks)})" if spec.capability_tasks else "")
             + f", at most {limit} items per task, seed {spec.seed}; budget: {budget}. "
               "No test item was scored: the chosen recipe's own report (evaluate.split: test) is the first.", "",
             "Base model on the dev split: " + "; ".join(
                 f"{t} {b['metric']} {b['value']:.4g}" for t, b in baseline.bias.items())
             + (f"; capability {baseline.capability:.4g}" if baseline.capability is not None else "") + ".", "",
             "## Pareto front (higher advantage, lower KL)", "", "![front](front.png)", ""]
    if not front:
        lines += ["No trial met the budget: no recipe was written. Widen the budget or the space.", ""]
        return "\n".join(lines)
    names = list(dict.fromkeys(k for r in front for k in r.values))
    lines += ["| trial | " + " | ".join(names) + " | neurons | KL | control KL | advantage | edited reduction | "
              "control reduction | capability drop |", "|" + "---|" * (len(names) + 8)]
    for r in front:
        lines.append(f"| {r.number}{' (chosen)' if chosen and r.number == chosen.number else ''} | "
                     + " | ".join(_fmt(r.values.get(n)) for n in names)
                     + f" | {r.attrs.get('n_neurons', '')} | {_fmt(r.kl)} | {_control_kl(r)} | "
                       f"{_fmt(r.advantage, '+.3f')} | "
                       f"{_fmt(r.attrs.get('reduction_edited'), '+.3f')} | "
                       f"{_fmt(r.attrs.get('reduction_control'), '+.3f')} | "
                       f"{_fmt(r.attrs.get('capability_drop'), '+.3f')} |")
    assert chosen is not None
    own = chosen.attrs.get("reduction_edited")
    if reduces_bias(chosen):
        why, verdict = ("the largest advantage within the budget among the trials whose edit reduced bias",
                        "it reduced the dev bias, and by more than its matched control did")
    elif chosen.advantage is not None and chosen.advantage > 0 and own is not None:
        why, verdict = ("the largest advantage within the budget", "no trial's edit reduced the dev bias: this one "
                        "raised it less than its matched control did, which is no debiasing; do not expect the "
                        "test split to show a reduction")
    else:
        why, verdict = ("the largest advantage within the budget", "even it did not reduce bias more than its "
                        "matched control on the dev split: do not expect the test split to show a reduction")
    unmatched = ("" if chosen.attrs.get("control_matched") is not False else
                 f" Its control is **not KL-matched** (KL {_fmt(chosen.attrs.get('kl_control'))} against the edit's "
                 f"{_fmt(chosen.kl)}: no scale of its lambdas reached the edit's, or the edit has none), so the "
                 "advantage compares a control of another strength.")
    lines += ["", f"Chosen: trial {chosen.number} ({why}); {verdict}.{unmatched} "
              "Bake and evaluate it on the held-out items with `bakeedit apply recipe.yaml -o OUT`.", ""]
    return "\n".join(lines)


def plot_front(rows: Sequence[TrialRow], front: Sequence[TrialRow], chosen: TrialRow | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    scored = [r for r in rows if r.advantage is not None and r.kl is not None]
    for ok, colour, label in ((True, "tab:blue", "feasible trial"), (False, "lightgray", "over budget")):
        pts = [r for r in scored if r.feasible == ok]
        ax.scatter([r.kl for r in pts], [r.advantage for r in pts], color=colour, label=label, s=20)
    ax.plot([r.kl for r in front], [r.advantage for r in front], "-o", color="tab:red", ms=4, label="Pareto front")
    if chosen is not None:
        ax.scatter([chosen.kl], [chosen.advantage], marker="*", s=200, color="gold", edgecolor="k", zorder=5,
                   label=f"chosen (trial {chosen.number})")
    ax.axhline(0.0, color="k", lw=0.8, ls="--")
    kls = [r.kl for r in scored]
    if kls and min(kls) > 0 and max(kls) > 10 * min(kls):
        ax.set_xscale("log")  # disturbances of a search's trials span orders of magnitude
    ax.set_xlabel("KL from the base on neutral text (nats/token, lower is better)")
    ax.set_ylabel("bias reduction beyond the matched control (dev)")
    ax.set_title("bakeedit search")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def chosen_recipe(lr: LoadedRecipe, chosen: TrialRow, key: str, out: Path) -> str:
    """The recipe with the chosen values, its search block dropped, reporting on the test split; relative paths
    rewritten relative to ``out`` (where the file will live)."""
    raw = yaml.safe_load(lr.text)
    raw.pop("search", None)
    raw["name"] = f"{raw['name']}-searched"
    for name, value in chosen.values.items():
        if name == "lambda":
            raw.setdefault("edit", {})["lambda"] = value
        else:
            raw["locate"][name.removeprefix("locate.")] = value
    raw["evaluate"] = {**(raw.get("evaluate") or {}), "split": "test"}
    _rebase_paths(raw, lr.path.parent, Path(out).expanduser().resolve())
    header = (f"# Chosen by `bakeedit search` from {lr.path.name}: trial {chosen.number} of study {key}, scored on "
              "the dev split\n# (advantage over the "
              + ("random control, not KL-matched, " if chosen.attrs.get("control_matched") is False
                 else "KL-matched random control ")
              + f"{chosen.advantage:+.3f}, KL {chosen.kl:.3g} nats/token).\n"
              "# evaluate.split: test, so the report of `bakeedit apply` reads only items the search never saw.\n")
    return header + yaml.safe_dump(raw, sort_keys=False, allow_unicode=True)


def _rebase_paths(raw: dict[str, Any], recipe_dir: Path, out: Path) -> None:
    """Relative paths of the recipe (meaning files beside it) rewritten to mean the same files from ``out``."""
    def rebase(value: Any) -> Any:
        if not isinstance(value, str) or os.path.isabs(value) or value in EMBEDDED_ALIASES:
            return value
        beside = recipe_dir / value
        return os.path.relpath(beside, out) if beside.exists() else value

    model = raw.get("model")
    if isinstance(model, str):
        raw["model"] = rebase(model)
    elif isinstance(model, dict) and "id" in model:
        model["id"] = rebase(model["id"])
    for section, name in (("", "neurons_file"), ("evaluate", "data_dir")):
        holder = raw if not section else raw.get(section)
        if isinstance(holder, dict) and name in holder:
            holder[name] = rebase(holder[name])
    fit = (raw.get("edit") or {}).get("fit")
    if isinstance(fit, dict) and "data" in fit:
        fit["data"] = rebase(fit["data"])
    locate = raw.get("locate")
    if isinstance(locate, dict):
        for k, v in locate.items():
            locate[k] = rebase(v)
