"""The bias-vs-capability trade-off of a lambda sweep: the Pareto front and its plot.

Each swept lambda gives one point: a *bias* value (lower is better: the distance of a bias metric from its ideal)
and a *capability* value (higher is better). A point is on the Pareto front when no other point has both lower or
equal bias and higher or equal capability, one of them strictly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SweepPoint:
    lam: float
    bias: float
    capability: float
    bias_stderr: float | None = None
    capability_stderr: float | None = None


def pareto_front(points: Sequence[SweepPoint]) -> list[SweepPoint]:
    """Points not dominated by any other (lower bias and higher capability are better), sorted by bias."""
    front = []
    for p in points:
        dominated = any(
            q.bias <= p.bias and q.capability >= p.capability and (q.bias < p.bias or q.capability > p.capability)
            for q in points
        )
        if not dominated:
            front.append(p)
    return sorted(front, key=lambda p: (p.bias, -p.capability))


def plot_tradeoff(points: Sequence[SweepPoint], path: Path, bias_label: str, capability_label: str) -> Path:
    """Scatter of the sweep with error bars, each point labelled by its lambda, the Pareto front drawn as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    front = pareto_front(points)
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    ax.errorbar(
        [p.bias for p in points], [p.capability for p in points],
        xerr=[p.bias_stderr or 0.0 for p in points], yerr=[p.capability_stderr or 0.0 for p in points],
        fmt="o", color="tab:blue", ecolor="lightgray", capsize=3, label="lambda setting",
    )
    ax.plot([p.bias for p in front], [p.capability for p in front], "-", color="tab:red", label="Pareto front")
    for p in points:
        ax.annotate(f"λ={p.lam:g}", (p.bias, p.capability), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel(f"{bias_label} (lower is better)")
    ax.set_ylabel(f"{capability_label} (higher is better)")
    ax.set_title("bias vs capability across lambda")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
