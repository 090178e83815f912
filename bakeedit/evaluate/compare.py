"""Paired comparisons of the models of one run (edited - base, edited - control, ...) and their verdict wording.

A debiasing claim stands only against the random-neuron control: editing any neurons of the same number with the
same lambda may move a bias score too. So per metric the report and the card say whether the edit *beats the
control*, from the paired cluster bootstrap of :mod:`bakeedit.evaluate.stats` on the per-item scores every task
keeps (``TaskResult.items``), instead of two independent standard errors. The metric is recomputed on each paired
resample by the task's own :meth:`~bakeedit.evaluate.tasks.base.Task.item_metrics`, so ratios, per-target averages
and ``|pct - 50|`` are compared as what they are. Results written before per-item scores (or by another task
version) get the old unpaired difference and no verdict.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bakeedit.errors import RecipeError
from bakeedit.evaluate.stats import N_BOOT, Paired, paired_bootstraps
from bakeedit.evaluate.tasks.base import MetricValue, TaskResult, UnknownTaskError, get_task

ALPHA = 0.05
#: The unbiased value of bias metrics (the "toward ideal" reading of a verdict and the dashed line of the plots).
IDEAL = {
    "pct_stereotype": 50.0, "ss": 50.0, "lms": 100.0, "icat": 100.0, "bias_ambig": 0.0, "bias_disambig": 0.0,
    "gap": 0.0, "abs_gap": 0.0, "ll_gap": 0.0, "likelihood_diff": 0.0, "r_bls": 0.0, "entropy_deficit": 0.0,
    "entropy_difference": 0.0, "female_share": 0.5, "success_rate": 1.0, "stereotype_rate": 0.0,
    "stereotype_dev": 0.0, "stereotype_dev_shared": 0.0, "pct_stereotype_shared": 50.0, "ll_gap_shared": 0.0,
    "bias_ambig_mean": 0.0, "bias_disambig_mean": 0.0,
}


def ideal_value(kind: str, metric: str) -> float | None:
    """The ideal of a bias metric (a ``_norm`` variant has its base metric's); None for capability metrics."""
    if kind != "bias":
        return None
    return IDEAL.get(metric, IDEAL.get(metric.removesuffix("_norm")))


def ideal_of(result: TaskResult, metric: str) -> float | None:
    return ideal_value(result.kind, metric)


@dataclass(frozen=True)
class Difference:
    """``a - b`` of one metric: paired (``paired`` set) or, for results without per-item scores, the difference
    with both standard errors combined as if independent (``paired`` None)."""

    delta: float
    se: float | None
    paired: Paired | None


def comparison_pairs(labels: Sequence[str]) -> list[tuple[str, str]]:
    """Every other label against ``base``, then ``edited`` against ``control``."""
    pairs = [(lab, "base") for lab in labels if lab != "base" and "base" in labels]
    if "edited" in labels and "control" in labels:
        pairs.append(("edited", "control"))
    return pairs


def verdict_pair(labels: Sequence[str]) -> tuple[str, str] | None:
    """The comparison a verdict is about: the edit against the control, else against the base."""
    edited = next((lab for lab in ("edited", "model") if lab in labels), None)
    if edited is None:
        edited = next((lab for lab in labels if lab not in ("base", "control")), None)
    if edited is None:
        return None
    for ref in ("control", "base"):
        if ref in labels:
            return edited, ref
    return None


def _item_metrics(task: str, results: Sequence[TaskResult]) -> Any:
    """The task's per-item metric function when every result has per-item scores of the current task version."""
    if any(r.items is None for r in results):
        return None
    try:
        current = get_task(task, **results[0].extra)
    except (UnknownTaskError, RecipeError):  # a task or an option this version no longer has
        return None
    if any(r.version != current.version for r in results):
        return None
    return current.item_metrics


def compare_task(by_label: Mapping[str, TaskResult], pairs: Sequence[tuple[str, str]], seed: int = 0,
                 n_boot: int = N_BOOT) -> dict[tuple[str, str], dict[str, Difference]]:
    """Every pair's difference for every metric of one task (paired when the per-item scores allow it)."""
    pairs = [p for p in pairs if p[0] in by_label and p[1] in by_label]
    if not pairs:
        return {}
    labels = sorted({lab for p in pairs for lab in p})
    first = by_label[labels[0]]
    fn = _item_metrics(first.task, [by_label[lab] for lab in labels])
    paired: dict[tuple[str, str], dict[str, Paired]] = {}
    if fn is not None:
        directions = {k: (ideal_of(first, k), m.higher_is_better) for k, m in first.metrics.items()}
        try:
            paired = paired_bootstraps({lab: by_label[lab].items for lab in labels}, pairs, fn, directions,
                                       n_boot, seed)
        except ValueError:  # the models did not score the same items: no pairing
            paired = {}
    out = {}
    for a, b in pairs:
        out[(a, b)] = {}
        for name, ma in by_label[a].metrics.items():
            mb = by_label[b].metrics.get(name)
            if mb is None:
                continue
            p = paired.get((a, b), {}).get(name)
            out[(a, b)][name] = Difference(p.delta, p.se, p) if p is not None else unpaired(ma, mb)
    return out


def unpaired(a: MetricValue, b: MetricValue) -> Difference:
    """``a - b`` with ``sqrt(se_a^2 + se_b^2)``: the fallback for results without per-item scores."""
    ses = [s for s in (a.stderr, b.stderr) if s is not None and math.isfinite(s)]
    return Difference(a.value - b.value, math.sqrt(sum(s * s for s in ses)) if len(ses) == 2 else None, None)


def compare_run(run: Any, n_boot: int = N_BOOT) -> dict[str, dict[tuple[str, str], dict[str, Difference]]]:
    """:func:`compare_task` for every task of an :class:`~bakeedit.evaluate.runner.EvalRun` (seed: the run's)."""
    by_task: dict[str, dict[str, TaskResult]] = {}
    for label, results in run.results.items():
        for r in results:
            by_task.setdefault(r.task, {})[label] = r
    pairs = comparison_pairs(list(run.results))
    seed = int(run.config.get("seed", 0) or 0)
    return {task: compare_task(by_label, pairs, seed, n_boot) for task, by_label in by_task.items()}


def bias_reductions(run: Any, comparisons: Mapping[str, Mapping[tuple[str, str], Mapping[str, Difference]]],
                    edited: str, control: str = "control", alpha: float = ALPHA) -> list[tuple[str, str]]:
    """``(task, metric)`` of every bias metric on which ``edited`` beats ``control`` (paired gain, p < ``alpha``):
    the only metrics a card may say the edit reduces bias on. Empty without a control or per-item scores."""
    kinds = {r.task: r.kind for results in run.results.values() for r in results}
    found = []
    for task, pairs in comparisons.items():
        if kinds.get(task) != "bias":
            continue
        for name, d in pairs.get((edited, control), {}).items():
            p = d.paired
            if p is not None and p.gain is not None and p.gain_p is not None and p.gain > 0 and p.gain_p < alpha:
                found.append((task, name))
    return found


def fmt_p(p: float) -> str:
    """``p=0.01``; three digits near the threshold, so a p of 0.0496 does not read as 0.05."""
    if p < 0.001:
        return "p<0.001"
    return f"p={p:.3g}" if 0.04 <= p < 0.06 else f"p={p:.2g}"


def verdict(diff: Difference | None, against: str, alpha: float = ALPHA) -> str:
    """The verdict wording of ``a`` against ``against``: "beats control (p=0.01)", "no better than control
    (p=0.43)", "worse than control (p=0.002)"; for a metric without a direction "differs from control" / "no
    difference from control"; "not tested (no per-item scores)" without pairing."""
    if diff is None or diff.paired is None:
        return "not tested (no per-item scores)"
    p = diff.paired
    if p.gain is not None and p.gain_p is not None:
        if p.gain_p < alpha:
            return f"{'beats' if p.gain > 0 else 'worse than'} {against} ({fmt_p(p.gain_p)})"
        return f"no better than {against} ({fmt_p(p.gain_p)})"
    if p.p is None or not math.isfinite(p.delta):
        return "—"
    if p.p < alpha:
        return f"differs from {against} ({fmt_p(p.p)})"
    return f"no difference from {against} ({fmt_p(p.p)})"


def comparison_rows(comparisons: Mapping[str, Mapping[tuple[str, str], Mapping[str, Difference]]]
                    ) -> list[dict[str, Any]]:
    """The comparisons as a flat table for results.json (``paired``): task, metric, a, b, delta, se, p, gain,
    gain_p, verdict."""
    rows = []
    for task, pairs in comparisons.items():
        for (a, b), metrics in pairs.items():
            for name, d in metrics.items():
                p = d.paired
                rows.append({"task": task, "metric": name, "a": a, "b": b, "delta": _finite(d.delta),
                             "se": _finite(d.se), "paired": p is not None,
                             "p": _finite(p.p) if p else None, "gain": _finite(p.gain) if p else None,
                             "gain_p": _finite(p.gain_p) if p else None,
                             "n_clusters": p.n_clusters if p else None, "verdict": verdict(d, b)})
    return rows


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)
