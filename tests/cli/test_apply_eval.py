"""``bakeedit apply`` with an ``evaluate:`` block: base, edited and random control scored, report and card written."""

from __future__ import annotations

import json
from collections import Counter

from click.testing import CliRunner
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, AutoTokenizer

from bakeedit.cli import main
from bakeedit.edit import build_plan, fold_plan
from bakeedit.evaluate.report import read_results
from bakeedit.evaluate.runner import evaluate_models
from bakeedit.models.arch import ModelLayout
from bakeedit.neurons import NeuronSet
from bakeedit.recipe import EditSpec

NEURONS = """neurons:
  - {layer: 0, site: mlp.act, index: 3}
  - {layer: 0, site: mlp.act, index: 9}
  - {layer: 2, site: attn.v, index: 1, lambda: 0}
"""


#: Strong enough to move crows_pairs' continuous metrics of the tiny model well beyond float noise (by ~0.03).
LAMBDA = 10
#: Metrics that move with any change of the logits (pct_stereotype and copa's acc count 5 items and may not).
CONTINUOUS = ("ll_gap", "likelihood_diff")


def write_recipe(tmp_path, base, shared_data, tasks="[crows_pairs, copa]"):
    path = tmp_path / "r.yaml"
    path.write_text(f"name: eval-test\nmodel: {base}\nedit: {{lambda: {LAMBDA}}}\n{NEURONS}"
                    f"evaluate: {{tasks: {tasks}, limit: 5, seed: 1, data_dir: {shared_data}}}\n")
    return path


def test_apply_scores_base_edited_and_control_and_writes_the_card(tmp_path, tiny_checkpoint, shared_data):
    out = tmp_path / "out"
    base = tiny_checkpoint("llama")
    result = CliRunner().invoke(main, ["apply", str(write_recipe(tmp_path, base, shared_data)), "-o", str(out)])
    assert result.exit_code == 0, result.output

    run = read_results(out / "eval")
    assert set(run.results) == {"base", "edited", "control"}
    for label, tasks in run.results.items():
        assert sorted(r.task for r in tasks) == ["copa", "crows_pairs"], label
        assert all(r.n == 5 and r.limit == 5 and r.seed == 1 for r in tasks), label
    assert (out / "eval" / "report.md").is_file()

    located = json.loads((out / "neurons.json").read_text())["neurons"]
    control = json.loads((out / "neurons-random.json").read_text())["neurons"]
    assert Counter((n["layer"], n["site"]) for n in control) == Counter((n["layer"], n["site"]) for n in located)
    assert not {(n["layer"], n["site"], n["index"]) for n in control} & {
        (n["layer"], n["site"], n["index"]) for n in located}

    # Each label was scored on its own model: the three differ, and each equals scoring that model directly.
    got = {label: _continuous(tasks) for label, tasks in run.results.items()}
    for a, b in (("edited", "base"), ("control", "base"), ("control", "edited")):
        assert max(abs(got[a][m] - got[b][m]) for m in CONTINUOUS) > 0.01, (a, b, got)
    direct = _score_directly(base, out, shared_data)
    for label in ("base", "edited", "control"):
        assert all(abs(got[label][m] - direct[label][m]) <= 1e-4 for m in CONTINUOUS), (label, got, direct)

    # The control is matched: its lambdas (recorded per neuron) make it disturb the base as much as the edit does.
    kl_edit, kl_control = run.models["edited"]["kl"], run.models["control"]["kl"]
    assert kl_edit > 0 and abs(kl_control - kl_edit) <= 0.05 * kl_edit, run.models
    assert all("lambda" in n for n in control) and {n["lambda"] for n in control} != {LAMBDA}
    assert "## Disturbance" in (out / "eval" / "report.md").read_text()

    prov = json.loads((out / "bakeedit.json").read_text())
    assert set(prov["evaluation"]["labels"]) == {"base", "control", "edited"}
    assert prov["evaluation"]["control_neurons"] == "neurons-random.json"
    assert "neurons-random.json" in prov["files_sha256"]  # the control is evidence too: verify/push re-check it

    card = ModelCard.load(out / "README.md")
    metrics = {(r.task_type, r.metric_type) for r in card.data.eval_results}
    assert any(m == "pct_stereotype" for _, m in metrics) and any(m == "acc" for _, m in metrics)
    assert "random" in card.text.lower()

    assert CliRunner().invoke(main, ["verify", str(out)]).exit_code == 0  # eval files do not break the hashes


def _continuous(tasks) -> dict[str, float]:
    (crows,) = [r for r in tasks if r.task == "crows_pairs"]
    return {m: crows.metrics[m].value for m in CONTINUOUS}


def _score_directly(base, out, shared_data) -> dict[str, dict[str, float]]:
    """crows_pairs on the base checkpoint, on the baked folder reloaded with bare transformers, and on the base with
    the control's neurons folded in (not through the hooks apply uses): what each label must have measured."""
    def load(folder):
        return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)

    control_model, tokenizer = load(base)
    layout = ModelLayout.for_model(control_model)
    control = NeuronSet.load(out / "neurons-random.json")
    fold_plan(control_model, layout, build_plan(control.neurons, EditSpec.model_validate({"lambda": LAMBDA}), layout))
    run = evaluate_models({"base": load(base), "edited": load(out), "control": (control_model, tokenizer)},
                          ["crows_pairs"], data_dir=shared_data, limit=5, seed=1)
    return {label: _continuous(tasks) for label, tasks in run.results.items()}


def test_no_eval_skips_the_evaluation_but_still_writes_the_card(tmp_path, tiny_checkpoint, shared_data):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, tiny_checkpoint("qwen2"), shared_data)
    result = CliRunner().invoke(main, ["apply", str(recipe), "-o", str(out), "--no-eval"])
    assert result.exit_code == 0, result.output
    assert not (out / "eval").exists() and not (out / "neurons-random.json").exists()
    assert json.loads((out / "bakeedit.json").read_text())["evaluation"] is None
    card = ModelCard.load(out / "README.md")
    assert "bakeedit" in card.data.tags and not card.data.eval_results


def test_a_bad_push_target_is_refused_before_any_work(tmp_path, tiny_checkpoint, shared_data):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, tiny_checkpoint("llama"), shared_data)
    result = CliRunner().invoke(main, ["apply", str(recipe), "-o", str(out), "--push", "not a/repo id!"])
    assert result.exit_code == 1
    assert "--push" in result.stderr and "not a valid repository id" in result.stderr
    assert not out.exists()


def test_an_unknown_task_is_refused_before_any_work(tmp_path, tiny_checkpoint, shared_data):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, tiny_checkpoint("llama"), shared_data, tasks="[crows_pairs, stereoset_intra]")
    result = CliRunner().invoke(main, ["apply", str(recipe), "-o", str(out)])
    assert result.exit_code == 1
    first = result.stderr.strip().splitlines()[0]
    assert "evaluate.tasks" in first and "stereoset_intra" in first, result.stderr
    assert not out.exists()
