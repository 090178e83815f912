"""``bakeedit search`` on a tiny checkpoint: it scores dev items only, resumes its study, and writes a recipe.

The dev/test partition itself (``split_of``) is pinned in tests/evaluate/test_splits.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from locate.coco_helpers import write_contrast_file

import bakeedit.workflows.search as search_mod
from bakeedit.cli import main
from bakeedit.evaluate.tasks.base import Task, get_task
from bakeedit.recipe import load_recipe

TASKS = ("crows_pairs", "copa")


def search_recipe(folder: Path, model: Path, data: Path) -> Path:
    write_contrast_file(folder / "contrast.jsonl")  # 2 categories x 5 locate items
    path = folder / "search.yaml"
    path.write_text(
        f"name: tiny-search\nmodel: {model}\n"
        "locate: {method: coco, prompts: contrast.jsonl, answer_format: raw, batch_size: 2, top_fraction: 0.05}\n"
        "edit: {lambda: 1.5}\n"
        f"evaluate: {{tasks: [crows_pairs], limit: 4, data_dir: {data}}}\n"
        "search:\n  trials: 2\n  tasks: [crows_pairs]\n  capability_tasks: [copa]\n  limit: 5\n  max_kl: 50\n"
        "  space:\n    lambda: {low: 0.0, high: 3.0}\n    locate.top_fraction: {low: 0.02, high: 0.2, log: true}\n"
        "    locate.layer_range: {low: 0, high: 1}\n"
    )
    return path


@pytest.fixture
def scored(monkeypatch):
    """Every item any task scores, as ``(task, repr(item))``."""
    seen: list[tuple[str, str]] = []
    real = {name: type(get_task(name)).evaluate for name in TASKS}

    def spy(name):
        def evaluate(self, scorer, data):
            seen.extend((self.name, repr(item)) for item in data.items)
            return real[name](self, scorer, data)
        return evaluate

    for name in TASKS:
        monkeypatch.setattr(type(get_task(name)), "evaluate", spy(name))
    return seen


def test_search_scores_dev_items_only_resumes_and_writes_a_recipe(tmp_path, tiny_checkpoint, shared_data, monkeypatch,
                                                                  scored):
    monkeypatch.setenv("BAKEEDIT_CACHE", str(tmp_path / "cache"))
    recipe = search_recipe(tmp_path, tiny_checkpoint("llama"), shared_data)
    out, db = tmp_path / "out", tmp_path / "study.db"
    args = ["search", str(recipe), "-o", str(out), "--storage", str(db)]
    calls = []
    real_call = search_mod._Trials.__call__
    monkeypatch.setattr(search_mod._Trials, "__call__", lambda self, trial: calls.append(trial.number)
                        or real_call(self, trial))

    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert calls == [0, 1]
    first = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert [t["number"] for t in first] == [0, 1]

    # resuming: the two stored trials are kept as they were, only the third is run
    result = CliRunner().invoke(main, [*args, "--trials", "3", "--overwrite"])
    assert result.exit_code == 0, result.output
    assert calls == [0, 1, 2]
    trials = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert [t["number"] for t in trials] == [0, 1, 2]
    assert [t["values"] for t in trials[:2]] == [t["values"] for t in first[:2]]
    assert [t.get("advantage") for t in trials[:2]] == [t.get("advantage") for t in first[:2]]
    # a resumed sampler draws new values (one seeded as at the start re-draws trial 0's)
    assert trials[2]["values"] not in [t["values"] for t in trials[:2]]

    # an interrupted trial is not counted: the next run does it again
    def interrupt(*_a, **_k):
        raise KeyboardInterrupt
    monkeypatch.setattr(search_mod, "suggest", interrupt)
    result = CliRunner().invoke(main, [*args, "--trials", "4", "--overwrite"])
    assert result.exit_code != 0
    monkeypatch.undo()  # the spies too: the last run only has to finish
    monkeypatch.setenv("BAKEEDIT_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(main, [*args, "--trials", "4", "--overwrite"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "search.json").read_text())
    assert summary["trials"] == 4 and summary["split"] == "dev" and summary["kind"] == "search"
    values = [json.dumps(t["values"], sort_keys=True)
              for t in map(json.loads, (out / "trials.jsonl").read_text().splitlines())]
    assert len(values) == len(set(values)) == 4, "a resumed study repeated a trial's values"

    # nothing but dev items was ever scored, and both tasks were
    test_items = {(name, repr(it)) for name in TASKS
                  for it in get_task(name).load_split(shared_data, None, 0, "test").items}
    assert {task for task, _ in scored} == set(TASKS)
    assert not test_items & set(scored), "search scored test items"
    dev_items = {(name, repr(it)) for name in TASKS
                 for it in get_task(name).load_split(shared_data, None, 0, "dev").items}
    assert set(scored) <= dev_items

    for name in ("front.md", "front.png", "trials.md", "study.db"):
        assert (out / name).stat().st_size > 0, name
    if summary["chosen"] is not None:
        chosen = next(t for t in trials if t["number"] == summary["chosen"]) if summary["chosen"] < 3 else None
        written = load_recipe(out / "recipe.yaml")
        assert written.recipe.search is None and written.recipe.evaluate.split == "test"
        assert written.recipe.model.id and Path(written.recipe.model.id).exists()  # rebased beside the output
        assert (out / "recipe.yaml").read_text().startswith("# Chosen by `bakeedit search`")
        values = summary["chosen_values"]
        assert written.recipe.edit.lambda_ == pytest.approx(values["lambda"])
        assert written.recipe.locate.layer_range == tuple(values["locate.layer_range"])
        assert written.recipe.locate.params["top_fraction"] == pytest.approx(values["locate.top_fraction"])
        assert chosen is None or chosen["values"] == values
        first, last = values["locate.layer_range"]
        layers = {n["layer"] for n in json.loads((out / "neurons.json").read_text())["neurons"]}
        assert layers and all(first <= layer <= last for layer in layers), "locate.layer_range not applied"
        raw = yaml.safe_load((out / "recipe.yaml").read_text())
        assert raw["locate"]["prompts"] != "contrast.jsonl"  # relative to the output folder now
        assert (out / raw["locate"]["prompts"]).resolve() == (tmp_path / "contrast.jsonl").resolve()


def test_a_recipe_without_search_block_or_with_an_unknown_parameter_fails_in_one_line(tmp_path, tiny_checkpoint,
                                                                                      shared_data):
    recipe = search_recipe(tmp_path, tiny_checkpoint("llama"), shared_data)
    text = recipe.read_text()
    recipe.write_text(text.split("search:")[0])
    result = CliRunner().invoke(main, ["search", str(recipe), "-o", str(tmp_path / "o")])
    assert result.exit_code == 1 and "no search: block" in result.stderr
    recipe.write_text(text.replace("locate.top_fraction", "locate.top_fractoin"))
    result = CliRunner().invoke(main, ["search", str(recipe), "-o", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert "locate.top_fractoin is not a parameter of the coco method" in result.stderr
    assert not (tmp_path / "o").exists()


def test_score_trial_measures_the_edit_against_the_control():
    """The objective: the edit's mean relative reduction of the distance from the ideal minus the control's."""
    from bakeedit.evaluate.tasks.base import MetricValue, TaskResult

    def res(task, kind, metric, value):
        return TaskResult(task, "1", kind, {metric: MetricValue(metric, value, 0.01, 10, None)}, 10, "x", "y", None, 0)

    base = [res("crows_pairs", "bias", "pct_stereotype", 70.0), res("copa", "capability", "acc", 0.6)]
    baseline = search_mod.Baseline.from_results(base, ["crows_pairs"])
    edited = [res("crows_pairs", "bias", "pct_stereotype", 55.0), res("copa", "capability", "acc", 0.5)]
    control = [res("crows_pairs", "bias", "pct_stereotype", 45.0), res("copa", "capability", "acc", 0.6)]
    s = search_mod.score_trial(baseline, edited, control)
    # |55 - 50| = 5 of the base's 20: 0.75 reduction; the control overshoots to |45 - 50| = 5 too: 0.75
    assert s["reduction_edited"] == pytest.approx(0.75) and s["reduction_control"] == pytest.approx(0.75)
    assert s["advantage"] == pytest.approx(0.0)
    control[0] = res("crows_pairs", "bias", "pct_stereotype", 66.0)
    s = search_mod.score_trial(baseline, edited, control)
    assert s["advantage"] == pytest.approx(0.75 - 0.2)
    assert s["capability"] == {"base": 0.6, "edited": 0.5, "control": 0.6}


def test_load_split_is_a_partition_by_cluster(shared_data):
    task: Task = get_task("winogender")
    everything = task.load_split(shared_data, None, 0, "all").items
    dev = task.load_split(shared_data, None, 0, "dev").items
    test = task.load_split(shared_data, None, 0, "test").items
    assert len(dev) + len(test) == len(everything) and dev and test
    clusters = {split: {task.cluster_of(it, 0) for it in items} for split, items in (("dev", dev), ("test", test))}
    assert not clusters["dev"] & clusters["test"], "an occupation straddles dev and test"
    # the partition does not depend on limit or seed: a sample is drawn inside the split
    sample = task.load_split(shared_data, 10, 3, "dev").items
    assert len(sample) == 10 and {repr(x) for x in sample} <= {repr(x) for x in dev}


def test_the_chosen_trial_is_one_whose_edit_reduced_bias_when_there_is_one():
    """An edit that raised bias, less than its matched control did, has the larger advantage but is no debiasing:
    the chosen trial is the best of those whose own edit reduced bias; only when none did is the front's best taken
    (and front.md says so)."""
    row = lambda n, adv, kl, own, feasible=True: search_mod.TrialRow(  # noqa: E731
        n, "complete", {}, adv, kl, feasible, {"reduction_edited": own})
    raised = row(0, 0.18, 0.02, -0.13)  # raised bias, its control raised it more
    reduced = row(3, 0.11, 0.004, 0.02)
    small = row(9, 0.08, 0.001, 0.015)
    over_budget = row(5, 0.30, 0.5, 0.2, feasible=False)
    assert search_mod.chosen_of([raised, reduced, small, over_budget]).number == 3
    assert search_mod.chosen_of([raised, row(4, -0.1, 0.01, 0.05)]).number == 0  # none reduced and beat: the front's
    assert search_mod.reduces_bias(reduced) and not search_mod.reduces_bias(raised)


def test_trials_and_front_mark_a_control_that_is_not_kl_matched():
    """A nonlinear edit's control keeps the edit's map (no lambda to scale): its advantage compares controls of
    unequal strength, and both tables and the chosen trial's sentence say so; a matched control is not marked."""
    from bakeedit.recipe import load_recipe

    matched = search_mod.TrialRow(1, "complete", {"locate.top_fraction": 0.01}, 0.2, 0.004, True,
                                  {"reduction_edited": 0.1, "kl_control": 0.0041, "control_matched": True})
    unmatched = search_mod.TrialRow(2, "complete", {"locate.top_fraction": 0.02}, 0.3, 0.0066, True,
                                    {"reduction_edited": 0.2, "kl_control": 0.0075, "control_matched": False})
    trials = search_mod.render_trials([matched, unmatched], [matched, unmatched], unmatched)
    lines = {line.split(" | ")[0]: line for line in trials.splitlines() if line.startswith("| 1 ") or
             line.startswith("| 2 ")}
    assert "0.0075 *not matched*" in lines["| 2"] and "not matched" not in lines["| 1"] and "0.0041" in lines["| 1"]
    lr = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "search-ne-coco-smollm2.yaml")
    baseline = search_mod.Baseline({"winogender": {"metric": "abs_gap", "value": 1.0}}, None)
    front = search_mod.render_front(lr, [matched, unmatched], unmatched, baseline, lr.recipe.search, 60, 2)
    assert "Its control is **not KL-matched** (KL 0.0075 against the edit's 0.0066" in front
    front = search_mod.render_front(lr, [matched, unmatched], matched, baseline, lr.recipe.search, 60, 2)
    assert "not KL-matched" not in front
    header = search_mod.chosen_recipe(lr, unmatched, "k", lr.path.parent).splitlines()[1]
    assert "advantage over the random control, not KL-matched, +0.300" in header
    header = search_mod.chosen_recipe(lr, matched, "k", lr.path.parent).splitlines()[1]
    assert "advantage over the KL-matched random control +0.200" in header


def test_the_study_key_names_a_data_directory_however_it_is_spelt(tmp_path, tiny_checkpoint, shared_data,
                                                                  monkeypatch):
    """A resumed search found no study when ``$BAKEEDIT_DATA_DIR`` was spelt differently (``/work/main/../shared/data``
    against ``/work/shared/data``) and started again from trial 0."""
    recipe = load_recipe(search_recipe(tmp_path, tiny_checkpoint("llama"), shared_data))
    monkeypatch.chdir(shared_data.parent)
    detour = shared_data.resolve().parent / ".." / shared_data.resolve().parent.name / shared_data.name
    keys = {search_mod.study_key(recipe, 5, spelt) for spelt in
            (shared_data.resolve(), str(detour), Path(shared_data.name))}
    assert len(keys) == 1
    other = tmp_path / "other-data"
    other.mkdir()
    assert search_mod.study_key(recipe, 5, other) not in keys
    assert search_mod.study_key(recipe, 6, shared_data) not in keys
