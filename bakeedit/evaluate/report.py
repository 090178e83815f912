"""``eval/results.json``, ``eval/report.md`` and the plots from a :class:`~bakeedit.evaluate.runner.EvalRun`.

results.json holds the full :class:`TaskResult` of every task for every model label (``base``, ``edited``,
``control``, ...) and a flat ``rows`` table (model, task, metric, group, value, stderr, n, data source and sha256,
limit, seed), the per-item scores of every task (``items`` of each result) and the paired comparisons (``paired``).
report.md shows, per task and metric, each model's value with its cluster-bootstrap standard error, the paired
differences (edited - base, edited - control, with paired standard errors) and a verdict: whether the edit beats the
random control (:mod:`bakeedit.evaluate.compare`); then per-category tables of every bias task's headline metric
with their plots, the capability-delta plot, and where every number's data came from.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bakeedit import __version__
from bakeedit.errors import DataError
from bakeedit.evaluate.compare import (
    Difference,
    compare_run,
    comparison_pairs,
    comparison_rows,
    ideal_of,
    verdict,
    verdict_pair,
)
from bakeedit.evaluate.plots import plot_categories, plot_deltas, plot_scores
from bakeedit.evaluate.runner import EvalRun
from bakeedit.evaluate.tasks.base import MetricValue, TaskResult

RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
PLOTS_DIR = "plots"
LABEL_ORDER = ("base", "edited", "control")

# Headline metric of each bias task (per-category tables and plots); other tasks use the first of FALLBACK_PRIMARY
# they have, else their first metric.
PRIMARY = {
    "crows_pairs": "stereotype_dev",
    "stereoset_intrasentence": "ss",
    "stereoset_intersentence": "ss",
    "bbq": "bias_ambig",
    "winogender": "abs_gap",
    "knowbias_qa": "acc",
    "gender_words": "abs_gap",
    "contrast_success": "success_rate",
}
FALLBACK_PRIMARY = ("acc", "acc_norm", "exact_match", "perplexity", "word_perplexity")
# Share metrics in [0, 1] drawn in the capability score plot, and each task's chance level (uniform guessing over its
# options; ARC as stored has exactly 4 options per item, see docs/evaluation.md).
SHARE_METRICS = ("acc", "acc_norm", "exact_match")
CHANCE = {"arc_easy": 0.25, "arc_challenge": 0.25, "openbookqa": 0.25, "copa": 0.5, "piqa": 0.5, "hellaswag": 0.25,
          "winogrande": 0.5, "mmlu": 0.25, "gsm8k": 0.0}
#: What a metric's name does not say (shown beside it in the report and the card).
METRIC_NOTES = {
    ("crows_pairs", "stereotype_dev"): "distance of pct_stereotype from 50, whole sentence",
    ("crows_pairs", "pct_stereotype"): "whole sentence, lm-eval",
    ("crows_pairs", "ll_gap"): "whole sentence, lm-eval",
    ("crows_pairs", "likelihood_diff"): "whole sentence, lm-eval",
    ("crows_pairs", "stereotype_dev_shared"): "distance of pct_stereotype_shared from 50, shared tokens, Nangia et al.",
    ("crows_pairs", "pct_stereotype_shared"): "shared tokens, Nangia et al.",
    ("crows_pairs", "ll_gap_shared"): "shared tokens, Nangia et al.",
    ("bbq", "bias_ambig_mean"): "mean over categories",
    ("bbq", "bias_disambig_mean"): "mean over categories",
}


def metric_label(task: str, metric: str) -> str:
    """The metric column: its name, with what the name does not say (``pct_stereotype (whole sentence, lm-eval)``;
    a BBQ ``_norm`` metric is length-normalised)."""
    note = METRIC_NOTES.get((task, metric))
    if note is None and task == "bbq" and metric.endswith("_norm"):
        note = "length-normalised"
    return f"{metric} ({note})" if note else metric


def primary_metric(result: TaskResult) -> str:
    """The metric shown per category and in the delta plots."""
    if result.task in PRIMARY and PRIMARY[result.task] in result.metrics:
        return PRIMARY[result.task]
    return next((m for m in FALLBACK_PRIMARY if m in result.metrics), next(iter(result.metrics)))


def ordered_labels(labels: Any) -> list[str]:
    """base, edited, control first, then any other label in the given order."""
    labels = list(labels)
    return [lab for lab in LABEL_ORDER if lab in labels] + [lab for lab in labels if lab not in LABEL_ORDER]


def improved(metric: MetricValue, base: MetricValue, ideal: float | None) -> bool | None:
    """Whether ``metric`` is better than ``base``: closer to ``ideal`` when there is one, else in the direction of
    ``higher_is_better``; None when neither says or the values are equal / undefined."""
    a, b = base.value, metric.value
    if not (math.isfinite(a) and math.isfinite(b)) or a == b:
        return None
    if ideal is not None:
        return abs(b - ideal) < abs(a - ideal)
    if metric.higher_is_better is None:
        return None
    return (b > a) == metric.higher_is_better


def fmt(value: float | None, stderr: float | None = None, signed: bool = False, ref: float | None = None) -> str:
    """``12.3 ± 1.1`` with decimals fitted to the magnitude of ``value`` (or of ``ref``, for a difference of two
    values of that size); an em dash for undefined values."""
    if value is None or not math.isfinite(value):
        return "—"
    mag = max(abs(value), abs(ref) if ref is not None and math.isfinite(ref) else 0.0)
    digits = 1 if mag >= 10 else 2 if mag >= 1 else 3
    text = f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
    if stderr is not None and math.isfinite(stderr):
        text += f" ± {stderr:.{digits}f}"
    return text


def delta_cell(d: Difference | None, ref: float | None = None) -> str:
    """``+1.2 ± 0.3`` of a difference (``†`` marks one whose ± combines two errors as if independent: results
    without per-item scores)."""
    if d is None or not math.isfinite(d.delta):
        return "—"
    return fmt(d.delta, d.se, signed=True, ref=ref) + ("" if d.paired is not None else " †")


def _delta(m: MetricValue, base: MetricValue) -> tuple[float, float | None]:
    ses = [s for s in (m.stderr, base.stderr) if s is not None and math.isfinite(s)]
    return m.value - base.value, (math.sqrt(sum(s * s for s in ses)) if len(ses) == 2 else None)


# ----------------------------------------------------------------------------------------------------- JSON


def results_rows(run: EvalRun) -> list[dict[str, Any]]:
    """One row per (model, task, metric, group); ``group`` None for the task-level value."""
    rows = []
    for label, results in run.results.items():
        for r in results:
            entries = [(None, r.metrics), *r.breakdown.items()]
            for group, metrics in entries:
                for m in metrics.values():
                    rows.append({
                        "model": label, "task": r.task, "version": r.version, "kind": r.kind, "metric": m.name,
                        "group": group, **{k: v for k, v in m.to_json().items() if k != "name"},
                        "data_source": r.data_source, "data_sha256": r.data_sha256, "limit": r.limit,
                        "seed": r.seed, "split": r.split,
                    })
    return rows


def run_to_json(run: EvalRun, comparisons: Mapping[str, Any] | None = None) -> dict[str, Any]:
    comparisons = compare_run(run) if comparisons is None else comparisons
    return {
        "format_version": 1,
        "bakeedit_version": __version__,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": run.config,
        "models": run.models,
        "skipped": run.skipped,
        "timings_s": run.timings_s,
        "results": {label: [r.to_json() for r in results] for label, results in run.results.items()},
        "rows": results_rows(run),
        "paired": comparison_rows(comparisons),
    }


def read_results(path: Path) -> EvalRun:
    """An :class:`EvalRun` back from a results.json (or the folder holding it)."""
    path = Path(path)
    path = path / RESULTS_FILE if path.is_dir() else path
    try:
        raw = json.loads(path.read_text())
        results = {label: [TaskResult.from_json(r) for r in rs] for label, rs in raw["results"].items()}
    except FileNotFoundError:
        raise DataError(f"{path}: no such results file") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path}: not a bakeedit results.json ({exc})") from None
    return EvalRun(results, raw.get("skipped", {}), raw.get("config", {}), raw.get("models", {}),
                   raw.get("timings_s", {}))


# ----------------------------------------------------------------------------------------------------- markdown


def _by_task(run: EvalRun) -> dict[str, dict[str, TaskResult]]:
    out: dict[str, dict[str, TaskResult]] = {}
    for label in ordered_labels(run.results):
        for r in run.results[label]:
            out.setdefault(r.task, {})[label] = r
    return out


def _model_columns(labels: list[str]) -> tuple[list[str], list[tuple[str, str]], tuple[str, str] | None]:
    """The columns after a table's leading ones: every model, each paired difference, the verdict."""
    pairs = comparison_pairs(labels)
    judged = verdict_pair(labels) if pairs else None
    head = [*labels, *[f"{a} − {b}" for a, b in pairs]]
    if judged is not None:
        head.append(f"verdict ({judged[0]} vs {judged[1]})")
    return head, pairs, judged


