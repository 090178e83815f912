"""The one bootstrap (bakeedit.evaluate.stats): cluster resampling checked against numpy by hand, clusters versus
items on clustered data, and the paired p-value and verdict on constructed models."""

from __future__ import annotations

import numpy as np
import pytest

from bakeedit.evaluate.compare import Difference, fmt_p, verdict
from bakeedit.evaluate.stats import (
    ItemScores,
    bootstrap_se,
    item_bootstrap_ses,
    mean_se,
    paired_bootstrap,
    two_sided_p,
)

# 7 items in 3 clusters, listed out of order so that "clusters numbered by first appearance" matters:
# cluster "a" = items 0, 3; cluster "b" = items 1, 4, 6; cluster "c" = item 2 and 5
VALUES = np.array([1.0, 4.0, 0.0, 3.0, 2.0, 5.0, 6.0])
CLUSTERS = ["a", "b", "c", "a", "b", "c", "b"]
MEMBERS_BY_HAND = [[0, 3], [1, 4, 6], [2, 5]]


def hand_cluster_se(seed: int, n_boot: int) -> float:
    """The documented algorithm written out with numpy alone."""
    rng = np.random.default_rng(seed)
    means = []
    for _ in range(n_boot):
        draws = rng.integers(0, 3, 3)
        idx = [i for d in draws for i in MEMBERS_BY_HAND[d]]
        means.append(VALUES[idx].mean())
    return float(np.std(means, ddof=1))


def test_cluster_bootstrap_matches_the_algorithm_written_out_with_numpy() -> None:
    expected = hand_cluster_se(seed=7, n_boot=50)
    assert mean_se(VALUES, CLUSTERS, n_boot=50, seed=7) == pytest.approx(expected, rel=1e-12)
    assert bootstrap_se(7, lambda idx: VALUES[idx].mean(), CLUSTERS, n_boot=50, seed=7) == pytest.approx(
        expected, rel=1e-12)


def test_one_item_per_cluster_is_the_ordinary_bootstrap() -> None:
    rng = np.random.default_rng(3)
    expected = np.std([VALUES[rng.integers(0, 7, 7)].mean() for _ in range(40)], ddof=1)
    assert mean_se(VALUES, None, n_boot=40, seed=3) == pytest.approx(expected, rel=1e-12)
    assert mean_se(VALUES, [str(i) for i in range(7)], n_boot=40, seed=3) == pytest.approx(expected, rel=1e-12)


def test_fewer_than_two_clusters_has_no_standard_error() -> None:
    assert mean_se(VALUES, ["x"] * 7) is None
    assert bootstrap_se(1, lambda idx: 0.0) is None


@pytest.mark.parametrize("data_seed", range(5))
def test_resampling_items_understates_the_error_of_clustered_data(data_seed: int) -> None:
    """Property: 12 clusters of 6 near-copies (a cluster effect of sd 1, within-cluster noise of sd 0.05). The
    items are not 72 independent observations, and resampling them gives a much smaller standard error than
    resampling the 12 clusters."""
    rng = np.random.default_rng(data_seed)
    effects = rng.normal(0.0, 1.0, 12)
    values = np.repeat(effects, 6) + rng.normal(0.0, 0.05, 72)
    clusters = np.repeat(np.arange(12), 6).tolist()
    by_cluster = mean_se(values, clusters, seed=0)
    by_item = mean_se(values, None, seed=0)
    assert by_item < 0.6 * by_cluster


def test_a_cluster_drawn_twice_counts_twice_where_a_metric_groups_by_cluster() -> None:
    """A per-cluster average (StereoSet's per-target scores) over a resample must weight a twice-drawn cluster
    twice: the resample's cluster ids are the draw positions."""
    scores = ItemScores.build(CLUSTERS, x=VALUES)

    def per_cluster_mean(sc: ItemScores) -> dict[str, float]:
        keys = sorted(set(sc.clusters.tolist()))
        return {"m": float(np.mean([sc.values["x"][sc.clusters == k].mean() for k in keys]))}

    rng = np.random.default_rng(11)
    means = []
    for _ in range(30):
        draws = rng.integers(0, 3, 3)
        means.append(np.mean([VALUES[MEMBERS_BY_HAND[d]].mean() for d in draws]))
    expected = float(np.std(means, ddof=1))
    assert item_bootstrap_ses(scores, per_cluster_mean, n_boot=30, seed=11)["m"] == pytest.approx(expected, rel=1e-12)


