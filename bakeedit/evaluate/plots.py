"""PNG plots of an evaluation (matplotlib, Agg backend, so no display is needed).

- per bias task: its headline metric per category (BBQ category, CrowS bias type, StereoSet domain, ...), one bar
  per model (base / edited / control), bootstrap standard errors as error bars, the ideal value as a dashed line;
- capability scores: each capability task's headline accuracy, one bar per model, bootstrap standard errors as
  error bars and the task's chance level as a black tick (drawn for a single model too, so every run has a plot);
- capability deltas: ``model - base`` of each capability task's headline metric, error bars
  ``sqrt(se_model^2 + se_base^2)`` (independent-samples approximation, conservative for paired items).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bakeedit.evaluate.tasks.base import MetricValue, TaskResult

COLORS = {"base": "#7f7f7f", "edited": "#1f77b4", "control": "#ff7f0e", "model": "#1f77b4"}


def _se(m: MetricValue | None) -> float:
    return 0.0 if m is None or m.stderr is None or not math.isfinite(m.stderr) else m.stderr


def _save(fig, ax, path: Path) -> Path:
    """Legend, layout, write ``path`` (its folder created) and free the figure: the end of every plot here."""
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_categories(
    path: Path,
    task: str,
    metric: str,
    by_label: Mapping[str, TaskResult],
    ideal: float | None = None,
) -> Path | None:
    """Grouped bars of ``metric`` per breakdown group of ``task``, one bar per model label; None when no result has
    that metric in its breakdown."""
    groups = sorted({g for r in by_label.values() for g, ms in r.breakdown.items() if metric in ms})
    if not groups:
        return None
    labels = list(by_label)
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(groups) * max(1, len(labels)) / 1.5), 4.2))
    for k, label in enumerate(labels):
        res = by_label[label]
        vals = [res.breakdown.get(g, {}).get(metric) for g in groups]
        xs = [i + (k - (len(labels) - 1) / 2) * width for i in range(len(groups))]
        ys = [v.value if v is not None else float("nan") for v in vals]
        ax.bar(xs, ys, width, yerr=[_se(v) for v in vals], capsize=2, label=label,
               color=COLORS.get(label), alpha=0.9)
    if ideal is not None:
        ax.axhline(ideal, color="black", linestyle="--", linewidth=1, label=f"ideal ({ideal:g})")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(metric)
    ax.set_title(f"{task}: {metric} per category")
    return _save(fig, ax, path)


def plot_deltas(
    path: Path,
    title: str,
    rows: Sequence[tuple[str, str, Mapping[str, MetricValue]]],
    baseline: str = "base",
) -> Path | None:
    """Horizontal bars of ``label - baseline`` per ``(task, metric, {label: value})`` row; None when there is no
    label besides the baseline."""
    labels = sorted({lab for _, _, vals in rows for lab in vals if lab != baseline},
                    key=lambda s: (s != "edited", s))
    rows = [r for r in rows if baseline in r[2]]
    if not labels or not rows:
        return None
    height = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(7.0, 1.0 + 0.45 * len(rows) * len(labels)))
    for k, label in enumerate(labels):
        ys, ds, es = [], [], []
        for i, (_, _, vals) in enumerate(rows):
            if label not in vals:
                continue
            base, other = vals[baseline], vals[label]
            ys.append(i + (k - (len(labels) - 1) / 2) * height)
            ds.append(other.value - base.value)
            es.append(math.hypot(_se(base), _se(other)))
        ax.barh(ys, ds, height, xerr=es, capsize=2, label=f"{label} - {baseline}", color=COLORS.get(label))
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{t} {m}" for t, m, _ in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"difference from {baseline}")
    ax.set_title(title)
    return _save(fig, ax, path)


def plot_scores(
    path: Path,
    title: str,
    rows: Sequence[tuple[str, str, Mapping[str, MetricValue]]],
    chance: Mapping[str, float] | None = None,
) -> Path | None:
    """Grouped bars of each ``(task, metric, {label: value})`` row, one bar per label, standard errors as error bars
    and ``chance[task]`` as a black tick; None when there are no rows."""
    if not rows:
        return None
    labels = list(dict.fromkeys(lab for _, _, vals in rows for lab in vals))
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(rows) * max(1, len(labels)) / 1.5), 4.2))
    for k, label in enumerate(labels):
        vals = [r[2].get(label) for r in rows]
        xs = [i + (k - (len(labels) - 1) / 2) * width for i in range(len(rows))]
        ax.bar(xs, [v.value if v is not None else float("nan") for v in vals], width,
               yerr=[_se(v) for v in vals], capsize=2, label=label, color=COLORS.get(label), alpha=0.9)
    marked = False
    for i, (task, _, _) in enumerate(rows):
        if chance and task in chance:
            ax.hlines(chance[task], i - 0.45, i + 0.45, color="black", linestyle=":", linewidth=1.2,
                      label=None if marked else "chance")
            marked = True
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{t}\n{m}" for t, m, _ in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    return _save(fig, ax, path)
