"""Recipes mean what they say (issue #10, section 4), through the real CLI.

* Every relative path in a recipe is relative to the recipe's folder, whatever the working directory (the tests
  run from ``ws.work``, which is not the recipe's folder, and plant decoys there); ``org/name`` that is no path
  beside the recipe is a Hub id; ``apply`` and ``verify`` load the same base.
* A ``neurons_file`` located on another model is refused unless ``allow_foreign_neurons: true``.
* Numbers are strict (``lambda: true`` / ``"2"`` are errors), ``verify.prompts: []`` is an error, a negative
  lambda is accepted on purpose (it flips the activation's sign).
* A recipe over 1 MB, or listing more neurons than the model has, is refused before the model loads when the
  model's config.json is local (right after loading for a neurons_file).

Each refusal checks the exit code, the first line (names the field or file), no traceback, and that the workspace
is unchanged; each success checks that only the output folder is new.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from reliability_harness import Workspace, assert_one_clear_line, run_cli, snapshot

from bakeedit.errors import NeuronSetError
from bakeedit.neurons import Neuron, NeuronSet, check_origin, neuron_capacity

from tiny_models import save_tiny_checkpoint

NEURONS_BODY = "neurons:\n  - {layer: 0, site: attn.q, index: 3}\n  - {layer: 2, site: mlp.act, index: 7}\n"




@pytest.fixture
def no_model_load(monkeypatch):
    """The refusal must come when the recipe is read: a model load fails the test (exit 3, 'unexpected ...')."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("a model was loaded before the recipe was fully checked")

    for target in ("bakeedit.workflows.apply.load_model", "bakeedit.cli.locate.load_model"):
        monkeypatch.setattr(target, refuse)


def write(ws: Workspace, text: str, name: str = "r.yaml", folder: Path | None = None) -> Path:
    path = (folder or ws.recipes) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def recipe_text(model: str | Path, edit: str = "{lambda: 2.5}", body: str = NEURONS_BODY, extra: str = "") -> str:
    return f"name: reliability\nmodel: {model}\nedit: {edit}\n{body}{extra}"


def refused(ws: Workspace, recipe: Path, names: str | tuple[str, ...], command: str = "apply") -> str:
    """Run ``command`` on ``recipe``; assert the one-clear-line refusal and an untouched workspace."""
    before = snapshot(ws.root)
    out = ["-o", str(ws.outs / ("n.json" if command == "locate" else "edited"))]
    outcome = run_cli(command, str(recipe), *out, cwd=ws.work)
    assert_one_clear_line(outcome, 1, names)
    assert snapshot(ws.root) == before
    return outcome.first_line


def applied(ws: Workspace, recipe: Path, out: str = "edited") -> dict:
    """Run ``apply``; assert success and that only ``outs/<out>`` is new; return its bakeedit.json."""
    before = snapshot(ws.root)
    outcome = run_cli("apply", str(recipe), "-o", str(ws.outs / out), "--no-eval", cwd=ws.work)
    assert outcome.exit_code == 0, outcome.output
    after = snapshot(ws.root)
    assert {k: v for k, v in after.items() if not k.startswith(f"outs/{out}")} == before
    return json.loads((ws.outs / out / "bakeedit.json").read_text())


# --- strict values: refused when the recipe is read --------------------------------------------------------------

