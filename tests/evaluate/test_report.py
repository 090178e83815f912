"""results.json / report.md / plots from hand-made task results of three models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from bakeedit.errors import DataError
from bakeedit.evaluate import MetricValue, TaskResult
from bakeedit.evaluate.report import fmt, improved, read_results, render_report, write_results
from bakeedit.evaluate.runner import EvalRun
from bakeedit.evaluate.stats import ItemScores
from bakeedit.evaluate.tasks.crows_pairs import crows_metrics


def mv(name: str, value: float, stderr: float | None = 2.0, better: bool | None = None) -> MetricValue:
    return MetricValue(name, value, stderr, 100, better)


def crows(pct: float, gender: float) -> TaskResult:
    return TaskResult("crows_pairs", "1", "bias", {"pct_stereotype": mv("pct_stereotype", pct)}, 100,
                      "/data/crows_pairs/crows.csv", "ab" * 32, 100, 0,
                      {"gender": {"pct_stereotype": mv("pct_stereotype", gender)},
                       "race-color": {"pct_stereotype": mv("pct_stereotype", pct)}})


def arc(acc: float) -> TaskResult:
    return TaskResult("arc_easy", "1", "capability", {"acc": mv("acc", acc, 0.01, True)}, 100, "/data/arc",
                      "cd" * 32, 100, 0)


def make_run() -> EvalRun:
    return EvalRun(
        {"edited": [crows(52.0, 50.0), arc(0.60)], "base": [crows(60.0, 70.0), arc(0.62)],
         "control": [crows(58.0, 66.0), arc(0.61)]},
        config={"limit": 100, "seed": 0, "n_total": {"crows_pairs": 1508}},
        models={"base": {"ref": "embedded", "description": "`embedded`"}},
    )


def test_improved_uses_ideal_then_direction() -> None:
    assert improved(mv("ss", 55.0), mv("ss", 62.0), 50.0) is True
    assert improved(mv("ss", 40.0), mv("ss", 55.0), 50.0) is False  # overshooting the ideal is worse here
    assert improved(mv("acc", 0.5, better=True), mv("acc", 0.6, better=True), None) is False
    assert improved(mv("x", 1.0), mv("x", 2.0), None) is None
    assert improved(mv("x", float("nan")), mv("x", 2.0), 0.0) is None


def test_fmt() -> None:
    assert fmt(57.456, 3.21) == "57.5 ± 3.2"
    assert fmt(0.61234, 0.0123) == "0.612 ± 0.012"
    assert fmt(-8.0, math.hypot(2, 2), signed=True, ref=60.0) == "-8.0 ± 2.8"
    assert fmt(-8.0, math.hypot(2, 2), signed=True) == "-8.00 ± 2.83"
    assert fmt(float("nan")) == "—"


def test_write_results(tmp_path: Path) -> None:
    report = write_results(tmp_path / "eval", make_run())
    folder = report.parent
    text = report.read_text()
    # columns: base, edited, control, then deltas of edited and control against base
    head = ("| task | metric | ideal | base | edited | control | edited − base | control − base | edited − control "
            "| verdict (edited vs control) |")
    assert head in text
    # results without per-item scores (written before them): unpaired differences, marked †, and no verdict
    assert "| crows_pairs | pct_stereotype (whole sentence, lm-eval) | 50 | 60.0 ± 2.0 | 52.0 ± 2.0 | 58.0 ± 2.0 | " \
           "-8.0 ± 2.8 † | -2.0 ± 2.8 † | -6.0 ± 2.8 † | not tested (no per-item scores) |" in text
    assert "| arc_easy | acc | — | 0.620 ± 0.010 | 0.600 ± 0.010 | 0.610 ± 0.010 | -0.020 ± 0.014 † | " \
           "-0.010 ± 0.014 † | -0.010 ± 0.014 † | not tested (no per-item scores) |" in text
    assert "| gender | 100 | 70.0 ± 2.0 | 50.0 ± 2.0 | 66.0 ± 2.0 | -20.0 ± 2.8 | -4.0 ± 2.8 |" in text
    assert "| crows_pairs | 1 | 100 | 1508 | `/data/crows_pairs/crows.csv` | `abababababababab` |" in text
    for png in ("plots/bias_crows_pairs.png", "plots/capability.png", "plots/capability_deltas.png",
                "plots/bias_deltas.png"):
        assert f"]({png})" in text
        assert (folder / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    raw = json.loads((folder / "results.json").read_text())
    row = next(r for r in raw["rows"] if r["model"] == "control" and r["task"] == "crows_pairs"
               and r["group"] == "gender")
    assert row["value"] == 66.0 and row["stderr"] == 2.0 and row["n"] == 100
    assert row["data_sha256"] == "ab" * 32 and row["data_source"] == "/data/crows_pairs/crows.csv"
    back = read_results(folder)
    assert back.results["edited"][0].to_json() == crows(52.0, 50.0).to_json()
    assert back.config["limit"] == 100


def test_single_model_report_has_no_delta_columns(tmp_path: Path) -> None:
    text = render_report(EvalRun({"model": [crows(55.0, 50.0)]}))
    assert "| task | metric | ideal | model |" in text and "Δ" not in text.split("## Bias per category")[0]


def test_single_model_capability_run_has_a_score_plot(tmp_path: Path) -> None:
    """A capability run without a baseline (no deltas) still draws and links the per-task score plot; perplexity
    (not a share in [0, 1]) stays out of it."""
    ppl = TaskResult("perplexity", "1", "capability", {"word_perplexity": mv("word_perplexity", 40.0, 1.0, False)},
                     100, "/data/hs", "ef" * 32, 100, 0)
    report = write_results(tmp_path / "eval", EvalRun({"model": [arc(0.6), ppl]}))
    text = report.read_text()
    assert "](plots/capability.png)" in text and "capability_deltas" not in text
    assert (report.parent / "plots" / "capability.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (report.parent / "plots").iterdir()) == ["capability.png"]


def test_read_results_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such results file"):
        read_results(tmp_path)
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(DataError, match=r"not a bakeedit results\.json"):
        read_results(tmp_path)


# ---------------------------------------------------------------------------------------- paired verdicts

N = 40


def crows_items(n_more: int, n: int = 100) -> TaskResult:
    """100 pairs; sent_more is the likelier one on the first ``n_more`` (log-likelihood gap +0.5, else -0.5), in
    both the whole-sentence and the shared-token score."""
    more = np.where(np.arange(n) < n_more, -1.0, -2.0)
    less = np.full(n, -1.5)
    items = ItemScores.build([str(i) for i in range(n)], ll_more=more, ll_less=less, sll_more=more, sll_less=less)
    return TaskResult("crows_pairs", "2", "bias", crows_metrics(more, less, 0, more, less), n, "crows.csv",
                      "ab" * 32, n, 0, items=items)


def arc_items(n_right: int) -> TaskResult:
    acc = (np.arange(N) < n_right).astype(float)
    return TaskResult("arc_easy", "1", "capability", {"acc": mv("acc", float(acc.mean()), 0.07, True)}, N, "arc",
                      "cd" * 32, N, 0, items=ItemScores.build([str(i) for i in range(N)], acc=acc))


def paired_run() -> EvalRun:
    """base and control: stereotyped on 75 of 100 pairs, 30 of 40 ARC items right; edited: stereotyped on 50 of
    those 75 (50 %: the ideal), right on 10 of those 30 ARC items."""
    return EvalRun({"base": [crows_items(75), arc_items(30)], "edited": [crows_items(50), arc_items(10)],
                    "control": [crows_items(75), arc_items(30)]}, config={"limit": 100, "seed": 0})


def row_cells(text: str, task: str, metric: str) -> list[str]:
    """A row of the full metric tables (after the headline table, which repeats the headline metrics)."""
    before, _, after = text.partition("\n## Headline\n")
    full = before + after.partition("\n## ")[2]
    line = next(ln for ln in full.splitlines() if ln.startswith(f"| {task} | {metric}"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_verdicts_of_paired_results(tmp_path: Path) -> None:
    report = write_results(tmp_path / "eval", paired_run(), plots=False)
    text = report.read_text()
    dev = row_cells(text, "crows_pairs", "stereotype_dev (")
    assert dev[1:3] == ["stereotype_dev (distance of pct_stereotype from 50, whole sentence)", "0"]
    assert [c.split(" ±")[0] for c in dev[3:6]] == ["25.0", "0.000", "25.0"]  # base, edited, control
    assert dev[-1].startswith("beats control (p=") and "†" not in " ".join(dev)
    # every pair has the same 0.5 gap in absolute value: nothing to tell the models apart
    assert row_cells(text, "crows_pairs", "likelihood_diff")[-1] == "no better than control (p=1)"
    # edited is right only where control is: worse on every resample
    assert row_cells(text, "arc_easy", "acc")[-1] == "worse than control (p=0.002)"
    assert row_cells(text, "arc_easy", "acc")[-2].startswith("-0.500 ± ")  # the paired difference, no †
    # the headline table opens the report with the same numbers and verdicts
    headline = text.split("## Headline", 1)[1].split("\n## ", 1)[0]
    row = next(ln for ln in headline.splitlines() if ln.startswith("| crows_pairs |"))
    assert "stereotype_dev" in row and "(ideal 0)" in row and "beats control (p=" in row
    assert "| arc_easy | acc |" in headline and "worse than control (p=0.002)" in headline

    raw = json.loads((report.parent / "results.json").read_text())
    row = next(r for r in raw["paired"] if r["task"] == "crows_pairs" and r["metric"] == "stereotype_dev"
               and r["a"] == "edited" and r["b"] == "control")
    assert row["delta"] == pytest.approx(-25.0) and row["gain"] == pytest.approx(25.0) and row["gain_p"] < 0.05
    assert raw["results"]["edited"][0]["items"]["values"]["ll_more"][:2] == [-1.0, -1.0]
    # read back (as `bakeedit card` does): the same per-item scores, so the same verdicts
    back = read_results(report.parent)
    assert np.array_equal(back.results["edited"][1].items.values["acc"], arc_items(10).items.values["acc"])
    assert render_report(back) == text


def test_old_results_without_item_scores_still_load(tmp_path: Path) -> None:
    write_results(tmp_path, paired_run(), plots=False)
    raw = json.loads((tmp_path / "results.json").read_text())
    for results in raw["results"].values():
        for r in results:
            del r["items"]
    del raw["paired"]
    (tmp_path / "results.json").write_text(json.dumps(raw))
    back = read_results(tmp_path)
    assert back.results["edited"][0].items is None
    assert "not tested (no per-item scores)" in render_report(back)


def test_without_a_control_the_verdict_is_against_base() -> None:
    run = EvalRun({"base": [arc_items(30)], "edited": [arc_items(10)]}, config={"seed": 0})
    text = render_report(run)
    assert "| verdict (edited vs base) |" in text
    assert row_cells(text, "arc_easy", "acc")[-1] == "worse than base (p=0.002)"
