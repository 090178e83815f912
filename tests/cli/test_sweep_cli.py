"""``bakeedit sweep`` on a tiny checkpoint with real (sampled) benchmark data."""

from __future__ import annotations

import json

from click.testing import CliRunner

from bakeedit.cli import main


def test_sweep_writes_tradeoff_and_marks_the_front(tmp_path, tiny_checkpoint, shared_data):
    base = tiny_checkpoint("llama")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"name: sweep-test\nmodel: {base}\n"
        "neurons:\n  - {layer: 0, site: mlp.act, index: 3}\n  - {layer: 2, site: attn.v, index: 1, lambda: 5}\n"
        f"evaluate: {{tasks: [crows_pairs, copa], limit: 6, data_dir: {shared_data}}}\n"
    )
    out = tmp_path / "sweep"
    result = CliRunner().invoke(main, ["sweep", str(recipe), "--lambda", "0,1,4", "-o", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["lambdas"] == [0.0, 1.0, 4.0]
    assert summary["bias_axis"]["task"] == "crows_pairs" and summary["capability_axis"]["task"] == "copa"
    assert summary["bias_axis"]["ideal"] is not None
    assert summary["pareto"] and set(summary["pareto"]) <= {0.0, 1.0, 4.0}
    results = json.loads((out / "eval" / "results.json").read_text())
    labels = {row["model"] for row in results["rows"]}
    assert labels == {"lambda=0", "lambda=1", "lambda=4"}
    # lambda=1 is the unedited base; lambda=0 masks, so at least one bias number must move.
    by = {(r["model"], r["task"], r["metric"], r.get("group")): r["value"] for r in results["rows"]}
    moved = [k for k in by if k[0] == "lambda=0" and by[k] != by.get(("lambda=1", *k[1:]))]
    assert moved, "masking the neurons changed no metric: the hooks were not applied"
    assert (out / "tradeoff.png").stat().st_size > 5000
    assert "| 4 |" in (out / "sweep.md").read_text()
    assert str(out / "sweep.md") in result.stdout


def test_sweep_rejects_bad_lambda_list(tmp_path, tiny_checkpoint):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: x\nmodel: {tiny_checkpoint('llama')}\nneurons: [{{layer: 0, site: mlp.act, index: 1}}]\n"
                      "evaluate: {tasks: [copa]}\n")
    result = CliRunner().invoke(main, ["sweep", str(recipe), "--lambda", "0,abc", "-o", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert "--lambda: '0,abc' is not a comma-separated list of numbers" in result.stderr
    assert not (tmp_path / "o").exists()