STRICT = [
    # id, edit, body, extra, the field the first line names
    ("lambda-true", "{lambda: true}", NEURONS_BODY, "", "edit.lambda"),
    ("lambda-quoted", '{lambda: "2"}', NEURONS_BODY, "", "edit.lambda"),
    ("lambda-yaml-exponent-is-text", "{lambda: 1e-4}", NEURONS_BODY, "", "edit.lambda"),
    ("override-lambda-quoted", '{lambda: 2, overrides: [{sites: [attn.q], lambda: "0"}]}', NEURONS_BODY, "",
     "edit.overrides.0.lambda"),
    ("override-layer-bool", "{lambda: 2, overrides: [{layers: [true], lambda: 0}]}", NEURONS_BODY, "",
     "edit.overrides.0.layers.0"),
    ("start-float", "{lambda: 2, start: 1.5}", NEURONS_BODY, "", "edit.start"),
    ("param-quoted", '{type: nonlinear, map: tanh_gain, params: {alpha: "2", s: 1}}', NEURONS_BODY, "",
     "edit.params.alpha"),
    ("param-list-bool", "{type: nonlinear, map: tanh_gain, params: {alpha: [1.0, true], s: 1}}", NEURONS_BODY, "",
     "edit.params.alpha"),
    ("grid-value-quoted", '{lambda: 2, fit: {grid: {lambda: [1.5, "2"]}}}', NEURONS_BODY, "",
     "edit.fit.grid.lambda.1"),
    ("fit-budget-bool", "{lambda: 2, fit: {grid: {lambda: [1.5]}, budget: true}}", NEURONS_BODY, "",
     "edit.fit.budget"),
    ("neuron-index-quoted", "{lambda: 2}", 'neurons: [{layer: 0, site: attn.q, index: "3"}]\n', "",
     "neurons.0.index"),
    ("neuron-index-float", "{lambda: 2}", "neurons: [{layer: 0, site: attn.q, index: 3.0}]\n", "",
     "neurons.0.index"),
    ("neuron-layer-bool", "{lambda: 2}", "neurons: [{layer: true, site: attn.q, index: 3}]\n", "",
     "neurons.0.layer"),
    ("neuron-lambda-quoted", "{lambda: 2}", 'neurons: [{layer: 0, site: attn.q, index: 3, lambda: "0.5"}]\n', "",
     "neurons.0.lambda"),
    ("verify-prompts-empty", "{lambda: 2}", NEURONS_BODY, "verify: {prompts: []}\n", "verify.prompts"),
    ("verify-prompt-blank", "{lambda: 2}", NEURONS_BODY, 'verify: {prompts: ["  "]}\n', "verify.prompts"),
    ("verify-tolerance-quoted", "{lambda: 2}", NEURONS_BODY, 'verify: {tolerance: "1e-4"}\n', "verify.tolerance"),
    ("evaluate-limit-quoted", "{lambda: 2}", NEURONS_BODY, 'evaluate: {tasks: [], limit: "10"}\n',
     "evaluate.limit"),
    ("evaluate-control-quoted", "{lambda: 2}", NEURONS_BODY, 'evaluate: {tasks: [], control: "no"}\n',
     "evaluate.control"),
    ("allow-foreign-quoted", "{lambda: 2}", NEURONS_BODY, 'allow_foreign_neurons: "yes"\n',
     "allow_foreign_neurons"),
]


@pytest.mark.parametrize(("edit", "body", "extra", "names"), [c[1:] for c in STRICT], ids=[c[0] for c in STRICT])
def test_a_coercion_that_hides_a_mistake_is_an_error(ws, no_model_load, edit, body, extra, names):
    first = refused(ws, write(ws, recipe_text(ws.base, edit, body, extra)), names)
    if "1e-4" in edit:
        assert "1.0e-4" in first  # says how to write it


def test_trust_remote_code_must_be_a_boolean(ws, no_model_load):
    refused(ws, write(ws, recipe_text(f"{{id: {ws.base}, trust_remote_code: 'yes'}}")), "model.trust_remote_code")


def test_negative_lambda_is_accepted_and_flips_the_sign(ws):
    body = "neurons:\n  - {layer: 0, site: attn.q, index: 3}\n  - {layer: 2, site: mlp.act, index: 7, lambda: -0.5}\n"
    prov = applied(ws, write(ws, recipe_text(ws.base, "{lambda: -1}", body)))
    lambdas = {(g["layer"], g["site"]): g["lambdas"] for g in prov["plan"]["groups"]}
    assert lambdas == {(0, "attn.q"): [-1.0], (2, "mlp.act"): [-0.5]}
    assert prov["verification"]["passed"]


# --- relative paths: the recipe's folder, never the working directory -------------------------------------------

def _loaded_from(prov: dict, folder: Path) -> bool:
    """Whether apply read its base weights from ``folder`` (the recorded input hashes), however the ref is spelt."""
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    return prov["base_model"]["input_sha256"]["model.safetensors"] == digest


