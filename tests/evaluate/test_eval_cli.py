"""``bakeedit eval`` end to end on tiny checkpoints: base / edited / control, files written, and error lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from bakeedit.cli import main
from bakeedit.errors import DataError
from bakeedit.evaluate import available_tasks
from bakeedit.evaluate.runner import expand_tasks, load_tasks
from bakeedit.neurons import Neuron, NeuronSet


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def control_file(folder: Path) -> Path:
    path = folder / "neurons-random.json"
    NeuronSet(method="random", neurons=[Neuron(layer=1, site="mlp.act", index=i) for i in range(0, 40, 3)]).save(path)
    return path


def test_eval_after_apply_with_control(tmp_path: Path, tiny_checkpoint, shared_data: Path) -> None:
    base = tiny_checkpoint("llama")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: t\nmodel: {base}\nedit: {{lambda: 0}}\nneurons:\n"
                      "  - {layer: 2, site: mlp.act, index: 7}\n  - {layer: 1, site: attn.v, index: 3}\n")
    edited = tmp_path / "edited"
    assert run("apply", str(recipe), "-o", str(edited)).exit_code == 0

    # no --baseline and no --control-lambda: both come from the folder's bakeedit.json
    result = run("eval", str(edited), "--tasks", "bias", "--limit", "5", "--data-dir", str(shared_data),
                 "--control", str(control_file(tmp_path)))
    assert result.exit_code == 0, result.output
    out = edited / "eval"
    assert result.stdout.strip() == str(out / "report.md")
    raw = json.loads((out / "results.json").read_text())
    assert list(raw["results"]) == ["base", "control", "edited"]
    assert raw["config"]["limit"] == 5 and raw["config"]["seed"] == 0
    assert raw["models"]["control"]["description"].startswith("baseline + runtime edit of 14 random neurons")
    ran = {r["task"] for r in raw["results"]["edited"]}
    assert ran | set(raw["skipped"]) == set(available_tasks("bias"))
    assert {"crows_pairs", "stereoset_intrasentence", "stereoset_intersentence", "bbq", "winogender",
            "contrast_success"} <= ran
    for label in raw["results"]:
        for r in raw["results"][label]:
            assert r["n"] == 5 and r["limit"] == 5 and len(r["data_sha256"]) == 64
    row = {(r["model"], r["task"], r["metric"]): r["value"] for r in raw["rows"] if r["group"] is None}
    # the edit and the control change the model's log-likelihoods
    assert row[("edited", "crows_pairs", "ll_gap")] != row[("base", "crows_pairs", "ll_gap")]
    assert row[("control", "crows_pairs", "ll_gap")] != row[("base", "crows_pairs", "ll_gap")]
    report = (out / "report.md").read_text()
    assert "| base | edited | control |" in report
    pngs = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert "bias_crows_pairs.png" in pngs and "bias_deltas.png" in pngs
    for name in pngs:
        assert f"(plots/{name})" in report

    again = run("eval", str(edited), "--tasks", "crows_pairs", "--data-dir", str(shared_data))
    assert again.exit_code == 1 and "already holds results.json" in again.stderr


def test_same_model_as_baseline_gives_zero_deltas(tmp_path: Path, tiny_checkpoint, shared_data: Path) -> None:
    ckpt = tiny_checkpoint("qwen2")
    out = tmp_path / "ev"
    result = run("eval", str(ckpt), "--baseline", str(ckpt), "--tasks", "crows_pairs,winogender", "--limit", "5",
                 "--seed", "3", "--data-dir", str(shared_data), "-o", str(out), "--control",
                 str(control_file(tmp_path)), "--control-lambda", "0")
    assert result.exit_code == 0, result.output
    raw = json.loads((out / "results.json").read_text())
    base, edited = raw["results"]["base"], raw["results"]["edited"]
    assert [r["metrics"] for r in base] == [r["metrics"] for r in edited]
    assert raw["results"]["control"][0]["metrics"] != base[0]["metrics"]


def test_errors_are_one_line(tmp_path: Path, tiny_checkpoint, shared_data: Path) -> None:
    ckpt = str(tiny_checkpoint("llama"))
    bad = run("eval", ckpt, "--tasks", "crows_pairs,nope", "-o", str(tmp_path / "a"), "--data-dir", str(shared_data))
    assert bad.exit_code == 1 and "unknown evaluation task 'nope'" in bad.stderr and "Traceback" not in bad.output
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = run("eval", ckpt, "--tasks", "crows_pairs", "-o", str(tmp_path / "b"), "--data-dir", str(empty))
    assert missing.exit_code == 1 and "crows_pairs_anonymized.csv" in missing.stderr
    no_base = run("eval", ckpt, "--control", str(control_file(tmp_path)), "-o", str(tmp_path / "c"))
    assert no_base.exit_code == 1 and "--control needs --baseline" in no_base.stderr


def test_task_groups_and_skipping(tmp_path: Path, monkeypatch) -> None:
    names, from_group = expand_tasks("crows_pairs,bias")
    assert names[0] == "crows_pairs" and set(names) == set(available_tasks("bias"))
    assert "crows_pairs" not in from_group and "bbq" in from_group  # named tasks are never skipped
    monkeypatch.delenv("BAKEEDIT_DATA_DIR", raising=False)
    warnings: list[str] = []
    loaded, skipped = load_tasks(["crows_pairs", "contrast_success"], tmp_path, 3, 0, {"crows_pairs"},
                                 warnings.append)
    assert [t.name for t, _ in loaded] == ["contrast_success"] and list(skipped) == ["crows_pairs"]
    assert warnings[0].startswith("skipping crows_pairs: data file not found")
    with pytest.raises(DataError, match="none of the requested tasks has its data"):
        load_tasks(["crows_pairs", "bbq"], tmp_path, 3, 0, {"crows_pairs", "bbq"})
    with pytest.raises(DataError, match=r"crows_pairs_anonymized\.csv"):
        load_tasks(["crows_pairs"], tmp_path, 3, 0, set())


def test_the_stereoset_alias_names_both_parts_which_are_never_skipped():
    names, from_group = expand_tasks(["crows_pairs", "stereoset", "stereoset_intersentence"])
    assert names == ["crows_pairs", "stereoset_intrasentence", "stereoset_intersentence"]
    assert from_group == set()
