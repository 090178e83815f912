"""The task interface's helpers: bootstrap stderr, seeded sampling, data-source resolution, result round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bakeedit.errors import DataError, RecipeError
from bakeedit.evaluate import (
    MetricValue,
    TaskResult,
    UnknownTaskError,
    available_tasks,
    bootstrap_stderr,
    get_task,
    resolve_source,
    sample_items,
)


def test_bootstrap_stderr_of_a_mean_matches_the_analytic_value():
    values = np.r_[np.ones(30), np.zeros(70)]
    analytic = values.std(ddof=0) / np.sqrt(len(values))  # the bootstrap estimates the plug-in standard error
    assert bootstrap_stderr(values, n_boot=4000) == pytest.approx(analytic, rel=0.08)
    assert bootstrap_stderr(values, seed=1) == bootstrap_stderr(values, seed=1)
    assert np.isnan(bootstrap_stderr([1.0]))
    assert bootstrap_stderr(np.ones(10)) == 0.0


def test_bootstrap_stderr_over_indices_for_ratio_metrics():
    num, den = np.arange(1.0, 21.0), np.full(20, 2.0)
    via_idx = bootstrap_stderr(20, lambda idx: num[idx].sum() / den[idx].sum(), seed=3)
    # with a constant denominator the ratio of sums is the mean of per-item ratios: the same standard error
    via_values = bootstrap_stderr(num / den, statistic=np.mean, seed=3)
    assert via_idx > 0 and via_idx == pytest.approx(via_values, rel=0.1)


def test_sample_items_is_seeded_without_replacement_and_keeps_order():
    items = list(range(100))
    a = sample_items(items, 10, seed=5)
    assert a == sample_items(items, 10, seed=5) and a == sorted(a) and len(set(a)) == 10
    assert a != sample_items(items, 10, seed=6)
    assert sample_items(items, None, 0) == items and sample_items(items, 500, 0) == items


def test_resolve_source_order(tmp_path, monkeypatch):
    (tmp_path / "arc").mkdir()
    file = tmp_path / "arc" / "x.jsonl"
    file.write_text("{}\n")
    assert resolve_source(file, "arc") == file
    assert resolve_source(tmp_path, "arc") == tmp_path / "arc"  # a data root is descended into
    monkeypatch.setenv("BAKEEDIT_DATA_DIR", str(tmp_path))
    assert resolve_source(None, "arc") == tmp_path / "arc"
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert resolve_source("allenai/ai2_arc", "nope") == "allenai/ai2_arc"  # online: a Hub dataset id
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="neither a local file/folder nor"):
        resolve_source("allenai/ai2_arc", "nope")
    with pytest.raises(DataError, match=r"no data for 'nope'"):
        resolve_source(None, "nope", hf_dataset="allenai/ai2_arc")


def test_task_result_json_round_trip():
    m = MetricValue("acc", 0.5, 0.1, 10, True)
    r = TaskResult("arc_easy", "1", "capability", {"acc": m}, 10, "f.jsonl", "ab" * 32, 10, 0,
                   {"g": {"acc": MetricValue("acc", float("nan"), None, 0, True)}}, {"k": 1})
    d = json.loads(json.dumps(r.to_json()))  # strict JSON: NaN became null
    assert d["breakdown"]["g"]["acc"]["value"] is None
    back = TaskResult.from_json(d)
    assert back.metrics == r.metrics and back.extra == {"k": 1} and np.isnan(back.breakdown["g"]["acc"].value)


def test_registry_names_and_errors():
    caps = available_tasks("capability")
    for name in ("arc_easy", "arc_challenge", "openbookqa", "copa", "piqa", "hellaswag", "winogrande", "mmlu",
                 "gsm8k", "perplexity"):
        assert name in caps
    with pytest.raises(UnknownTaskError) as err:
        get_task("arc-easy")
    assert "arc_easy" in err.value.hint
    with pytest.raises(RecipeError, match="unknown MMLU subjects"):
        get_task("mmlu", subjects=["astrology"])
    with pytest.raises(RecipeError, match="does not accept options"):
        get_task("arc_easy", subjects=["x"])