def _decoy(folder: Path) -> Path:
    """A folder that looks like a checkpoint but is broken: loading it would fail the test loudly."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{not json")
    return folder


def test_relative_model_id_is_the_recipe_folders_and_verify_agrees(ws):
    save_tiny_checkpoint("llama", ws.recipes / "base", seed=1)  # not ws.base's weights: the hash tells them apart
    _decoy(ws.work / "base")  # what the old cwd-relative lookup would have loaded
    prov = applied(ws, write(ws, recipe_text("base")))
    assert prov["base_model"]["kind"] == "local" and _loaded_from(prov, ws.recipes / "base")
    assert not _loaded_from(prov, ws.base)
    assert not Path(prov["base_model"]["ref"]).is_absolute()  # bakeedit.json holds no local absolute path
    for cwd in (ws.work, ws.home):  # where apply ran (the decoy is not used), and elsewhere
        checked = run_cli("verify", str(ws.outs / "edited"), cwd=cwd)
        assert checked.exit_code == 0, checked.output
        assert "verified" in checked.stderr


def test_local_folder_named_like_a_hub_id_wins_over_the_hub(ws):
    shutil.copytree(ws.base, ws.recipes / "org" / "name")
    prov = applied(ws, write(ws, recipe_text("org/name")))
    assert prov["base_model"]["kind"] == "local" and _loaded_from(prov, ws.recipes / "org" / "name")


def test_org_name_not_beside_the_recipe_is_a_hub_id_even_if_the_cwd_has_it(ws):
    shutil.copytree(ws.base, ws.work / "org" / "name")  # the cwd is never consulted for a recipe's model
    first = refused(ws, write(ws, recipe_text("org/name")), "model.id")
    assert "Hub" in first and "org/name" in first


@pytest.mark.parametrize("ref", ["./no-such-model", "missing.gguf", "not-a-model"])
def test_missing_relative_model_is_refused_naming_where_it_looked(ws, no_model_load, ref):
    first = refused(ws, write(ws, recipe_text(ref)), "model.id")
    assert str(ws.recipes / Path(ref).name) in first


def test_relative_neurons_file_and_locate_data_are_the_recipe_folders(ws):
    shutil.copy(ws.neurons, ws.work / "neurons.json")  # a decoy in the cwd: must not be read
    (ws.work / "neurons.json").write_text("{broken")
    prov = applied(ws, write(ws, recipe_text(ws.base, body="neurons_file: ../neurons/neurons.json\n")), "by-file")
    assert [(n["layer"], n["site"], n["index"]) for n in prov["neurons"]["neurons"]] == [(0, "attn.q", 3)]
    control = write(ws, recipe_text(ws.base, body="locate: {method: random, reference: ../neurons/neurons.json, "
                                                  "seed: 3}\n"), "c.yaml")
    prov = applied(ws, control, "control")
    assert prov["neurons"]["method"] == "random" and len(prov["neurons"]["neurons"]) == 1


@pytest.mark.parametrize(("body", "edit", "names"), [
    ("neurons_file: nope.json\n", "{lambda: 2}", "neurons_file"),
    (NEURONS_BODY, "{lambda: 2, fit: {grid: {lambda: [1.5, 2]}, data: nope.jsonl}}", "edit.fit.data"),
], ids=["neurons-file", "fit-data"])
def test_missing_relative_file_is_refused_before_the_model_loads(ws, no_model_load, body, edit, names):
    first = refused(ws, write(ws, recipe_text(ws.base, edit, body)), names)
    assert str(ws.recipes / "nope") in first


def test_every_relative_path_is_resolved_when_the_recipe_is_read(ws, monkeypatch):
    from bakeedit.recipe import load_recipe

    (ws.recipes / "data").mkdir()
    (ws.recipes / "fit.jsonl").write_text("")
    monkeypatch.chdir(ws.work)
    lr = load_recipe(write(ws, recipe_text(
        "../models/base", "{lambda: 2, fit: {grid: {lambda: [1.5]}, data: fit.jsonl}}",
        extra="evaluate: {tasks: [], data_dir: data}\n")))
    # opened as given (loader, evaluation): rewritten relative to the cwd; read through lr.resolve: kept as written
    assert Path(lr.recipe.model.id).resolve() == ws.base.resolve()
    assert Path(lr.recipe.evaluate.data_dir).resolve() == (ws.recipes / "data").resolve()
    assert lr.recipe.edit.fit.data == "fit.jsonl" and lr.resolve(lr.recipe.edit.fit.data) == ws.recipes / "fit.jsonl"
    assert not Path(lr.recipe.model.id).is_absolute() and not Path(lr.recipe.evaluate.data_dir).is_absolute()


# --- neurons located on another model ----------------------------------------------------------------------------

def _neurons_of(ws: Workspace, model_id: str | None, revision: str | None = None) -> None:
    NeuronSet(method="coco", model_id=model_id, model_revision=revision,
              neurons=[Neuron(layer=0, site="attn.q", index=3)]).save(ws.neurons)


def test_foreign_neurons_file_is_refused_naming_both_models(ws):
    _neurons_of(ws, "someone/other-model")
    first = refused(ws, write(ws, recipe_text(ws.base, body=f"neurons_file: {ws.neurons}\n")), "neurons.json")
    assert "someone/other-model" in first and str(ws.base) in first


def test_foreign_neurons_file_is_used_when_the_recipe_allows_it(ws):
    _neurons_of(ws, "someone/other-model")
    prov = applied(ws, write(ws, recipe_text(ws.base, body=f"neurons_file: {ws.neurons}\n",
                                             extra="allow_foreign_neurons: true\n")))
    assert prov["neurons"]["model_id"] == "someone/other-model"  # the record tells the truth


@pytest.mark.parametrize("recorded", ["absolute", "relative-to-the-file", "unknown"])
def test_neurons_file_of_the_same_model_is_accepted(ws, recorded):
    model_id = {"absolute": str(ws.base), "relative-to-the-file": "../models/base", "unknown": None}[recorded]
    _neurons_of(ws, model_id)
    applied(ws, write(ws, recipe_text(ws.base, body=f"neurons_file: {ws.neurons}\n")))


def test_a_different_revision_of_the_same_hub_model_is_another_model():
    located = NeuronSet(method="knowbias", model_id="org/m", model_revision="aaa111", neurons=[])
    check_origin(located, "org/m", "aaa111", "n.json")
    check_origin(located, "org/m", None, "n.json")  # the revision now loaded is unknown: only the id is compared
    with pytest.raises(NeuronSetError, match=r"n\.json: .*'org/m' \(revision aaa111\).*'org/m' \(revision bbb222\)"):
        check_origin(located, "org/m", "bbb222", "n.json")


# --- size limits: refused quickly ---------------------------------------------------------------------------------

def test_recipe_over_one_megabyte_is_refused_before_it_is_parsed(ws, no_model_load):
    path = write(ws, recipe_text(ws.base) + "# " + "x" * 1_000_000 + "\n")
    first = refused(ws, path, str(path))
    assert "1 MB" in first


def _capacity(ws: Workspace) -> int:
    from bakeedit.models.load import local_layout

    return neuron_capacity(local_layout(ws.base))


def test_more_explicit_neurons_than_the_model_has_is_refused_before_it_loads(ws, no_model_load):
    n = _capacity(ws) + 1
    body = "neurons:\n" + "  - {layer: 0, site: attn.q, index: 3}\n" * n
    first = refused(ws, write(ws, recipe_text(ws.base, body=body)), "neurons")
    assert f"{n} neuron entries" in first


def test_more_neurons_in_a_file_than_the_model_has_is_refused_right_after_loading(ws):
    n = _capacity(ws) + 1
    NeuronSet(method="coco", model_id=str(ws.base), neurons=[Neuron(layer=0, site="attn.q", index=3)] * n
              ).save(ws.neurons)
    first = refused(ws, write(ws, recipe_text(ws.base, body=f"neurons_file: {ws.neurons}\n")), "neurons.json")
    assert f"{n} neuron entries" in first
