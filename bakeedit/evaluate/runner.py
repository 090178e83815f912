"""Run evaluation tasks on one model or on several labelled models (base, edited, control) with the same items.

The API ``bakeedit apply`` and ``bakeedit sweep`` call::

    from bakeedit.evaluate.runner import evaluate_models, with_runtime_edit
    from bakeedit.evaluate.report import write_results

    run = evaluate_models(
        {"base": base_loaded,                                   # a LoadedModel, or a (model, tokenizer) pair
         "edited": (edited_model, tokenizer),
         "control": with_runtime_edit(base_loaded, control_plan)},  # a callable returning a context manager
        tasks=["bias"], data_dir=None, limit=200, seed=0)
    write_results(out / "eval", run)                            # results.json, report.md, plots/*.png

Each task's data is loaded (and ``limit``-sampled with ``seed``) once, and every model scores exactly those items,
so before/after differences are paired. A value of ``models`` that is callable is entered as a context manager only
while its model is evaluated: that is how a runtime edit (hooks) is applied to the base weights for the control
and removed afterwards. Task names may be groups: ``bias``, ``capability``, ``all``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bakeedit.edit import runtime_edit
from bakeedit.errors import BakeeditError, DataError, RecipeError
from bakeedit.evaluate.sharded import make_scorer
from bakeedit.evaluate.tasks.base import DATA_DIR_ENV, Task, TaskData, TaskResult, available_tasks, get_task

TASK_GROUPS = ("bias", "capability", "all")
#: Names that stand for several tasks, as users write them (the paper's benchmark name for both of its parts).
TASK_ALIASES = {"stereoset": ("stereoset_intrasentence", "stereoset_intersentence")}
ModelLike = Any  # a LoadedModel (``.model`` and ``.tokenizer``) or a ``(model, tokenizer)`` pair
ModelRef = ModelLike | Callable[[], AbstractContextManager[ModelLike]]
ProgressFn = Callable[[str, int, int], None]  # (description, done, total)
WarnFn = Callable[[str], None]


@dataclass
class EvalRun:
    """Results of :func:`evaluate_models`: per model label, the task results in task order; ``skipped`` maps a task
    left out (its data missing, only for tasks that came from a group) to the reason; ``config`` records how."""

    results: dict[str, list[TaskResult]]
    skipped: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)  # label -> description (ref, neurons, ...)
    timings_s: dict[str, float] = field(default_factory=dict)


def expand_tasks(spec: str | Sequence[str]) -> tuple[list[str], set[str]]:
    """Task names from ``"t1,t2"`` / ``"bias"`` / ``"capability"`` / ``"all"`` / an alias such as ``"stereoset"``
    (or a list of those), in order and without repeats; also the names that came from a group (those may be
    skipped when their data is missing)."""
    parts = [p.strip() for p in (spec.split(",") if isinstance(spec, str) else spec) if p.strip()]
    if not parts:
        raise RecipeError("no evaluation tasks given", hint="e.g. --tasks bias, --tasks crows_pairs,bbq")
    names: list[str] = []
    from_group: set[str] = set()
    for p in parts:
        if p in TASK_GROUPS:
            group = available_tasks(None if p == "all" else p)
            from_group.update(n for n in group if n not in names)
            names.extend(n for n in group if n not in names)
        else:
            for name in TASK_ALIASES.get(p, (p,)):
                get_task(name)  # UnknownTaskError lists the available names
                if name not in names:
                    names.append(name)
                from_group.discard(name)
    return names, from_group


def load_tasks(
    names: Sequence[str],
    data_dir: str | Path | None,
    limit: int | None,
    seed: int,
    skippable: set[str] | None = None,
    warn: WarnFn | None = None,
    split: str = "all",
) -> tuple[list[tuple[Task, TaskData]], dict[str, str]]:
    """Instantiate and load every task; a task in ``skippable`` whose data cannot be loaded is skipped with a
    warning instead of failing the run."""
    loaded, skipped = [], {}
    for name in names:
        task = get_task(name)
        try:
            loaded.append((task, task.load_split(data_dir, limit, seed, split)))
        except DataError as exc:
            if name not in (skippable or set()):
                raise
            skipped[name] = str(exc)
            if warn is not None:
                warn(f"skipping {name}: {exc}")
    if not loaded and skipped:
        first = next(iter(skipped))
        raise DataError(f"none of the requested tasks has its data (first: {first}: {skipped[first]})",
                        hint=f"pass --data-dir DIR or set ${DATA_DIR_ENV}")
    return loaded, skipped


def _unpack(model: ModelLike) -> tuple[Any, Any]:
    if isinstance(model, tuple):
        return model
    return model.model, model.tokenizer


def score_loaded(
    model: ModelLike,
    tasks: Sequence[tuple[Task, TaskData]],
    label: str = "model",
    progress: ProgressFn | None = None,
    batch_size: int = 32,
    timings: dict[str, float] | None = None,
    notice: WarnFn | None = None,
) -> list[TaskResult]:
    """Evaluate already loaded tasks on one model; ``notice`` gets the scorer's one-line messages (a blockwise
    model's time estimate, :class:`~bakeedit.evaluate.engine.Scorer`)."""
    net, tokenizer = _unpack(model)
    if tokenizer is None:
        raise BakeeditError(f"{label}: the model has no tokenizer; evaluation needs one",
                            hint="point at a checkpoint folder that contains tokenizer files")
    scorer = make_scorer(net, tokenizer, batch_size=batch_size, notice=notice)  # splits requests over torchrun ranks
    results = []
    for task, data in tasks:
        desc = f"{label}: {task.name}"
        if progress is not None:
            scorer.progress = lambda _d, done, total, desc=desc: progress(desc, done, total)
            progress(desc, 0, 1)
        start = time.perf_counter()
        results.append(task.evaluate(scorer, data))
        if timings is not None:
            timings[desc] = round(time.perf_counter() - start, 2)
    return results


