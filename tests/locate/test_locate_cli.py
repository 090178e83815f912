"""``bakeedit locate``: writes the NeuronSet, its heat map and report; resumes after an interruption; refuses to
overwrite; explains a recipe without a ``locate:`` block."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner
from coco_helpers import write_contrast_file

import bakeedit.locate.coco.responses as responses_mod
from bakeedit.cli import main
from bakeedit.neurons import Neuron, NeuronSet


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def coco_recipe(folder: Path, model: Path) -> Path:
    write_contrast_file(folder / "contrast.jsonl")  # 2 categories x 5 locate items
    path = folder / "coco.yaml"
    path.write_text(
        f"name: tiny-coco\nmodel: {model}\n"
        "locate: {method: coco, prompts: contrast.jsonl, answer_format: raw, batch_size: 2, top_fraction: 0.05}\n"
    )
    return path


def test_interrupted_locate_resumes_from_the_cache(tmp_path, tiny_checkpoint, monkeypatch):
    recipe = coco_recipe(tmp_path, tiny_checkpoint("llama"))
    out, cache = tmp_path / "found" / "neurons.json", tmp_path / "cache"
    forward, calls = responses_mod._forward, []

    def interrupted(*args):
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C during the third batch
        calls.append(1)
        return forward(*args)

    monkeypatch.setattr(responses_mod, "_forward", interrupted)
    result = run("locate", str(recipe), "-o", str(out), "--cache-dir", str(cache))
    assert result.exit_code != 0 and not out.exists()
    assert len(list(cache.glob("*/*.safetensors"))) == 4  # the two finished batches of two items

    calls.clear()
    monkeypatch.setattr(responses_mod, "_forward", lambda *a: (calls.append(1), forward(*a))[1])
    result = run("locate", str(recipe), "-o", str(out), "--cache-dir", str(cache))
    assert result.exit_code == 0, result.output
    assert len(calls) == 3  # only the 6 items left, 2 per batch
    assert result.stdout.strip() == str(out)
    resumed = NeuronSet.load(out)

    fresh_out = tmp_path / "fresh.json"
    result = run("locate", str(recipe), "-o", str(fresh_out), "--cache-dir", str(tmp_path / "other-cache"))
    assert result.exit_code == 0, result.output
    assert len(calls) == 8
    assert resumed.neurons == NeuronSet.load(fresh_out).neurons and resumed.neurons

    # the heat map and the side report sit beside the NeuronSet; the counts are printed
    assert (out.parent / "neurons.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads((out.parent / "neurons.report.json").read_text())
    assert report["n_selected"] == len(resumed.neurons)
    assert resumed.params["report"] == "neurons.report.json"  # beside the file, by name: no machine path
    assert str(tmp_path) not in out.read_text()
    assert "attn.q" in result.stderr and f"{len(resumed.neurons)} coco neurons" in result.stderr
    assert not [p.name for p in out.parent.iterdir() if ".tmp-" in p.name]


def test_refuses_to_overwrite_without_the_flag(tmp_path, tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("BAKEEDIT_CACHE", str(tmp_path / "bkcache"))
    recipe = coco_recipe(tmp_path, tiny_checkpoint("gpt2"))
    out = tmp_path / "neurons.json"
    out.write_text("{}")
    result = run("locate", str(recipe), "-o", str(out))
    assert result.exit_code == 1 and "exists" in result.stderr and "--overwrite" in result.stderr
    assert out.read_text() == "{}"
    result = run("locate", str(recipe), "-o", str(out), "--overwrite")  # not a neurons file: never replaced
    assert result.exit_code == 1 and out.read_text() == "{}", result.output
    NeuronSet(method="explicit", neurons=[Neuron(layer=0, site="attn.q", index=1)]).save(out)
    result = run("locate", str(recipe), "-o", str(out), "--overwrite")
    assert result.exit_code == 0, result.output
    assert NeuronSet.load(out).method == "coco"
    assert list((tmp_path / "bkcache" / "locate").glob("*/*.safetensors"))  # the default cache location


def test_a_recipe_without_a_locate_block_is_explained(tmp_path, tiny_checkpoint):
    path = tmp_path / "explicit.yaml"
    path.write_text(f"name: x\nmodel: {tiny_checkpoint('llama')}\nneurons: [{{layer: 0, site: attn.q, index: 1}}]\n")
    result = run("locate", str(path), "-o", str(tmp_path / "n.json"))
    assert result.exit_code == 1
    assert "no 'locate:' block" in result.stderr and "hint" in result.stderr


def test_bad_locate_parameters_fail_before_the_model_loads(tmp_path, tiny_checkpoint, monkeypatch):
    import bakeedit.cli.locate as locate_cli

    def no_load(*_args, **_kwargs):
        raise AssertionError("the model must not load for a recipe with bad locate parameters")

    monkeypatch.setattr(locate_cli, "load_model", no_load)
    path = tmp_path / "bad.yaml"  # a missing model.id is itself refused when the recipe is read: use a real one
    path.write_text(f"name: x\nmodel: {tiny_checkpoint('llama')}\nlocate: {{method: coco, temprature: 2}}\n")
    result = run("locate", str(path), "-o", str(tmp_path / "n.json"))
    assert result.exit_code == 1 and "locate.temprature" in result.stderr
