"""COCO's selection: the neurons under a loss threshold (``top_fraction`` of those scored, per category or overall),
their union, and a permutation null that says whether the threshold is beyond what chance produces.

Two readings of "keep about 1% of the neurons" (``selection``): ``per_category`` (METHODS.md: a threshold epsilon per
category, ~1% of the scored neurons each, then the union over categories, which is larger than 1% when categories
pick different neurons) and ``overall`` (one ranking by each neuron's best category, so exactly ``top_fraction`` of
the scored neurons are kept, the abstract's "approximately 1% of the total neurons").

The null relabels X and Y at random *within* each item (the two prompts of one context swap sides with probability
1/2), keeping the pairing, and scores every neuron again. If the real threshold ``epsilon`` is not clearly below the
null's, the category's "COCO neurons" are indistinguishable from noise at this sample size; the report says so.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any, Literal

import torch

from bakeedit.data.contrast import ContrastItem
from bakeedit.errors import DataError
from bakeedit.locate.coco.responses import tensor_name
from bakeedit.locate.coco.score import SiteScores, chance_loss, infonce_loss, score_site
from bakeedit.models.spec import site_order
from bakeedit.neurons import Neuron, NeuronSet

Address = tuple[int, str, int]


@dataclass
class CocoResult:
    """Everything the scoring found; :meth:`neuron_set` and :meth:`report` are what a run hands out."""

    n_layers: int
    sites: list[str]
    answer_format: str
    categories: dict[str, dict[str, Any]] = field(default_factory=dict)
    # (layer, site, index) -> {"loss", "score", "cohens_d", "categories"} of the selected neurons
    selected: dict[Address, dict[str, Any]] = field(default_factory=dict)
    # category -> (layer, site) -> mean score of all the cell's neurons (the distribution, not only the picks)
    cell_means: dict[str, dict[tuple[int, str], float]] = field(default_factory=dict)
    selection: dict[str, Any] = field(default_factory=dict)  # how the kept set was chosen (mode, k, threshold)

    def neuron_set(self) -> NeuronSet:
        order = sorted(self.selected, key=lambda a: (a[0], site_order(a[1]), a[2]))
        neurons = [Neuron(layer=a[0], site=a[1], index=a[2], score=round(self.selected[a]["score"], 6)) for a in order]
        return NeuronSet(method="coco", neurons=neurons)

    def report(self) -> dict[str, Any]:
        per_cell = Counter(f"{layer}/{site}" for layer, site, _ in self.selected)
        deep = sum(1 for a in self.selected if a[0] >= self.n_layers // 2)
        return {
            "method": "coco",
            "answer_format": self.answer_format,
            "selection": self.selection,
            "n_selected": len(self.selected),
            "per_site": {s: sum(1 for a in self.selected if a[1] == s) for s in self.sites},
            "per_layer_site": dict(sorted(per_cell.items(), key=lambda kv: (int(kv[0].split("/")[0]), kv[0]))),
            "share_in_deeper_half": deep / max(1, len(self.selected)),
            "categories": self.categories,
            "mean_score_per_layer_site": {
                cat: {f"{layer}/{site}": round(v, 5) for (layer, site), v in cells.items()}
                for cat, cells in self.cell_means.items()
            },
            "neurons": [
                {"layer": a[0], "site": a[1], "index": a[2], **stats}
                for a, stats in sorted(self.selected.items(), key=lambda kv: -kv[1]["score"])
            ],
        }


#: Neurons scored per tensor operation. Few large operations rather than one per (layer, site): on a shared CPU
#: every parallel region waits for all of torch's threads, and thousands of small ones cost minutes.
CHUNK = 8192


@dataclass
class _Wide:
    """One category's responses with every (layer, site) side by side on the channel axis."""

    x: torch.Tensor  # [n, t, N]
    y: torch.Tensor  # [n, t, N]
    cells: list[tuple[int, str]]
    offsets: list[int]  # offsets[j] = first column of cells[j]; offsets[-1] = N

    def address(self, column: int) -> Address:
        cell = bisect_right(self.offsets, column) - 1
        layer, site = self.cells[cell]
        return layer, site, column - self.offsets[cell]


def _widen(responses: dict[str, dict[str, torch.Tensor]], items: list[ContrastItem], n_layers: int,
           sites: list[str]) -> _Wide:
    cells = [(layer, site) for layer in range(n_layers) for site in sites]
    x = torch.stack([torch.cat([responses[it.id][tensor_name("x", *c)] for c in cells], dim=-1) for it in items])
    y = torch.stack([torch.cat([responses[it.id][tensor_name("y", *c)] for c in cells], dim=-1) for it in items])
    sizes = [responses[items[0].id][tensor_name("x", *c)].shape[-1] for c in cells]
    return _Wide(x, y, cells, [0, *accumulate(sizes)])


def _score_wide(x: torch.Tensor, y: torch.Tensor, temperature: float) -> SiteScores:
    parts = [score_site(x[..., i : i + CHUNK], y[..., i : i + CHUNK], temperature)
             for i in range(0, x.shape[-1], CHUNK)]
    return SiteScores(*(torch.cat([getattr(p, f) for p in parts]) for f in ("loss", "score", "cohens_d",
                                                                              "degenerate")))