def _model_cells(name: str, by_label: Mapping[str, TaskResult], labels: list[str], pairs: list[tuple[str, str]],
                 judged: tuple[str, str] | None, diffs: Mapping[tuple[str, str], Any]) -> list[str]:
    """One metric's value in every model, its paired differences and the verdict, as table cells."""
    cells = []
    for lab in labels:
        m = by_label[lab].metrics.get(name) if lab in by_label else None
        cells.append(fmt(m.value, m.stderr) if m else "—")
    for a, b in pairs:
        ref = by_label[b].metrics.get(name) if b in by_label else None
        cells.append(delta_cell(diffs.get((a, b), {}).get(name), ref.value if ref else None))
    if judged is not None:
        cells.append(verdict(diffs.get(judged, {}).get(name), judged[1]))
    return cells


def _metric_table(tasks: Mapping[str, Mapping[str, TaskResult]], labels: list[str],
                  comparisons: Mapping[str, Any]) -> list[str]:
    columns, pairs, judged = _model_columns(labels)
    head = ["task", "metric", "ideal", *columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task, by_label in tasks.items():
        first = next(iter(by_label.values()))
        for name in first.metrics:
            ideal = ideal_of(first, name)
            cells = [task, metric_label(task, name), "—" if ideal is None else f"{ideal:g}",
                     *_model_cells(name, by_label, labels, pairs, judged, comparisons.get(task, {}))]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


#: Besides each task's primary metric, the headline table shows these (BBQ's disambiguated bias beside s_AMB).
HEADLINE_EXTRA = {"bbq": ("bias_disambig",)}


def headline_rows(run: EvalRun, comparisons: Mapping[str, Any] | None = None,
                  short: bool = False) -> tuple[list[str], list[list[str]]]:
    """The one table a person reads first (``apply`` prints it, ``report.md`` opens with it): per task its headline
    metric(s), the value of every model, each paired difference and the verdict. Returns (header, rows);
    ``short`` names metrics without their notes (for a terminal or a log line)."""
    comparisons = compare_run(run) if comparisons is None else comparisons
    labels = ordered_labels(run.results)
    columns, pairs, judged = _model_columns(labels)
    rows = []
    tasks = _by_task(run)
    for kind in ("bias", "capability"):
        for task, by_label in tasks.items():
            first = next(iter(by_label.values()))
            if first.kind != kind:
                continue
            for name in [primary_metric(first), *[m for m in HEADLINE_EXTRA.get(task, ()) if m in first.metrics]]:
                ideal = ideal_of(first, name)
                label = name if short else metric_label(task, name)
                rows.append([task, label + (f" (ideal {ideal:g})" if ideal is not None else ""),
                             *_model_cells(name, by_label, labels, pairs, judged, comparisons.get(task, {}))])
    return ["task", "metric", *columns], rows


def headline_markdown(run: EvalRun, comparisons: Mapping[str, Any] | None = None, short: bool = False) -> list[str]:
    head, rows = headline_rows(run, comparisons, short)
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *["| " + " | ".join(r) + " |" for r in rows]]


