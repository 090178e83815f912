"""The model card: structure pinned by a golden file, YAML parsed by huggingface_hub, numbers traced to the evidence."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
from baked_folders import NONLINEAR, add_evaluation, bake
from click.testing import CliRunner
from huggingface_hub import ModelCard

from bakeedit.cli import main
from bakeedit.export.card import CARD_FILE, GENERATED_MARKER, HEATMAP_FILE, write_card
from bakeedit.export.manifest import check_file_hashes, check_folder, refresh_manifest
from bakeedit.export.provenance import read_provenance, write_provenance
from bakeedit.io.hashing import file_sha256
from bakeedit.workflows.apply_eval import record_evaluation

GOLDEN = Path(__file__).parent / "golden" / "card_structure.txt"
GOLDEN_VERDICTS = Path(__file__).parent / "golden" / "card_verdicts.txt"
UPDATE_GOLDEN = os.environ.get("BAKEEDIT_UPDATE_GOLDEN") == "1"


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> Path:
    folder = bake(tmp_path_factory.mktemp("card"))
    record_evaluation(folder, folder / "eval", add_evaluation(folder))  # as `bakeedit eval` records it
    write_card(folder)
    return folder


def structure(text: str) -> list[str]:
    """The card's skeleton: front-matter keys, model-index shape, headings; no numbers."""
    card = ModelCard(text)
    data = card.data.to_dict()
    lines = [f"key {k}" for k in data]
    for entry in data.get("model-index", []):
        for result in entry["results"]:
            lines.append(f"result {result['dataset']['name']}: " + ", ".join(m["type"] for m in result["metrics"]))
    lines += [line for line in card.text.splitlines() if line.startswith("#")]
    return lines


def test_card_structure_matches_golden(evaluated):
    found = structure((evaluated / CARD_FILE).read_text())
    if UPDATE_GOLDEN:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text("\n".join(found) + "\n")
    assert found == GOLDEN.read_text().splitlines(), "regenerate with BAKEEDIT_UPDATE_GOLDEN=1 if intended"


def test_front_matter_parses_with_one_model_index_metric_per_evaluated_metric(evaluated):
    card = ModelCard.load(evaluated / CARD_FILE)
    data = card.data
    assert data.library_name == "transformers" and data.license == "unknown"
    assert data.pipeline_tag == "text-generation"
    assert {"bakeedit", "neuron-editing", "explicit"} <= set(data.tags)
    assert "bias-mitigation" not in data.tags  # these results carry no per-item scores: nothing beat the control
    assert data.base_model is None and "base_model_relation" not in data.to_dict()  # a local base has no Hub id
    raw = json.loads((evaluated / "eval" / "results.json").read_text())
    expected = {(r["task"], name): m["value"] for r in raw["results"]["edited"] for name, m in r["metrics"].items()
                if m["value"] is not None and math.isfinite(m["value"])}
    got = {(r.dataset_name, r.metric_type): r.metric_value for r in data.eval_results}
    assert set(got) == set(expected)
    assert len(data.eval_results) == len(expected) == 3  # bbq's NaN metric is left out
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-5)
    assert {r.task_type for r in data.eval_results} == {"text-generation"}
    assert data.model_name == "tiny-out"


