"""``bakeedit apply --low-memory`` and ``bakeedit verify --blocks``: a model larger than memory, on a tiny sharded one.

The low-memory path must write exactly what the full-model path writes, without ever building a full-depth model
(the model class's constructor is patched to refuse one: the one-block models of ``verify_blocks`` and the
meta-device skeleton the stream reads tied weights from are allowed, as neither holds the model's weights), and
``verify --blocks`` must catch one flipped byte in an edited tensor and in an untouched one. The full-model path
must hold one model at a time: the base is gone when the baked folder is reloaded.
"""

from __future__ import annotations

import gc
import hashlib
import json
import shutil
import weakref
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from bakeedit.cli import main
from bakeedit.cli.progress import PROGRESS_LINE
from bakeedit.export.provenance import PROVENANCE_FILE, canonical_digest
from bakeedit.io.shards import Checkpoint
from bakeedit.neurons import Neuron, NeuronSet
from bakeedit.workflows import apply_low_memory

from tiny_models import CONFIGS, tiny_model, tiny_tokenizer

LAYERS = CONFIGS["llama"].num_hidden_layers
EDITED = "model.layers.1.self_attn.v_proj.weight"  # neuron (1, attn.v, 5): rows of v_proj
UNTOUCHED = "model.norm.weight"


def run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def message_lines(stderr: str) -> list[str]:
    return [line for line in stderr.strip().splitlines() if line.strip() and not PROGRESS_LINE.match(line)]


def sharded_base(folder: Path) -> Path:
    """The tiny Llama in bf16, in several shards with an index, as large checkpoints are stored."""
    tiny_model("llama", dtype=torch.bfloat16).save_pretrained(folder, max_shard_size="20KB")
    tiny_tokenizer().save_pretrained(folder)
    assert len(list(folder.glob("*.safetensors"))) > 2
    return folder


def recipe(folder: Path, base: Path, extra: str = "", name: str = "r.yaml") -> Path:
    """A neurons file and a linear scale edit (the case the low-memory path is for)."""
    neurons = folder / "neurons-in.json"
    NeuronSet(method="explicit", model_id=str(base), neurons=[
        Neuron(layer=0, site="attn.q", index=3), Neuron(layer=1, site="attn.v", index=5, **{"lambda": 0}),
        Neuron(layer=2, site="mlp.act", index=7), Neuron(layer=2, site="attn.o_in", index=30, **{"lambda": 0.5}),
    ]).save(neurons)
    path = folder / name
    path.write_text(f"name: low-memory-test\nmodel: {base}\nneurons_file: {neurons}\nedit: {{lambda: 2.5}}\n{extra}")
    return path


def refuse_full_models(monkeypatch) -> list[int]:
    """From now on LlamaForCausalLM refuses to be built with all its layers on a real device. Returns the list of
    meta-device builds (the stream's skeleton): it fills up, which shows the patch is on the class apply builds."""
    original = LlamaForCausalLM.__init__
    meta_builds: list[int] = []

    def guarded(self, config, *args, **kwargs):
        if config.num_hidden_layers == LAYERS:
            if torch.empty(()).device.type != "meta":
                raise AssertionError("a full-depth model was instantiated")
            meta_builds.append(config.num_hidden_layers)
        original(self, config, *args, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "__init__", guarded)
    return meta_builds


def record(folder: Path) -> dict:
    return json.loads((folder / PROVENANCE_FILE).read_text())


