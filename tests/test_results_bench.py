"""``bench/results.py --recipes``: a recipe without ``search:`` (a paper setting) is applied as written, its
evaluation moved to the test split with the table's tasks, rendered as a row, and not redone when run again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from bakeedit.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]


def _results(*args: str, cwd: Path, data: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "BAKEEDIT_DATA_DIR": str(data), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "bench" / "results.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


def test_a_recipe_without_search_is_applied_as_given_on_the_test_split(tmp_path, tiny_checkpoint, shared_data):
    base = tiny_checkpoint("llama")
    recipe = tmp_path / "paper.yaml"
    recipe.write_text(f"name: paper-setting\nmodel: {{id: {base}}}\n"
                      "neurons:\n  - {layer: 0, site: mlp.act, index: 3}\n  - {layer: 2, site: attn.v, index: 1}\n"
                      "edit: {lambda: 4}\n"
                      "evaluate: {tasks: [copa], limit: 4, seed: 1, control: false}\n")
    work, table = tmp_path / "work", tmp_path / "table.md"
    done = _results("--recipes", str(recipe), "--work", str(work), "--write", str(table), cwd=tmp_path,
                    data=shared_data)
    assert done.returncode == 0, done.stderr + done.stdout

    folder = work / "paper-setting"
    written = load_recipe(folder / "recipe.yaml").recipe
    # model and edit as written; the evaluation on the test split, its own task kept and the table's added,
    # the KL-matched control switched on (the recipe had it off)
    assert written.model.id == str(base) and written.edit.lambda_ == 4
    assert written.evaluate.split == "test" and written.evaluate.limit == 4
    assert written.evaluate.control is True and written.evaluate.control_match == "kl"
    assert {"copa", "bbq", "winogender", "arc_easy"} <= set(written.evaluate.tasks)
    prov = json.loads((folder / "baked" / "bakeedit.json").read_text())
    assert prov["verification"]["passed"] is True
    assert [n["index"] for n in json.loads((folder / "baked" / "neurons.json").read_text())["neurons"]] == [3, 1]

    rows = [line for line in table.read_text().splitlines() if line.startswith(f"| {base} |")]
    assert rows and "| paper-setting (listed neurons, as given) | as given (no search) |" in rows[0]
    assert "2 (attn.v 1, mlp.act 1)" in rows[0] and "BBQ s_AMB" in rows[0]
    assert any("WinoGender" in line for line in table.read_text().splitlines())
    # BBQ per category: the test items split by category, so the categories' item counts add up to the task's
    categories = [line.split(" | ") for line in table.read_text().split("BBQ per category")[1].splitlines()
                  if line.startswith(f"| {base} |")]
    bbq_n = next(r["n"] for r in json.loads((folder / "baked" / "eval" / "results.json").read_text())["results"]
                 ["base"] if r["task"] == "bbq")
    assert categories and sum(int(row[3]) for row in categories) == bbq_n == 4

    # again: the baked folder names this recipe's hash, so nothing is re-applied; only-render gives the same row
    again = _results("--recipes", str(recipe), "--work", str(work), cwd=tmp_path, data=shared_data)
    assert again.returncode == 0, again.stderr
    assert (folder / "log.txt").read_text().count("$ bakeedit apply") == 1
    render = _results("--recipes", str(recipe), "--work", str(work), "--only-render", cwd=tmp_path,
                      data=shared_data)
    assert render.returncode == 0 and rows[0] in render.stdout

    # a fresh checkout has no run folders (out/ is not in git): re-rendering the table there carries its measured
    # rows over unchanged, and says so, instead of turning them into "not run yet"
    before = table.read_text()
    carried = _results("--recipes", str(recipe), "--work", str(tmp_path / "elsewhere"), "--only-render",
                       "--write", str(table), cwd=tmp_path, data=shared_data)
    assert carried.returncode == 0, carried.stderr
    after = table.read_text()
    block = [line for line in before.splitlines() if line.startswith(f"| {base} |") or line.startswith("| | ")]
    assert block and all(line in after.splitlines() for line in block)
    assert "not run yet" not in after and f"previous render of this file, their run folders not being on the " \
        f"machine that rendered it: {base} listed neurons." in after.replace("\n", " ")
    fresh = _results("--recipes", str(recipe), "--work", str(tmp_path / "elsewhere"), "--only-render", cwd=tmp_path,
                     data=shared_data)
    assert "| paper-setting (listed neurons, as given) | not run yet |" in fresh.stdout


def test_given_recipe_keeps_a_search_recipe_searchable(tmp_path):
    results = _bench_results()
    source = REPO / "recipes" / "search-coco-smollm2.yaml"
    path, searched = results.given_recipe(source, tmp_path, test_limit=7)
    raw = yaml.safe_load(path.read_text())
    assert searched and path.name == "search.yaml"
    assert raw["search"] == yaml.safe_load(source.read_text())["search"]
    assert raw["evaluate"]["tasks"] == results.TASKS and raw["evaluate"]["limit"] == 7


def _bench_results():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import results
    finally:
        sys.path.remove(str(REPO / "bench"))
    return results


def test_carried_rows_takes_one_rows_block_and_nothing_of_its_neighbours():
    results = _bench_results()
    previous = "\n".join([
        "# Results", "", results.MAIN_HEADER + " base |", "|---|---|",
        "| m | A | x | 1 | BBQ | 0.1 | +1 | +2 | no better | 0.1/0.1 | 3 |", "| | | |  | CrowS | 9 | +0 | +0 | no |",
        "| m | B | y | 2 | BBQ | 0.1 | +5 | +6 | no better | 0.2/0.2 | 4 |", "| | | |  | CrowS | 9 | +7 | +8 | no |",
        "| n | A | not run yet | | | | | | | | |", "",
        "BBQ per category: ...", "", results.CATEGORY_HEADER + " items |", "|---|",
        "| m | A | Age | 3 | x |", "| m | B | Age | 3 | y |", "", "Runs:", "",
        "- m a: `cmd a` (date)", "- m b: `cmd b` (date)", ""])
    a = results.carried_rows(previous, "m", "a", "A")
    assert a == {"main": ["| m | A | x | 1 | BBQ | 0.1 | +1 | +2 | no better | 0.1/0.1 | 3 |",
                          "| | | |  | CrowS | 9 | +0 | +0 | no |"],
                 "categories": ["| m | A | Age | 3 | x |"], "run": "- m a: `cmd a` (date)"}
    assert results.carried_rows(previous, "m", "b", "B")["main"][1] == "| | | |  | CrowS | 9 | +7 | +8 | no |"
    assert results.carried_rows(previous, "n", "a", "A") is None  # not measured there either
    assert results.carried_rows(previous, "m", "c", "C") is None
