"""The one bootstrap of bakeedit's evaluation: cluster resampling, paired differences and their p-values.

Why clusters. Items of a benchmark are often not independent: BBQ's variants of one template (the same
``question_index`` of one category, ambiguous/disambiguated x negative/non-negative x the names filled in), the
StereoSet clusters of one target term, the WinoGender schemas of one occupation, the templates of one gender word.
Resampling single items then treats near-copies as independent evidence and understates the standard error; the
cluster (block) bootstrap resamples whole clusters with replacement instead (Davison & Hinkley 1997, sec. 3.8;
Field & Welsh 2007). With one item per cluster it is Efron's ordinary bootstrap (Efron & Tibshirani 1993).

Why paired. base, edited and control score the same seeded items, so the difference of two models is estimated on
the SAME resampled clusters: the item-to-item variation they share cancels, and the standard error of the
difference is much smaller than ``sqrt(se_a^2 + se_b^2)``. A metric that is not a mean of item scores (StereoSet's
ICAT, BBQ's s_AMB, WinoGender's correlation, CrowS' ``|pct - 50|``) is recomputed on each paired resample.

The algorithm, exactly (a test repeats it with numpy): the clusters are numbered in order of first appearance
(``K`` of them); ``rng = numpy.random.default_rng(seed)``; each of ``n_boot`` replicates draws
``rng.integers(0, K, K)`` and takes the items of the drawn clusters, in draw order (cluster members in item order).
The standard error is the ``ddof=1`` standard deviation of the statistic over the replicates where it is finite.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

N_BOOT = 1000
#: fewer replicates for statistics recomputed in Python on every resample (per-target averages, ratios)
N_BOOT_RECOMPUTED = 200
#: draws held in memory at once by the vectorised mean (1000 x 14k MMLU items at once is too much memory)
_CHUNK_DRAWS = 2_000_000

Statistic = Callable[[np.ndarray], float]


# ------------------------------------------------------------------------------------------------- clusters


def cluster_members(clusters: Sequence[Any] | None, n: int) -> list[np.ndarray]:
    """The item indices of each cluster, clusters in order of first appearance; every item its own cluster when
    ``clusters`` is None."""
    if clusters is None:
        return [np.array([i]) for i in range(n)]
    if len(clusters) != n:
        raise ValueError(f"{len(clusters)} cluster ids for {n} items")
    order: dict[Any, list[int]] = {}
    for i, c in enumerate(clusters):
        order.setdefault(c, []).append(i)
    return [np.array(m) for m in order.values()]


def resamples(members: list[np.ndarray], n_boot: int, seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``n_boot`` cluster resamples (the module docstring's algorithm): the item indices, and for each item the
    position of its cluster's draw, so that a cluster drawn twice counts as two clusters wherever a metric groups
    items by cluster (StereoSet's per-target averages, WinoGender's per-occupation correlation)."""
    rng = np.random.default_rng(seed)
    k = len(members)
    sizes = np.array([len(m) for m in members])
    singletons = bool((sizes == 1).all())
    flat = np.concatenate(members) if singletons else None
    for _ in range(n_boot):
        draws = rng.integers(0, k, k)
        if flat is not None:
            yield flat[draws], np.arange(k)
        else:
            yield np.concatenate([members[d] for d in draws]), np.repeat(np.arange(k), sizes[draws])