def test_body_traces_every_number_to_the_evidence(evaluated):
    text = (evaluated / CARD_FILE).read_text()
    prov = read_provenance(evaluated)
    assert text.count(GENERATED_MARKER) == 1
    assert f"**{prov.verification.max_abs_logit_delta:.3g}**" in text and "**passed**" in text
    assert "| 2 | · | · | 2 | 2 |" in text  # layer 2: two mlp.act neurons (columns attn.q, attn.v, mlp.act)
    assert "| total | 1 | 1 | 2 | 4 |" in text
    if (evaluated / HEATMAP_FILE).is_file():
        assert f"]({HEATMAP_FILE})" in text
    bias = text.split("### Bias")[1].split("### Capability")[0]
    # results without per-item scores: unpaired differences (†) and no verdict
    assert ("| crows_pairs | pct_stereotype (whole sentence, lm-eval) | 50 | 60.0 ± 1.5 | 55.0 ± 1.5 | 59.0 ± 1.5 | "
            "-5.00 ± 2.12 † | -1.00 ± 2.12 † | -4.00 ± 2.12 † | not tested (no per-item scores) | 40 |") in bias
    assert bias.count("| 40 |") == 3  # sample counts
    assert "| arc_easy | acc |" in text.split("### Capability")[1] and "| 30 |" in text
    assert "Blodgett et al., 2021" in text and "BBQ's ambiguous-context" in text  # only run tasks' weaknesses
    assert "WinoGender is small" not in text
    assert "`recipe.yaml`" in text and prov.recipe.sha256[:16] in text
    for name, digest in prov.files_sha256.items():
        if name in (CARD_FILE, HEATMAP_FILE):  # the card cannot hold its own hash; the heat map: drawn with it
            continue
        assert f"| `{name}` |" in text and digest[:16] in text
    assert CARD_FILE in prov.files_sha256 and "eval/results.json" in prov.files_sha256  # every file is hashed
    assert check_folder(evaluated) is not None
    assert "from_pretrained('path/to/out')" in text and "trust_remote_code" not in text


def test_hub_base_model_gets_base_model_relation_and_license(tmp_path):
    folder = bake(tmp_path)
    prov = read_provenance(folder)
    prov.base_model = prov.base_model.model_copy(update={"hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
                                                         "license": "apache-2.0"})
    write_provenance(folder, prov)  # as apply would have written it for a Hub base (a new digest)
    write_card(folder, repo_id="someone/tiny-edit")
    card = ModelCard.load(folder / CARD_FILE)
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.to_dict()["base_model_relation"] == "finetune" and card.data.license == "apache-2.0"
    assert "from_pretrained('someone/tiny-edit')" in card.text and "license: unknown" not in card.text
    assert "No evaluation was run" in card.text and card.data.eval_results is None
    assert check_file_hashes(folder, read_provenance(folder)) == []