def run_tasks(
    model: ModelLike,
    tasks: str | Sequence[str],
    data_dir: str | Path | None = None,
    limit: int | None = None,
    seed: int = 0,
    progress: ProgressFn | None = None,
    batch_size: int = 32,
    split: str = "all",
) -> list[TaskResult]:
    """Load ``tasks`` (names or groups) and evaluate them on ``model`` (a LoadedModel or ``(model, tokenizer)``)."""
    names, groups = expand_tasks(tasks)
    loaded, _ = load_tasks(names, data_dir, limit, seed, skippable=groups, split=split)
    return score_loaded(model, loaded, progress=progress, batch_size=batch_size)


def evaluate_models(
    models: Mapping[str, ModelRef],
    tasks: str | Sequence[str],
    data_dir: str | Path | None = None,
    limit: int | None = None,
    seed: int = 0,
    progress: ProgressFn | None = None,
    batch_size: int = 32,
    warn: WarnFn | None = None,
    descriptions: Mapping[str, Mapping[str, Any]] | None = None,
    split: str = "all",
    notice: WarnFn | None = None,
) -> EvalRun:
    """Evaluate every labelled model on the same loaded items (see the module docstring); ``split`` restricts
    every task to its ``dev`` or ``test`` part (:meth:`~bakeedit.evaluate.tasks.base.Task.load_split`); ``notice``
    is passed to :func:`score_loaded`."""
    names, groups = expand_tasks(tasks)
    loaded, skipped = load_tasks(names, data_dir, limit, seed, skippable=groups, warn=warn, split=split)
    timings: dict[str, float] = {}
    results = {}
    for label, ref in models.items():
        direct = isinstance(ref, tuple) or hasattr(ref, "tokenizer")
        ctx = nullcontext(ref) if direct else ref()
        with ctx as model:
            results[label] = score_loaded(model, loaded, label, progress, batch_size, timings, notice)
    config = {"tasks": [t.name for t, _ in loaded], "requested": list(tasks) if not isinstance(tasks, str)
              else tasks, "limit": limit, "seed": seed, "split": split,
              "data_dir": None if data_dir is None else str(data_dir),
              "batch_size": batch_size, "n_total": {t.name: d.n_total for t, d in loaded}}
    return EvalRun(results, skipped, config, {k: dict(v) for k, v in (descriptions or {}).items()}, timings)


def with_runtime_edit(loaded: Any, plan: Any) -> Callable[[], AbstractContextManager[Any]]:
    """A model reference for :func:`evaluate_models`: ``loaded`` with ``plan`` applied by hooks
    (:func:`bakeedit.edit.runtime_edit`) while it is evaluated; used for the random-neuron control."""
    @contextmanager
    def enter() -> Iterator[Any]:
        with runtime_edit(loaded.model, loaded.layout, plan):
            yield loaded

    return enter