def test_two_sided_p_by_hand() -> None:
    # 1 replicate <= 0, 3 >= 0 of 4: 2 * min(1 + 1, 3 + 1) / (4 + 1)
    assert two_sided_p(np.array([-1.0, 1.0, 2.0, 3.0])) == pytest.approx(0.8)
    assert two_sided_p(np.zeros(10)) == 1.0  # identical models
    assert two_sided_p(np.array([1.0])) is None


def accuracy(sc: ItemScores) -> dict[str, float]:
    return {"acc": float(sc.values["acc"].mean())}


def models(n: int = 40) -> dict[str, ItemScores]:
    """control right on items 0-9; edited right on those and on 10-24; a worse model right on none."""
    clusters = [f"t{i // 2}" for i in range(n)]  # pairs of items share a template
    make = lambda right: ItemScores.build(clusters, acc=(np.arange(n) < right).astype(float))  # noqa: E731
    return {"control": make(10), "edited": make(25), "worse": make(0)}


def test_paired_p_value_of_an_edit_that_beats_the_control() -> None:
    m = models()
    res = paired_bootstrap(m["edited"], m["control"], accuracy, {"acc": (None, True)}, n_boot=1000, seed=0)["acc"]
    assert res.delta == pytest.approx(15 / 40)
    assert res.gain == pytest.approx(15 / 40) and res.n_clusters == 20
    # edited is right wherever control is, so no resample has edited <= control unless it draws none of the 8
    # templates 5-12 where only edited is right: (12/20)^20 ~ 4e-5, none of 1000 resamples here
    assert res.gain_p == pytest.approx(2 / 1001)
    assert verdict(Difference(res.delta, res.se, res), "control") == "beats control (p=0.002)"
    # paired: the shared items cancel; the independent combination of the two models' errors is far larger
    unpaired = np.hypot(mean_se(m["edited"].values["acc"], list(m["edited"].clusters)),
                        mean_se(m["control"].values["acc"], list(m["control"].clusters)))
    assert res.se < unpaired


def test_verdict_wording_for_worse_equal_and_directionless_metrics() -> None:
    m = models()
    worse = paired_bootstrap(m["worse"], m["control"], accuracy, {"acc": (None, True)}, seed=0)["acc"]
    assert verdict(Difference(worse.delta, worse.se, worse), "control").startswith("worse than control (p=")
    same = paired_bootstrap(m["control"], m["control"], accuracy, {"acc": (None, True)}, seed=0)["acc"]
    assert verdict(Difference(same.delta, same.se, same), "control") == "no better than control (p=1)"
    free = paired_bootstrap(m["edited"], m["control"], accuracy, {}, seed=0)["acc"]  # no ideal, no direction
    assert free.gain is None
    assert verdict(Difference(free.delta, free.se, free), "base") == "differs from base (p=0.002)"
    assert verdict(Difference(0.1, 0.2, None), "control") == "not tested (no per-item scores)"


def test_an_ideal_turns_the_gain_into_closeness() -> None:
    """With an ideal of 0.5, moving from 0.25 to 0.625 is a gain of |0.25 - 0.5| - |0.625 - 0.5| = 0.125."""
    m = models()
    res = paired_bootstrap(m["edited"], m["control"], accuracy, {"acc": (0.5, None)}, seed=0)["acc"]
    assert res.gain == pytest.approx(0.125)


def test_models_that_scored_different_items_are_refused() -> None:
    a = ItemScores.build(["x", "y"], acc=[1.0, 0.0])
    b = ItemScores.build(["x", "z"], acc=[1.0, 0.0])
    with pytest.raises(ValueError, match="same items"):
        paired_bootstrap(a, b, accuracy, {})


def test_item_scores_round_trip_json_with_undefined_values() -> None:
    sc = ItemScores.build(["a", "b"], {"category": ["Age", "Race"]}, x=[1.5, float("nan")])
    back = ItemScores.from_json(sc.to_json())
    assert back.to_json() == {"clusters": ["a", "b"], "values": {"x": [1.5, None]},
                              "labels": {"category": ["Age", "Race"]}}
    assert np.isnan(back.values["x"][1])


def test_fmt_p() -> None:
    assert fmt_p(0.0004) == "p<0.001"
    assert fmt_p(0.0123) == "p=0.012"
    assert fmt_p(0.0496) == "p=0.0496"  # not "0.05" beside a verdict decided at 0.05
    assert fmt_p(0.43) == "p=0.43"