def resample_indices(members: list[np.ndarray], n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """The item indices of :func:`resamples`."""
    for idx, _ in resamples(members, n_boot, seed):
        yield idx


def group_keys(keys: Sequence[Any] | np.ndarray) -> np.ndarray:
    """Keys that ``np.unique`` sorts fast: a resample's integer cluster draws as they are, names as strings."""
    arr = np.asarray(keys)
    return arr.astype(str) if arr.dtype == object else arr


def _std(values: Sequence[float] | np.ndarray) -> float | None:
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    return float(np.std(arr, ddof=1)) if len(arr) > 1 else None


# ------------------------------------------------------------------------------------------------- one model


def bootstrap_se(n: int, statistic: Statistic, clusters: Sequence[Any] | None = None, n_boot: int = N_BOOT_RECOMPUTED,
                 seed: int = 0) -> float | None:
    """Cluster-bootstrap standard error of ``statistic(idx)``, a function of an index array into ``n`` items (for
    metrics computed from several per-item arrays, e.g. ``lambda idx: icat(lms[idx], ss[idx])``); resamples where
    it is undefined are skipped. None with fewer than two clusters."""
    members = cluster_members(clusters, n)
    if len(members) < 2:
        return None
    return _std([statistic(idx) for idx in resample_indices(members, n_boot, seed)])


def bootstrap_ses(n: int, statistics: Callable[[np.ndarray], Mapping[str, float]],
                  clusters: Sequence[Any] | None = None, n_boot: int = N_BOOT_RECOMPUTED,
                  seed: int = 0) -> dict[str, float | None]:
    """:func:`bootstrap_se` of several metrics at once: ``statistics(idx)`` returns every metric of one resample
    (computed once per resample, so metrics that share work, e.g. BBQ's scores of one set of predictions, share
    it). A metric undefined on a resample (no ambiguous item drawn) skips that resample only."""
    members = cluster_members(clusters, n)
    if len(members) < 2:
        return {}
    reps: dict[str, list[float]] = {}
    for idx in resample_indices(members, n_boot, seed):
        for k, v in statistics(idx).items():
            reps.setdefault(k, []).append(v)
    return {k: _std(v) for k, v in reps.items()}


def mean_se(values: Sequence[float] | np.ndarray, clusters: Sequence[Any] | None = None, n_boot: int = N_BOOT,
            seed: int = 0) -> float | None:
    """Cluster-bootstrap standard error of the mean of ``values``, vectorised: a replicate's mean is the sum of the
    drawn clusters' sums over the sum of their sizes (the same draws as :func:`bootstrap_se`)."""
    arr = np.asarray(values, dtype=np.float64)
    members = cluster_members(clusters, len(arr))
    k = len(members)
    if k < 2:
        return None
    sums = np.array([arr[m].sum() for m in members])
    sizes = np.array([float(len(m)) for m in members])
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_DRAWS // k)
    means = []
    for start in range(0, n_boot, chunk):
        draws = rng.integers(0, k, (min(chunk, n_boot - start), k))
        means.append(sums[draws].sum(axis=1) / sizes[draws].sum(axis=1))
    return _std(np.concatenate(means))


def analytic_mean_se(values: Sequence[float] | np.ndarray) -> float | None:
    """``std(ddof=1) / sqrt(n)``: the standard error of a mean of independent items (lm-eval's ``mean_stderr``)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(np.std(arr, ddof=1) / math.sqrt(len(arr))) if len(arr) > 1 else None


# ------------------------------------------------------------------------------------------------- item scores


@dataclass
class ItemScores:
    """Per-item scores of one task on one model, in item order, kept so that two models can be compared item by
    item: ``clusters`` (the task's cluster key per item), ``values`` (named float arrays, NaN where undefined) and
    ``labels`` (named string arrays, e.g. BBQ's category). Items are the same for every model of a run because the
    sample is seeded. Arrays are numpy arrays so that a resample (:meth:`take`) is one fancy index each."""

    clusters: np.ndarray
    values: dict[str, np.ndarray]
    labels: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.clusters)

    def take(self, idx: np.ndarray, clusters: np.ndarray | None = None) -> ItemScores:
        """The items at ``idx`` (a subset or a resample; ``clusters``: new cluster ids, e.g. a resample's draw
        positions from :func:`resamples`)."""
        return ItemScores(self.clusters[idx] if clusters is None else clusters,
                          {k: v[idx] for k, v in self.values.items()}, {k: v[idx] for k, v in self.labels.items()})

    def subset(self, mask: Sequence[bool] | np.ndarray) -> ItemScores:
        """The items where ``mask`` is true (a breakdown group)."""
        return self.take(np.flatnonzero(np.asarray(mask, dtype=bool)))

    def to_json(self) -> dict[str, Any]:
        return {"clusters": [str(c) for c in self.clusters],
                "values": {k: [None if not math.isfinite(x) else float(x) for x in v] for k, v in self.values.items()},
                "labels": {k: [str(x) for x in v] for k, v in self.labels.items()}}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ItemScores:
        values = {k: [np.nan if x is None else x for x in v] for k, v in d.get("values", {}).items()}
        return cls.build(d["clusters"], d.get("labels", {}), **values)

    @classmethod
    def build(cls, clusters: Sequence[Any], labels: Mapping[str, Sequence[Any]] | None = None,
              **values: Sequence[float] | np.ndarray) -> ItemScores:
        """ItemScores from plain sequences (cluster ids and labels as strings, values as float64)."""
        n = len(clusters)
        arrays = {k: np.asarray(v, dtype=np.float64).reshape(-1) for k, v in values.items()}
        texts = {k: np.array([str(x) for x in v], dtype=object) for k, v in (labels or {}).items()}
        for k, v in [*arrays.items(), *texts.items()]:
            if len(v) != n:
                raise ValueError(f"item scores {k!r}: {len(v)} values for {n} items")
        return cls(np.array([str(c) for c in clusters], dtype=object), arrays, texts)


def item_bootstrap_ses(scores: ItemScores, metrics: Callable[[ItemScores], Mapping[str, float]],
                       n_boot: int = N_BOOT_RECOMPUTED, seed: int = 0) -> dict[str, float | None]:
    """Cluster-bootstrap standard errors of every metric ``metrics(scores)`` returns, recomputed on each resample
    of ``scores``'s clusters (a cluster drawn twice is two clusters of the resample)."""
    members = cluster_members(list(scores.clusters), len(scores))
    if len(members) < 2:
        return {}
    reps: dict[str, list[float]] = {}
    for idx, copies in resamples(members, n_boot, seed):
        for k, v in metrics(scores.take(idx, copies)).items():
            reps.setdefault(k, []).append(v)
    return {k: _std(v) for k, v in reps.items()}


# ------------------------------------------------------------------------------------------------- two models


@dataclass(frozen=True)
class Paired:
    """``a - b`` of one metric on the same items: the difference, its paired cluster-bootstrap standard error, the
    two-sided p-value of "no difference" (see :func:`paired_bootstrap`), and the same for ``gain``, how much closer
    ``a`` is to the metric's goal than ``b`` (positive: ``a`` is better; None when the metric has no direction)."""

    delta: float
    se: float | None
    p: float | None
    gain: float | None
    gain_p: float | None
    n_clusters: int


def two_sided_p(replicates: np.ndarray) -> float | None:
    """The two-sided bootstrap p-value of "the difference is 0": ``2 * min(#(d* <= 0) + 1, #(d* >= 0) + 1) /
    (B + 1)``, capped at 1 (the percentile interval inverted, with the +1 of Davison & Hinkley 1997 eq. 4.11 so it
    is never 0). Identical models (every ``d* = 0``) give 1."""
    d = replicates[np.isfinite(replicates)]
    if len(d) < 2:
        return None
    b = len(d)
    return float(min(1.0, 2.0 * min(np.sum(d <= 0) + 1, np.sum(d >= 0) + 1) / (b + 1)))


def goodness(value: float, ideal: float | None, higher_is_better: bool | None) -> float | None:
    """How good a metric value is, larger = better: ``-|value - ideal|`` with an ideal, ``±value`` with a
    direction, None with neither."""
    if ideal is not None:
        return -abs(value - ideal)
    if higher_is_better is None:
        return None
    return value if higher_is_better else -value


def paired_bootstrap(a: ItemScores, b: ItemScores, metrics: Callable[[ItemScores], Mapping[str, float]],
                     directions: Mapping[str, tuple[float | None, bool | None]], n_boot: int = N_BOOT,
                     seed: int = 0) -> dict[str, Paired]:
    """Per metric, ``a - b`` with the paired cluster bootstrap: every replicate resamples the clusters once and
    computes ``metrics`` on both models' scores of those same items. ``directions`` maps a metric to its
    ``(ideal, higher_is_better)`` for the gain. The items (and clusters) must be the same for both."""
    return paired_bootstraps({"a": a, "b": b}, [("a", "b")], metrics, directions, n_boot, seed)[("a", "b")]


def paired_bootstraps(scores: Mapping[str, ItemScores], pairs: Sequence[tuple[str, str]],
                      metrics: Callable[[ItemScores], Mapping[str, float]],
                      directions: Mapping[str, tuple[float | None, bool | None]], n_boot: int = N_BOOT,
                      seed: int = 0) -> dict[tuple[str, str], dict[str, Paired]]:
    """:func:`paired_bootstrap` of several pairs of labelled models at once, on one set of cluster resamples
    (each model's metrics computed once per resample)."""
    labels = sorted({lab for pair in pairs for lab in pair})
    first = scores[labels[0]]
    for lab in labels[1:]:
        if len(scores[lab]) != len(first) or not np.array_equal(scores[lab].clusters, first.clusters):
            raise ValueError(f"{lab!r} and {labels[0]!r} did not score the same items")
    observed = {lab: dict(metrics(scores[lab])) for lab in labels}
    members = cluster_members(list(first.clusters), len(first))
    reps: dict[str, list[dict[str, float]]] = {lab: [] for lab in labels}
    if len(members) >= 2:
        for idx, copies in resamples(members, n_boot, seed):
            for lab in labels:
                reps[lab].append(dict(metrics(scores[lab].take(idx, copies))))
    out: dict[tuple[str, str], dict[str, Paired]] = {}
    for a, b in pairs:
        names = [k for k in observed[a] if k in observed[b]]
        out[(a, b)] = {k: _paired(k, observed[a], observed[b], reps[a], reps[b], directions.get(k, (None, None)),
                                  len(members)) for k in names}
    return out


def _paired(name: str, va: Mapping[str, float], vb: Mapping[str, float], ra: list[dict[str, float]],
            rb: list[dict[str, float]], direction: tuple[float | None, bool | None], n_clusters: int) -> Paired:
    d = np.array([x[name] - y[name] for x, y in zip(ra, rb, strict=True)], dtype=np.float64)
    ga, gb = goodness(va[name], *direction), goodness(vb[name], *direction)
    gain = None if ga is None or gb is None or not math.isfinite(ga - gb) else ga - gb
    gain_p = None
    if gain is not None:
        g = np.array([goodness(x[name], *direction) - goodness(y[name], *direction)  # type: ignore[operator]
                      for x, y in zip(ra, rb, strict=True)], dtype=np.float64)
        gain_p = two_sided_p(g)
    return Paired(va[name] - vb[name], _std(d), two_sided_p(d), gain, gain_p, n_clusters)
