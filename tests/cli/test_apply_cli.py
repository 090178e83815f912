"""``bakeedit apply / inspect / verify`` end to end on tiny checkpoints, including every bad-input path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from bakeedit.cli import main
from bakeedit.cli.progress import PROGRESS_LINE

NEURONS = """neurons:
  - {layer: 0, site: attn.q, index: 3}
  - {layer: 1, site: attn.v, index: 5, lambda: 0}
  - {layer: 2, site: mlp.act, index: 7}
  - {layer: 2, site: attn.o_in, index: 30, lambda: 0.5}
"""


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def recipe(folder: Path, model: str, body: str = NEURONS, name: str = "r.yaml") -> Path:
    path = folder / name
    path.write_text(f"name: tiny-test\nmodel: {model}\nedit: {{lambda: 2.5}}\n{body}")
    return path


def leftovers(parent: Path, out_name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{out_name}.") or p.name == out_name)


@pytest.mark.parametrize("arch_name", ["llama", "qwen2", "gpt2"])
def test_apply_inspect_verify_roundtrip(tmp_path, tiny_checkpoint, arch_name):
    base = tiny_checkpoint(arch_name)
    out = tmp_path / "out"
    result = run("apply", str(recipe(tmp_path, str(base))), "-o", str(out))
    assert result.exit_code == 0, result.output
    assert str(out) in result.stdout
    for name in ("model.safetensors", "config.json", "tokenizer.json", "bakeedit.json", "neurons.json", "recipe.yaml"):
        assert (out / name).is_file(), name
    prov = json.loads((out / "bakeedit.json").read_text())
    assert prov["verification"]["passed"] and prov["verification"]["max_abs_logit_delta"] <= 1e-4
    assert prov["plan"]["groups"][0] == {"layer": 0, "site": "attn.q", "indices": [3], "lambdas": [2.5]}
    assert set(prov["files_sha256"]) >= {"model.safetensors", "config.json"}
    assert prov["base_model"]["input_sha256"]["model.safetensors"]
    assert "auto_map" not in json.loads((out / "config.json").read_text())  # plain checkpoint, no custom code
    AutoModelForCausalLM.from_pretrained(out)  # bare transformers loads it

    shown = run("inspect", str(out), "--neurons")
    assert shown.exit_code == 0
    assert "attn.o_in" in shown.stderr and "passed" in shown.stderr

    verified = run("verify", str(out))
    assert verified.exit_code == 0, verified.output
    assert "verified" in verified.stderr


def test_neurons_file_and_locate_random_feed_the_same_pipeline(tmp_path, tiny_checkpoint):
    base = tiny_checkpoint("mistral")
    first = tmp_path / "first"
    assert run("apply", str(recipe(tmp_path, str(base))), "-o", str(first)).exit_code == 0
    by_file = recipe(tmp_path, str(base), body=f"neurons_file: {first / 'neurons.json'}\n", name="f.yaml")
    assert run("apply", str(by_file), "-o", str(tmp_path / "second")).exit_code == 0
    control = recipe(tmp_path, str(base), name="c.yaml",
                     body=f"locate: {{method: random, reference: {first / 'neurons.json'}, seed: 3}}\n")
    result = run("apply", str(control), "-o", str(tmp_path / "control"))
    assert result.exit_code == 0, result.output
    ns = json.loads((tmp_path / "control" / "neurons.json").read_text())
    assert ns["method"] == "random" and len(ns["neurons"]) == 4


BAD_INPUTS = [
    ("malformed-yaml", "name: x\nmodel: [\n", "malformed YAML at line"),
    ("unknown-site", "name: x\nmodel: MODEL\nneurons: [{layer: 0, site: mlp.foo, index: 1}]\n",
     "neurons.0.site: unknown site 'mlp.foo'"),
    ("index-out-of-range", "name: x\nmodel: MODEL\nneurons: [{layer: 0, site: attn.k, index: 99}]\n",
     r"neurons[0].index: 99 is out of range for attn.k, which has 16 channels"),
    ("nan-lambda", "name: x\nmodel: MODEL\nneurons: [{layer: 0, site: attn.k, index: 1}]\nedit: {lambda: .nan}\n",
     "edit.lambda: lambda must be a finite number"),
    ("unknown-model", "name: x\nmodel: not-a-model\nneurons: [{layer: 0, site: attn.k, index: 1}]\n",
     "model.id: unknown model 'not-a-model'"),
    ("missing-hub-model", "name: x\nmodel: no-such-org/no-such-model\nneurons: [{layer: 0, site: attn.k, index: 1}]\n",
     "model.id: "),
]


@pytest.mark.parametrize(("case", "text", "message"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_gives_one_clear_line_and_no_output(tmp_path, tiny_checkpoint, monkeypatch, case, text, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    path = tmp_path / "bad.yaml"
    path.write_text(text.replace("MODEL", str(tiny_checkpoint("llama"))))
    result = run("apply", str(path), "-o", str(tmp_path / "out"))
    assert result.exit_code == 1
    # the steps that ran before the fault (plain progress lines: the output is not a terminal) are not the message
    lines = [line for line in result.stderr.strip().splitlines() if not PROGRESS_LINE.match(line)]
    assert lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert len(lines) <= 2  # the error line and at most a hint
    assert leftovers(tmp_path, "out") == []


def test_existing_output_is_refused_without_overwrite(tmp_path, tiny_checkpoint):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    path = recipe(tmp_path, str(tiny_checkpoint("llama")))
    result = run("apply", str(path), "-o", str(out))
    assert result.exit_code == 1
    assert "already exists" in result.stderr and "--overwrite" in result.stderr
    assert (out / "keep.txt").read_text() == "mine"

    # --overwrite replaces only what bakeedit wrote: a folder of the user's is refused, naming what is in the way.
    result = run("apply", str(path), "-o", str(out), "--overwrite")
    assert result.exit_code == 1 and "not a bakeedit output" in result.stderr, result.output
    assert (out / "keep.txt").read_text() == "mine" and leftovers(tmp_path, "out") == ["out"]

    (out / "keep.txt").unlink()
    assert run("apply", str(path), "-o", str(out), "--overwrite").exit_code == 0  # an empty folder may be filled
    result = run("apply", str(path), "-o", str(out), "--overwrite")  # and a bakeedit output replaced
    assert result.exit_code == 0, result.output
    assert (out / "bakeedit.json").exists()
    assert leftovers(tmp_path, "out") == ["out"]


def test_debug_shows_traceback(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nmodel: [\n")
    result = run("--debug", "apply", str(path), "-o", str(tmp_path / "out"))
    assert result.exit_code == 1 and "Traceback" in result.stderr


def test_save_killed_after_first_shard_leaves_nothing(tmp_path, tiny_checkpoint, monkeypatch):
    import transformers.modeling_utils as mu

    real_save = mu.safe_save_file
    calls = []

    def failing_save(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise KeyboardInterrupt("killed half-way")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(mu, "safe_save_file", failing_save)
    path = recipe(tmp_path, str(tiny_checkpoint("llama")))
    path.write_text(path.read_text() + "export: {max_shard_size: 20KB}\n")
    result = run("apply", str(path), "-o", str(tmp_path / "out"))
    assert len(calls) == 2, "the model must have been saved in several shards for this test to mean anything"
    assert result.exit_code != 0
    assert leftovers(tmp_path, "out") == []


def test_stale_temporary_of_a_killed_run_is_cleaned(tmp_path, tiny_checkpoint):
    stale = tmp_path / ".out.tmp-999999999-abc"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    result = run("apply", str(recipe(tmp_path, str(tiny_checkpoint("llama")))), "-o", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert leftovers(tmp_path, "out") == ["out"]


def test_verify_detects_a_tampered_shard(tmp_path, tiny_checkpoint):
    out = tmp_path / "out"
    assert run("apply", str(recipe(tmp_path, str(tiny_checkpoint("llama")))), "-o", str(out)).exit_code == 0
    from safetensors.torch import load_file, save_file

    weights = load_file(out / "model.safetensors")
    key = next(k for k in weights if "down_proj" in k)
    weights[key] = weights[key] * 1.01
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    result = run("verify", str(out))
    assert result.exit_code == 1
    assert "files changed since they were written: model.safetensors" in result.stderr


def test_verify_fails_when_weights_do_not_reproduce_the_edit(tmp_path, tiny_checkpoint):
    """Re-record the hashes after tampering, so only the logit comparison can catch it."""
    from safetensors.torch import load_file, save_file

    from bakeedit.export.provenance import hash_written_files, read_provenance, write_provenance

    out = tmp_path / "out"
    assert run("apply", str(recipe(tmp_path, str(tiny_checkpoint("llama")))), "-o", str(out)).exit_code == 0
    weights = load_file(out / "model.safetensors")
    key = next(k for k in weights if "layers.2.mlp.down_proj" in k)
    weights[key][:, 7] = 0.0  # as if the fold had masked instead of enhanced
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    prov = read_provenance(out)
    prov.files_sha256 = hash_written_files(out)
    write_provenance(out, prov)
    result = run("verify", str(out))
    assert result.exit_code == 1
    assert "verification failed: max |delta logit|" in result.stderr


def test_apply_streams_linear_edits_and_matches_the_in_memory_fold(tmp_path, tiny_checkpoint):
    from safetensors.torch import load_file

    path = recipe(tmp_path, str(tiny_checkpoint("qwen2")))
    streamed, in_memory = tmp_path / "streamed", tmp_path / "in-memory"
    assert run("apply", str(path), "-o", str(streamed)).exit_code == 0
    assert run("apply", str(path), "-o", str(in_memory), "--in-memory").exit_code == 0
    assert json.loads((streamed / "bakeedit.json").read_text())["baked_by"] == "stream"
    assert json.loads((in_memory / "bakeedit.json").read_text())["baked_by"] == "in-memory"
    a, b = load_file(streamed / "model.safetensors"), load_file(in_memory / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].view(-1).view(torch.uint8).equal(
            b[name].view(-1).view(torch.uint8)), name
    assert run("verify", str(streamed)).exit_code == 0
