"""The Pareto front of a lambda sweep, on hand-made points."""

from __future__ import annotations

from bakeedit.workflows.pareto import SweepPoint, pareto_front, plot_tradeoff


def test_front_keeps_exactly_the_non_dominated_points():
    points = [
        SweepPoint(0.0, bias=0.30, capability=0.50),  # dominated by lambda 1 (less bias, more capability)
        SweepPoint(1.0, bias=0.20, capability=0.60),  # front: highest capability
        SweepPoint(2.0, bias=0.10, capability=0.55),  # front: trades capability for bias
        SweepPoint(3.0, bias=0.10, capability=0.40),  # dominated by lambda 2 (same bias, less capability)
        SweepPoint(4.0, bias=0.05, capability=0.30),  # front: least bias
    ]
    assert [p.lam for p in pareto_front(points)] == [4.0, 2.0, 1.0]


def test_ties_are_both_kept():
    a, b = SweepPoint(1.0, 0.1, 0.5), SweepPoint(2.0, 0.1, 0.5)
    assert pareto_front([a, b]) == [a, b]


def test_plot_is_written(tmp_path):
    points = [SweepPoint(1.0, 0.2, 0.6, 0.01, 0.02), SweepPoint(2.0, 0.1, 0.5)]
    path = plot_tradeoff(points, tmp_path / "sweep.png", "crows_pairs |stereo% - 50|", "arc_easy acc")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 5000