def _null_losses(wide: _Wide, temperature: float, degenerate: torch.Tensor, generator: torch.Generator
                 ) -> torch.Tensor:
    """Every non-degenerate neuron's loss with X/Y swapped inside a random half of the items."""
    flip = (torch.rand(len(wide.x), generator=generator) < 0.5)[:, None, None]
    x, y = torch.where(flip, wide.y, wide.x), torch.where(flip, wide.x, wide.y)
    loss = torch.cat([infonce_loss(x[..., i : i + CHUNK], y[..., i : i + CHUNK], temperature)
                      for i in range(0, x.shape[-1], CHUNK)])
    return loss[~degenerate]


Selection = Literal["per_category", "overall"]


def _picks(values: torch.Tensor, k: int) -> list[int]:
    """Columns of the ``k`` lowest finite ``values`` (ties by column, i.e. address order)."""
    return torch.argsort(values, stable=True)[: min(k, int(torch.isfinite(values).sum()))].tolist()


def score_categories(
    responses: dict[str, dict[str, torch.Tensor]],
    groups: dict[str, list[ContrastItem]],
    n_layers: int,
    sites: list[str],
    temperature: float,
    top_fraction: float,
    answer_format: str = "",
    null_permutations: int = 1,
    seed: int = 0,
    on_category: Callable[[str], None] | None = None,
    selection: Selection = "per_category",
) -> CocoResult:
    """Score, select and unite (``coco`` module docstring, steps 3-5) on recorded responses.

    ``selection="per_category"``: each category keeps its ``k = round(top_fraction * scored)`` lowest-loss neurons
    (its threshold epsilon) and the kept set is their union, so it holds between ``k`` and ``categories * k``
    neurons. ``selection="overall"``: every neuron is ranked by its best category's score ``1 - loss / chance`` (the
    loss normalised by the category's chance level, so categories of different sizes compare) and the ``k`` best
    overall are kept, so the kept set is ``top_fraction`` of the scored neurons (the paper's "about 1% of all
    neurons"); a neuron's ``categories`` are then those whose own score reaches that common threshold.
    """
    result = CocoResult(n_layers=n_layers, sites=list(sites), answer_format=answer_format)
    generator = torch.Generator().manual_seed(seed)
    scored: dict[str, SiteScores] = {}
    wides: dict[str, _Wide] = {}
    nulls: dict[str, torch.Tensor] = {}  # category -> sorted null losses
    k = 1
    for category, items in groups.items():
        if len(items) < 2:
            raise DataError(f"category '{category}' has {len(items)} item(s); COCO needs at least 2 per category")
        wide = _widen(responses, items, n_layers, sites)
        scores = scored[category] = _score_wide(wide.x, wide.y, temperature)
        k = max(1, round(top_fraction * len(scores.loss)))
        if null_permutations > 0:
            nulls[category] = torch.cat([_null_losses(wide, temperature, scores.degenerate, generator)
                                         for _ in range(null_permutations)]).sort().values
        wides[category] = _Wide(wide.x[:0], wide.y[:0], wide.cells, wide.offsets)  # keep the addresses only
        if on_category is not None:
            on_category(category)
    if not scored:
        return result
    n_scored = len(next(iter(scored.values())).loss)

    chosen: dict[str, list[int]] = {}  # category -> its selected columns, best first
    if selection == "per_category":
        for category, scores in scored.items():
            chosen[category] = _picks(scores.loss.masked_fill(scores.degenerate, float("inf")), k)
        threshold = None
    else:
        per_category = torch.stack([sc.score.masked_fill(sc.degenerate, -float("inf")) for sc in scored.values()])
        best = per_category.amax(dim=0)
        overall = _picks(-best, k)
        threshold = float(best[overall[-1]]) if overall else None
        for row, category in enumerate(scored):
            members = [c for c in overall if float(per_category[row, c]) >= threshold]
            chosen[category] = sorted(members, key=lambda c, row=row: -float(per_category[row, c]))

    for category, picks in chosen.items():
        scores, wide = scored[category], wides[category]
        for column in picks:
            address = wide.address(column)
            stats = {"loss": float(scores.loss[column]), "score": float(scores.score[column]),
                     "cohens_d": float(scores.cohens_d[column]), "categories": [category]}
            old = result.selected.get(address)
            if old is not None:
                best_stats = old if old["score"] >= stats["score"] else stats
                stats = {**best_stats, "categories": [*old["categories"], category]}
            result.selected[address] = stats
        losses = [float(scores.loss[c]) for c in picks]
        n_items = len(groups[category])
        summary: dict[str, Any] = {
            "n_items": n_items, "n_scored": n_scored, "k": len(picks),
            "epsilon_loss": max(losses) if losses else None, "best_loss": min(losses) if losses else None,
            "chance_loss": chance_loss(n_items, n_items),
            "per_site": {s: sum(1 for c in picks if wide.address(c)[1] == s) for s in sites},
        }
        null = nulls.get(category)
        if null is not None and len(null) and picks:
            null_eps = float(null[min(len(null), k * null_permutations) - 1])
            summary.update({
                "null_permutations": null_permutations,
                "null_epsilon_loss": null_eps,
                "null_best_loss": float(null[0]),
                "n_beyond_null_best": sum(v < float(null[0]) for v in losses),
                "n_beyond_null_epsilon": sum(v < null_eps for v in losses),
            })
        result.categories[category] = summary
        result.cell_means[category] = {
            cell: float(scores.score[wide.offsets[j] : wide.offsets[j + 1]].mean()) for j, cell in enumerate(wide.cells)
        }
    result.selection = {"mode": selection, "top_fraction": top_fraction, "n_scored": n_scored, "k": k,
                        **({"score_threshold": threshold} if selection == "overall" else {})}
    return result