def shards(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors*"))}


def test_low_memory_apply_writes_the_full_paths_bytes_without_a_full_model(tmp_path, monkeypatch):
    base = sharded_base(tmp_path / "base")
    path = recipe(tmp_path, base)
    full = run("apply", path, "-o", tmp_path / "full")  # the reference: the full-model path (streamed too)
    assert full.exit_code == 0, full.output
    assert record(tmp_path / "full")["execution"]["path"] == "full-model"

    meta_builds = refuse_full_models(monkeypatch)
    low = run("apply", path, "-o", tmp_path / "low", "--low-memory")
    assert low.exit_code == 0, low.output
    assert meta_builds, "the patched constructor was never reached: it is not the class apply builds"
    assert any("low-memory path: --low-memory was given" in line for line in low.stderr.splitlines())

    assert shards(tmp_path / "low") == shards(tmp_path / "full") and len(shards(tmp_path / "full")) > 2
    for name in ("config.json", "tokenizer.json", "neurons.json", "recipe.yaml"):
        assert (tmp_path / "low" / name).read_bytes() == (tmp_path / "full" / name).read_bytes(), name
    prov, full_prov = record(tmp_path / "low"), record(tmp_path / "full")
    assert prov["plan"] == full_prov["plan"] and prov["folded_tensors"] == full_prov["folded_tensors"]
    assert prov["dtype"] == full_prov["dtype"] == "bfloat16"
    assert prov["baked_by"] == "stream"
    assert prov["execution"] == {"path": "low-memory", "reason": "--low-memory was given"}
    ver = prov["verification"]
    assert ver["passed"] and ver["exact"] == "passed" and ver["power"] == "passed", ver
    assert ver["exact_tensors_compared"] == len(Checkpoint.open(base).where) and ver["n_prompts"] == 3  # layers 0-2
    assert (tmp_path / "low" / "README.md").is_file()
    # The shards' digests were taken while the stream wrote the next shard (BackgroundHashes): they must be the files'
    for name, digest in prov["base_model"]["input_sha256"].items():
        assert digest == hashlib.sha256((base / name).read_bytes()).hexdigest(), name
    for name, digest in prov["files_sha256"].items():
        assert digest == hashlib.sha256((tmp_path / "low" / name).read_bytes()).hexdigest(), name


def test_a_byte_the_stream_got_wrong_is_found_although_the_shards_were_hashed_meanwhile(tmp_path, monkeypatch):
    """The exact leg skips only shards whose baked digest equals the base's: a stream that corrupts an untouched
    tensor changes its shard's digest, so that shard is compared tensor by tensor and the tensor is named."""
    from bakeedit.export import stream

    base = sharded_base(tmp_path / "base")
    victim = Checkpoint.open(base).where[UNTOUCHED].path.name
    real = stream._copy_shard

    def corrupting(shard, out, *args, **kwargs):
        real(shard, out, *args, **kwargs)
        if out.name == victim:
            entry = Checkpoint.open(base).entry(UNTOUCHED)
            with open(out, "r+b") as f:
                f.seek(entry.start)
                byte = f.read(1)[0]
                f.seek(entry.start)
                f.write(bytes([byte ^ 0x10]))

    monkeypatch.setattr(stream, "_copy_shard", corrupting)
    result = run("apply", recipe(tmp_path, base), "-o", tmp_path / "low", "--low-memory")
    lines = message_lines(result.stderr)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert any(UNTOUCHED in line for line in lines), lines
    assert not (tmp_path / "low").exists()


def forge(folder: Path, name: str) -> None:
    """Flip one bit of tensor ``name``, then record the shard's new hash and the record's digest, as a forger would:
    the manifest then holds, and only the weights' check can tell."""
    ckpt = Checkpoint.open(folder)
    entry, shard = ckpt.entry(name), ckpt.where[name].path
    with open(shard, "r+b") as f:
        f.seek(entry.start)
        byte = f.read(1)[0]
        f.seek(entry.start)
        f.write(bytes([byte ^ 0x10]))
    data = record(folder)
    data["files_sha256"][shard.name] = hashlib.sha256(shard.read_bytes()).hexdigest()
    data["manifest_sha256"] = canonical_digest(data)
    (folder / PROVENANCE_FILE).write_text(json.dumps(data, indent=1))


def test_verify_blocks_passes_and_catches_one_flipped_byte(tmp_path, monkeypatch):
    base = sharded_base(tmp_path / "base")
    refuse_full_models(monkeypatch)
    out = tmp_path / "low"
    assert run("apply", recipe(tmp_path, base), "-o", out, "--low-memory").exit_code == 0
    from bakeedit.export import verify_blocks

    compared: list[str] = []  # the untouched tensors whose bytes the exact leg reads from both checkpoints
    real_same_bytes = verify_blocks._same_bytes
    monkeypatch.setattr(verify_blocks, "_same_bytes",
                        lambda a, b, name: compared.append(name) or real_same_bytes(a, b, name))
    good = run("verify", "--blocks", out)
    assert good.exit_code == 0, good.output
    assert "verified" in good.stderr and "exact leg: passed" in good.stderr and "3 edited blocks" in good.stderr
    # a shard equal to the base's (the base hashed beside the manifest check) is not read again for its untouched
    # tensors; every other untouched tensor still is
    where, same = Checkpoint.open(base).where, {p.name for p in base.glob("*.safetensors")
                                                if (out / p.name).read_bytes() == p.read_bytes()}
    in_same = [name for name, shard in where.items() if shard.path.name in same]
    assert in_same and compared and not set(compared) & set(in_same), (same, compared)

    plain = tmp_path / "plain"  # one byte changed, the manifest left alone: refused before any weight is read
    shutil.copytree(out, plain)
    shard = Checkpoint.open(plain).where[EDITED].path
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    refused = run("verify", "--blocks", plain)
    lines = message_lines(refused.stderr)
    assert refused.exit_code == 1 and lines[0].startswith("error: ") and shard.name in lines[0], refused.output

    for name in (EDITED, UNTOUCHED):
        copy = tmp_path / name
        shutil.copytree(out, copy)
        forge(copy, name)
        failed = run("verify", "--blocks", copy)
        lines = message_lines(failed.stderr)
        assert failed.exit_code == 1 and "Traceback" not in failed.output, failed.output
        assert lines[0].startswith("error: ") and "verification failed" in lines[0] and name in lines[0], lines
        assert len(lines) <= 2  # the line and its hint


def test_the_path_is_chosen_by_size(tmp_path, monkeypatch):
    base = sharded_base(tmp_path / "base")
    why = "the checkpoint needs 9.0 GiB in float32 but only 1.0 GiB of memory is available"
    monkeypatch.setattr(apply_low_memory, "fits_in_memory", lambda folder, dtype: (False, why))
    auto = run("apply", recipe(tmp_path, base), "-o", tmp_path / "auto")
    assert auto.exit_code == 0, auto.output
    assert record(tmp_path / "auto")["execution"] == {"path": "low-memory", "reason": why}
    assert any(f"low-memory path: {why}" in line for line in auto.stderr.splitlines()), auto.stderr

    # A recipe that needs the model in memory is refused under --low-memory, in one line naming why...
    for extra, cause in (("export: {max_shard_size: 30KB}\n", "export.max_shard_size"),
                         ("edit: {lambda: 2.5, positions: last}\n", "nonlinear or position-scoped")):
        path = recipe(tmp_path, base, extra, name="needs-memory.yaml")
        path.write_text(path.read_text().replace("edit: {lambda: 2.5}\n", ""))
        refused = run("apply", path, "-o", tmp_path / "refused", "--low-memory")
        lines = message_lines(refused.stderr)
        assert refused.exit_code == 1 and "--low-memory cannot run this recipe" in lines[0] and cause in lines[0]
        assert not (tmp_path / "refused").exists()
    # ... and, when it does not fit, is run in full anyway, with a warning (the tiny model does fit, really).
    path = recipe(tmp_path, base, "export: {max_shard_size: 30KB}\n", name="reshard.yaml")
    anyway = run("apply", path, "-o", tmp_path / "anyway")
    assert anyway.exit_code == 0, anyway.output
    assert "but export.max_shard_size" in record(tmp_path / "anyway")["execution"]["reason"]
    assert "warning: " in anyway.stderr

    both = run("apply", path, "-o", tmp_path / "both", "--low-memory", "--in-memory")
    assert both.exit_code == 2 and "exclude each other" in both.output


def test_full_model_path_holds_one_model_at_a_time(tmp_path, monkeypatch, shared_data):
    """Every model load (the base, the baked folder for verification, the base again for the adapters) starts
    with no other model alive: the base is freed, not held beside its bake."""
    live: list[weakref.ref] = []
    alive_at_load: list[int] = []
    original = AutoModelForCausalLM.from_pretrained

    def counted(*args, **kwargs):
        gc.collect()
        alive_at_load.append(sum(ref() is not None for ref in live))
        model = original(*args, **kwargs)
        live.append(weakref.ref(model))
        return model

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", counted)
    base = sharded_base(tmp_path / "base")
    extra = (f"evaluate: {{tasks: [crows_pairs], limit: 4, seed: 0, data_dir: {shared_data}}}\n"
             "export: {formats: [safetensors, lora]}\n")
    result = run("apply", recipe(tmp_path, base, extra), "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert len(alive_at_load) >= 3, alive_at_load  # base, baked folder, base again for the adapter
    assert alive_at_load == [0] * len(alive_at_load), alive_at_load

    alive_at_load.clear()
    verified = run("verify", tmp_path / "out")
    assert verified.exit_code == 0, verified.output
    assert alive_at_load == [0, 0], alive_at_load  # the base (for the probe), then the baked folder alone


def leaves(value) -> list:
    """The numbers of a JSON value, depth first (the metrics' values and standard errors)."""
    if isinstance(value, dict):
        return [x for key in sorted(value) for x in leaves(value[key])]
    if isinstance(value, list):
        return [x for item in value for x in leaves(item)]
    return [value] if isinstance(value, int | float) and not isinstance(value, bool) else []


def test_low_memory_evaluates_and_locates_on_blockwise_models(tmp_path, shared_data):
    """With ``evaluate:`` (base, matched control, edited) and with ``locate:``, the low-memory path runs on blockwise
    models and finds what the full-model path finds: the same neurons, bytes and scores."""
    base = sharded_base(tmp_path / "base")
    extra = f"evaluate: {{tasks: [crows_pairs], limit: 6, seed: 0, data_dir: {shared_data}}}\n"
    path = recipe(tmp_path, base, extra)
    for name, flags in (("full", []), ("low", ["--low-memory"])):
        result = run("apply", path, "-o", tmp_path / name, *flags)
        assert result.exit_code == 0, result.output
    assert record(tmp_path / "low")["execution"]["path"] == "low-memory"
    steps = result.stderr  # the low-memory run's
    assert "evaluate base and random control (blockwise)" in steps and "evaluate edited checkpoint (blockwise)" in steps
    assert shards(tmp_path / "low") == shards(tmp_path / "full")
    full, low = (json.loads((tmp_path / n / "eval" / "results.json").read_text()) for n in ("full", "low"))
    assert set(low["results"]) == set(full["results"]) == {"base", "control", "edited"}
    for label, results in full["results"].items():
        for mine, theirs in zip(low["results"][label], results, strict=True):
            assert mine["n"] == theirs["n"] > 0 and leaves(theirs["metrics"])
            assert leaves(mine["metrics"]) == pytest.approx(leaves(theirs["metrics"]), rel=1e-5, abs=1e-6), label
    assert (tmp_path / "low" / "neurons-random.json").read_text() == (tmp_path / "full" / "neurons-random.json"
                                                                      ).read_text()

    located = recipe(tmp_path, base, name="locate.yaml").read_text().replace(
        f"neurons_file: {tmp_path / 'neurons-in.json'}\n",
        f"locate: {{method: random, reference: {tmp_path / 'neurons-in.json'}, seed: 3}}\n")
    (tmp_path / "locate.yaml").write_text(located)
    for name, flags in (("located-full", []), ("located-low", ["--low-memory"])):
        result = run("apply", tmp_path / "locate.yaml", "-o", tmp_path / name, *flags)
        assert result.exit_code == 0, result.output
    assert any("locate neurons (blockwise)" in line for line in result.stderr.splitlines())
    assert record(tmp_path / "located-low")["neurons"]["neurons"] == record(tmp_path / "located-full")["neurons"][
        "neurons"]
    assert shards(tmp_path / "located-low") == shards(tmp_path / "located-full")