def test_card_command_regenerates_atomically_and_keeps_hashes(tmp_path):
    folder = bake(tmp_path)
    prov = read_provenance(folder)
    prov.recipe.data["description"] = "a rewritten description"
    write_provenance(folder, prov)
    (folder / CARD_FILE).write_text("edited by hand")  # card rewrites the card: a hand-edited one is replaced
    result = CliRunner().invoke(main, ["card", str(folder)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(folder / CARD_FILE)
    assert "> a rewritten description" in (folder / CARD_FILE).read_text()
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]  # no temporary file left
    assert check_file_hashes(folder, read_provenance(folder)) == []
    assert read_provenance(folder).files_sha256[CARD_FILE] == file_sha256(folder / CARD_FILE)
    check_folder(folder)  # digest and plan too
    staged = write_card(folder, local_name="final-name").read_text()  # as apply writes it in its staging folder
    assert "from_pretrained('path/to/final-name')" in staged


def test_malformed_results_fail_the_card_with_the_file_named(tmp_path):
    folder = bake(tmp_path)
    written_by_apply = (folder / CARD_FILE).read_text()
    (folder / "eval").mkdir()
    (folder / "eval" / "results.json").write_text('{"results": {"edited": [{"task": 1}]}}')
    refresh_manifest(folder, ["eval/"])  # recorded (as if bakeedit wrote it), so only its content is wrong
    result = CliRunner().invoke(main, ["card", str(folder)])
    assert result.exit_code == 1
    assert "results.json" in result.output and "Traceback" not in result.output
    assert (folder / CARD_FILE).read_text() == written_by_apply  # the failed regeneration left the card alone


def test_custom_module_card_says_trust_remote_code_with_the_module_hash(tmp_path):
    folder = bake(tmp_path, edit=NONLINEAR)
    prov = read_provenance(folder)
    assert prov.edit_form in ("custom_module", "mixed") and prov.custom_module is not None
    text = write_card(folder).read_text()
    module_hash = file_sha256(folder / prov.custom_module.module_file)
    how = text.split("## How to load")[1].split("## ")[0]
    assert module_hash in how and "trust_remote_code=True" in how
    assert re.search(r"AutoTokenizer\.from_pretrained\('path/to/out', trust_remote_code=True\)", how)


GOLDEN_QUICKSTART = Path(__file__).parent / "golden" / "card_structure_quickstart.txt"


@pytest.mark.slow
def test_quickstart_card_renders_with_one_model_index_metric_per_evaluated_metric(tmp_path, smollm2, shared_data,
                                                                                   monkeypatch):
    """The issue's bar: the quickstart output, as ``bakeedit apply`` evaluates it (base, edited, random control; a
    small sample), gets a card whose YAML huggingface_hub parses and whose model-index lists every finite metric of
    the edited model."""
    from bakeedit.evaluate.report import read_results

    monkeypatch.setenv("BAKEEDIT_DATA_DIR", str(shared_data))
    out = tmp_path / "quickstart"
    quickstart = Path(__file__).parents[2] / "recipes" / "quickstart.yaml"
    applied = CliRunner().invoke(main, ["apply", str(quickstart), "-o", str(out), "--eval-limit", "4"])
    assert applied.exit_code == 0, applied.output
    run = read_results(out / "eval")
    assert set(run.results) == {"base", "edited", "control"}
    card = ModelCard.load(out / "README.md")  # written by apply, last

    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and card.data.license == "apache-2.0"
    # the weights bakeedit edited are the embedded GGUF's, de-quantized: the card says so
    assert "GGUF file SmolLM2-135M-Instruct.Q4_1.gguf (Q4_1, de-quantized to float32)" in card.text
    assert card.data.to_dict()["base_model_relation"] == "finetune"
    finite = [(r.task, m.name) for r in run.results["edited"] for m in r.metrics.values() if math.isfinite(m.value)]
    assert finite and sorted((r.dataset_name, r.metric_type) for r in card.data.eval_results) == sorted(finite)
    skeleton = [line for line in structure(str(card)) if not line.startswith("result ")]  # tasks' metric names vary
    if UPDATE_GOLDEN:
        GOLDEN_QUICKSTART.write_text("\n".join(skeleton) + "\n")
    assert skeleton == GOLDEN_QUICKSTART.read_text().splitlines()
    assert check_file_hashes(out, read_provenance(out)) == []


def test_a_local_base_is_named_without_the_machine_path(tmp_path):
    folder = bake(tmp_path)
    text = (folder / CARD_FILE).read_text()
    assert str(tmp_path) not in text  # neither the base folder's path nor the recipe's
    assert "`base-llama`" in text


def paired_evaluation(folder: Path):
    """base, edited and control with per-item scores (as tasks now write them): on 100 CrowS pairs base and
    control prefer the stereotype 75 times, edited 50 (the ideal); on 40 ARC items base and control are right 30
    times, edited 10 (a subset)."""
    import numpy as np

    from bakeedit.evaluate.report import write_results
    from bakeedit.evaluate.runner import EvalRun
    from bakeedit.evaluate.stats import ItemScores
    from bakeedit.evaluate.tasks.base import MetricValue, TaskResult
    from bakeedit.evaluate.tasks.crows_pairs import crows_metrics

    def crows(n_more: int) -> TaskResult:
        more, less = np.where(np.arange(100) < n_more, -1.0, -2.0), np.full(100, -1.5)
        items = ItemScores.build([str(i) for i in range(100)], ll_more=more, ll_less=less, sll_more=more,
                                 sll_less=less)
        return TaskResult("crows_pairs", "2", "bias", crows_metrics(more, less, 0, more, less), 100,
                          "crows_pairs/crows.csv", "0" * 64, 100, 0, items=items)

    def arc(n_right: int) -> TaskResult:
        acc = (np.arange(40) < n_right).astype(float)
        return TaskResult("arc_easy", "1", "capability", {"acc": MetricValue("acc", float(acc.mean()), 0.07, 40,
                                                                                True)},
                          40, "arc/ARC-Easy.jsonl", "0" * 64, 100, 0,
                          items=ItemScores.build([str(i) for i in range(40)], acc=acc))

    run = EvalRun({"base": [crows(75), arc(30)], "edited": [crows(50), arc(10)], "control": [crows(75), arc(30)]},
                  config={"tasks": ["crows_pairs", "arc_easy"], "limit": 100, "seed": 0},
                  models={"base": {"description": "the tiny base"}, "edited": {"description": "the baked edit"},
                          "control": {"description": "four random neurons"}})
    write_results(folder / "eval", run, plots=False)
    return run


def verdict_structure(text: str) -> list[str]:
    """The evaluation tables' heads and, per row, task, metric and verdict (p-values and numbers left out)."""
    section = text.split("## Evaluation")[1].split("### Data")[0]
    lines = []
    for line in section.splitlines():
        if line.startswith("| task |"):
            lines.append(line)
        elif line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            lines.append(" | ".join([cells[0], cells[1], re.sub(r" \(p[=<][^)]*\)", " (p)", cells[-2])]))
    return lines


def test_card_says_per_metric_whether_the_edit_beats_the_control(tmp_path):
    folder = bake(tmp_path)
    record_evaluation(folder, folder / "eval", paired_evaluation(folder))
    text = write_card(folder).read_text()
    found = verdict_structure(text)
    if UPDATE_GOLDEN:
        GOLDEN_VERDICTS.write_text("\n".join(found) + "\n")
    assert found == GOLDEN_VERDICTS.read_text().splitlines(), "regenerate with BAKEEDIT_UPDATE_GOLDEN=1 if intended"
    assert "crows_pairs | stereotype_dev (distance of pct_stereotype from 50, whole sentence) | beats control (p)" \
        in found
    assert "arc_easy | acc | worse than control (p)" in found
    rows = [ln for ln in text.split("## Evaluation")[1].split("### Data")[0].splitlines() if ln.startswith("| ")]
    assert rows and not any("†" in row for row in rows)  # every difference is paired
    assert "only a metric that beats the control is evidence" in text


def _difference(gain: float, gain_p: float):
    from bakeedit.evaluate.compare import Difference
    from bakeedit.evaluate.stats import Paired

    return Difference(gain, 0.1, Paired(delta=gain, se=0.1, p=gain_p, gain=gain, gain_p=gain_p, n_clusters=40))


def test_only_bias_metrics_that_beat_the_control_count_as_reductions(tmp_path):
    from bakeedit.evaluate.compare import bias_reductions

    run = add_evaluation(bake(tmp_path))
    comparisons = {
        "crows_pairs": {("edited", "control"): {"pct_stereotype": _difference(3.0, 0.01)},
                        ("edited", "base"): {"pct_stereotype": _difference(4.0, 0.001)}},
        "bbq": {("edited", "control"): {"bias_ambig": _difference(0.02, 0.3), "acc": _difference(-0.1, 0.01)}},
        "arc_easy": {("edited", "control"): {"acc": _difference(0.05, 0.001)}},  # capability: never a reduction
    }
    assert bias_reductions(run, comparisons, "edited") == [("crows_pairs", "pct_stereotype")]


@pytest.mark.parametrize("reduced", [[("crows_pairs", "pct_stereotype")], []], ids=["beats-control", "not-shown"])
def test_tags_and_wording_follow_the_verdict(tmp_path, monkeypatch, reduced):
    from bakeedit.export import card_context

    folder = bake(tmp_path)
    record_evaluation(folder, folder / "eval", add_evaluation(folder))
    monkeypatch.setattr(card_context.CardContext, "bias_reductions", lambda self: reduced)
    card = ModelCard.load(write_card(folder))
    assert ("bias-mitigation" in card.data.tags) == bool(reduced)
    if reduced:
        assert "**The edit reduces bias** on crows_pairs pct_stereotype" in card.text
        assert "not shown to reduce bias" not in card.text
    else:
        assert "**The edit was not shown to reduce bias**" in card.text and "reduces bias** on" not in card.text