def _category_table(by_label: Mapping[str, TaskResult], metric: str, labels: list[str]) -> list[str]:
    groups = sorted({g for r in by_label.values() for g, ms in r.breakdown.items() if metric in ms})
    if not groups:
        return []
    deltas = [lab for lab in labels if lab != "base" and "base" in by_label]
    head = ["category", "n", *labels, *[f"Δ {lab}" for lab in deltas]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        vals = {lab: by_label[lab].breakdown.get(g, {}).get(metric) for lab in labels if lab in by_label}
        n = next((v.n for v in vals.values() if v is not None), 0)
        cells = [g, str(n)] + [fmt(v.value, v.stderr) if v else "—" for v in vals.values()]
        for lab in deltas:
            v, b = vals.get(lab), vals.get("base")
            cells.append(fmt(*_delta(v, b), signed=True, ref=b.value) if v and b else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _disturbance_section(run: EvalRun, tasks: Mapping[str, Mapping[str, TaskResult]], labels: list[str]) -> list[str]:
    """How much each edited model disturbs the base (mean KL on neutral text, recorded by apply as ``kl``), and each
    task's headline change per unit of it: an edit that moves bias only as far as its disturbance moves everything
    is no debiasing (``workflows/matched_control.py``)."""
    kl = {lab: run.models.get(lab, {}).get("kl") for lab in labels if lab != "base"}
    kl = {lab: v for lab, v in kl.items() if isinstance(v, int | float) and v > 0}
    if not kl:
        return []
    out = ["", "## Disturbance", "",
           "Mean KL divergence from the base model's next-token distributions on neutral text (nats per token; "
           "`bakeedit/data/neutral_text.txt`), and each task's headline change from base per unit of it.", "",
           "| task | metric | " + " | ".join(f"Δ {lab} / KL" for lab in kl) + " |",
           "|---|---|" + "---|" * len(kl),
           "| (KL) | | " + " | ".join(f"{v:.3g}" for v in kl.values()) + " |"]
    for task, by_label in tasks.items():
        base = by_label.get("base")
        if base is None:
            continue
        metric = primary_metric(base)
        cells = []
        for lab, v in kl.items():
            r = by_label.get(lab)
            a, b = (r.metrics.get(metric) if r else None), base.metrics.get(metric)
            ok = a is not None and b is not None and a.value is not None and b.value is not None
            cells.append(f"{(a.value - b.value) / v:+.3g}" if ok else "—")
        out.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    return out


def render_report(run: EvalRun, plots: Mapping[str, str] | None = None,
                  comparisons: Mapping[str, Any] | None = None) -> str:
    """The markdown report; ``plots`` maps a plot key (task name, or ``capability_deltas`` / ``bias_deltas``) to
    its path relative to the report; ``comparisons`` from :func:`~bakeedit.evaluate.compare.compare_run`
    (computed when not given)."""
    plots = plots or {}
    comparisons = compare_run(run) if comparisons is None else comparisons
    labels = ordered_labels(run.results)
    tasks = _by_task(run)
    cfg = run.config
    limit = cfg.get("limit")
    out = ["# Evaluation report", ""]
    if run.models:
        out += ["| model | what |", "|---|---|"]
        out += [f"| {lab} | {run.models[lab].get('description', run.models[lab].get('ref', ''))} |"
                for lab in labels if lab in run.models]
        out.append("")
    split = cfg.get("split", "all")
    out.append(f"Tasks: {', '.join(tasks) or 'none'}. "
               + (f"Items of the {split} split only (the fixed dev/test partition of docs/data.md). "
                  if split != "all" else "")
               + (f"Each task scored on a seeded sample of at most {limit} items (seed {cfg.get('seed', 0)}); "
                  if limit else "All items of each task; ")
               + "values are `value ± bootstrap standard error`, resampling clusters of related items (BBQ "
                 "templates, StereoSet targets, WinoGender occupations, gender-word words; other items alone)."
               + (" Differences `a − b` are paired: every model scored the same items, and the ± and the p-values "
                  "come from one cluster bootstrap of both models (1000 resamples; † marks an unpaired difference "
                  "of results without per-item scores). The verdict says whether the edit is better than the "
                  "reference, closer to the unbiased value (bias metrics with an ideal) or moved in the metric's "
                  "direction, with the two-sided bootstrap p-value of that gain; 'no better' at p ≥ 0.05."
                  if comparison_pairs(labels) else ""))
    if tasks:
        out += ["", "## Headline", "", "Each task's headline metric (all metrics below).", "",
                *headline_markdown(run, comparisons)]
    for kind, title in (("bias", "Bias"), ("capability", "Capability")):
        sub = {t: b for t, b in tasks.items() if next(iter(b.values())).kind == kind}
        if not sub:
            continue
        out += ["", f"## {title}", "", *_metric_table(sub, labels, comparisons)]
        if kind == "capability" and "capability" in plots:
            out += ["", f"![capability scores]({plots['capability']})"]
        if kind == "capability" and "capability_deltas" in plots:
            out += ["", f"![capability deltas]({plots['capability_deltas']})"]
        if kind == "bias" and "bias_deltas" in plots:
            out += ["", f"![bias deltas]({plots['bias_deltas']})"]
    bias_tasks = {t: b for t, b in tasks.items() if next(iter(b.values())).kind == "bias"}
    out += _disturbance_section(run, tasks, labels)
    if bias_tasks:
        out += ["", "## Bias per category"]
        for task, by_label in bias_tasks.items():
            metric = primary_metric(next(iter(by_label.values())))
            table = _category_table(by_label, metric, labels)
            if not table:
                continue
            out += ["", f"### {task}: {metric}", "", *table]
            if task in plots:
                out += ["", f"![{task} per category]({plots[task]})"]
    out += ["", "## Data", "", "| task | version | items | of | source | sha256 |", "|---|---|---|---|---|---|"]
    for task, by_label in tasks.items():
        r = next(iter(by_label.values()))
        total = cfg.get("n_total", {}).get(task, "")
        out.append(f"| {task} | {r.version} | {r.n} | {total} | `{r.data_source}` | `{r.data_sha256[:16]}` |")
    if run.skipped:
        out += ["", "## Not run", ""] + [f"- {t}: {why}" for t, why in run.skipped.items()]
    if run.timings_s:
        out += ["", "## Time", "", ", ".join(f"{k} {v:.1f} s" for k, v in run.timings_s.items())]
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------------- writing


def write_plots(folder: Path, run: EvalRun) -> dict[str, str]:
    """Draw every plot into ``folder/plots``; returns plot key -> path relative to ``folder``."""
    written: dict[str, str] = {}
    tasks = _by_task(run)
    for task, by_label in tasks.items():
        first = next(iter(by_label.values()))
        if first.kind != "bias":
            continue
        metric = primary_metric(first)
        path = plot_categories(folder / PLOTS_DIR / f"bias_{task}.png", task, metric, by_label, ideal_of(first, metric))
        if path is not None:
            written[task] = str(path.relative_to(folder))
    shares = []
    for task, by_label in tasks.items():
        first = next(iter(by_label.values()))
        metric = primary_metric(first)
        if first.kind == "capability" and metric in SHARE_METRICS:
            shares.append((task, metric, {lab: r.metrics[metric] for lab, r in by_label.items()
                                          if metric in r.metrics}))
    path = plot_scores(folder / PLOTS_DIR / "capability.png", "capability: headline metric per task", shares, CHANCE)
    if path is not None:
        written["capability"] = str(path.relative_to(folder))
    for kind in ("capability", "bias"):
        rows = []
        for task, by_label in tasks.items():
            first = next(iter(by_label.values()))
            if first.kind == kind:
                metric = primary_metric(first)
                rows.append((task, metric, {lab: r.metrics[metric] for lab, r in by_label.items()
                                            if metric in r.metrics}))
        path = plot_deltas(folder / PLOTS_DIR / f"{kind}_deltas.png", f"{kind} metrics: change from base", rows)
        if path is not None:
            written[f"{kind}_deltas"] = str(path.relative_to(folder))
    return written


def write_results(folder: Path, run: EvalRun | Mapping[str, list[TaskResult]], plots: bool = True) -> Path:
    """Write ``results.json``, ``report.md`` and the plots into ``folder`` (created); returns the report path.
    ``run`` may be a plain ``{label: [TaskResult, ...]}`` mapping."""
    if not isinstance(run, EvalRun):
        run = EvalRun(dict(run))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    comparisons = compare_run(run)
    (folder / RESULTS_FILE).write_text(json.dumps(run_to_json(run, comparisons), indent=1) + "\n")
    written = write_plots(folder, run) if plots else {}
    report = folder / REPORT_FILE
    report.write_text(render_report(run, written, comparisons))
    return report
