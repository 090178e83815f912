"""The streaming fold writes, tensor by tensor, exactly what the in-memory fold + save_pretrained writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from bakeedit.edit import EditPlan, build_plan, fold_plan, runtime_edit
from bakeedit.errors import EditError, ModelLoadError
from bakeedit.export import stream as stream_module
from bakeedit.export.stream import (
    Skeleton,
    bake_checkpoint,
    edited_dtype,
    plan_tensor_edits,
    stream_bake,
    stream_for_apply,
    streaming_blocker,
)
from bakeedit.export.verify_blocks import verify_blocks
from bakeedit.io.shards import INDEX_FILE, Checkpoint
from bakeedit.models.arch import ModelLayout
from bakeedit.models.load import load_model
from bakeedit.models.reference import ModelSpec
from bakeedit.neurons import Neuron
from bakeedit.recipe import EditSpec

from tiny_models import every_site_neurons, probe_ids, tiny_model, tiny_tokenizer

REPO = Path(__file__).resolve().parents[2]


def sharded_checkpoint(arch: str, folder: Path, dtype: torch.dtype = torch.bfloat16, shard: str = "20KB") -> Path:
    """A tiny checkpoint in several shards (the tiny models are ~70 KB), with the tiny tokenizer."""
    tiny_model(arch, dtype=dtype).save_pretrained(folder, max_shard_size=shard)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def edit_everything(layout: ModelLayout):
    """Three neurons per site (routed experts included) on every layer: lambdas 0, 2.5 and 1.37."""
    return build_plan(every_site_neurons(layout), EditSpec(), layout)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def in_memory_bake(base: Path, plan, out: Path, dtype: torch.dtype):
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).eval()
    folded = fold_plan(model, ModelLayout.for_model(model), plan)
    model.save_pretrained(out)
    return model, folded


def test_stream_is_byte_identical_to_the_in_memory_fold(arch, tmp_path):
    base = sharded_checkpoint(arch, tmp_path / "base")
    layout = ModelLayout.for_model(tiny_model(arch))
    plan = edit_everything(layout)
    shards = sorted(p.name for p in base.glob("*.safetensors"))
    assert len(shards) >= 4

    folded = bake_checkpoint(base, plan, tmp_path / "streamed")
    model, expected_folded = in_memory_bake(base, plan, tmp_path / "memory", torch.bfloat16)

    streamed, memory, original = tensors(tmp_path / "streamed"), tensors(tmp_path / "memory"), tensors(base)
    assert set(streamed) == set(memory) == set(original)
    for name in streamed:
        assert streamed[name].dtype == torch.bfloat16
        assert torch.equal(streamed[name].view(torch.int16), memory[name].view(torch.int16)), name
    changed = {n for n in streamed if not torch.equal(streamed[n], original[n])}
    assert changed == {f.name for f in folded}
    assert [(f.name, f.axis, f.n_channels) for f in folded] == [(f.name, f.axis, f.n_channels) for f in expected_folded]
    # Shard layout, headers and index are the base's, byte for byte.
    assert sorted(p.name for p in (tmp_path / "streamed").glob("*.safetensors")) == shards
    assert (tmp_path / "streamed" / INDEX_FILE).read_bytes() == (base / INDEX_FILE).read_bytes()
    assert [s.header for s in Checkpoint.open(tmp_path / "streamed").shards] == [
        s.header for s in Checkpoint.open(base).shards
    ]
    # The streamed verification (exact + per-block functional) accepts it.
    check = verify_blocks(base, tmp_path / "streamed", plan)
    assert check.result.passed and not check.mismatched, check
    # ... and the folder loads with plain transformers into the same model (tied embeddings stay tied).
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed", dtype=torch.bfloat16).eval()
    ids = probe_ids()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    if model.config.tie_word_embeddings:
        assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight


def test_single_file_float32_checkpoint_and_any_block_size_give_the_same_bytes(tmp_path):
    base = sharded_checkpoint("qwen2", tmp_path / "base", dtype=torch.float32, shard="5GB")
    assert (base / "model.safetensors").is_file() and not (base / INDEX_FILE).exists()
    plan = edit_everything(ModelLayout.for_model(tiny_model("qwen2")))
    stream_bake(base, plan, tmp_path / "default")
    stream_bake(base, plan, tmp_path / "rows", chunk_bytes=1)  # one row per block
    in_memory_bake(base, plan, tmp_path / "memory", torch.float32)
    default, rows, memory = tensors(tmp_path / "default"), tensors(tmp_path / "rows"), tensors(tmp_path / "memory")
    assert all(torch.equal(default[n], memory[n]) and torch.equal(rows[n], memory[n]) for n in memory)


def test_copy_without_copy_file_range(tmp_path, monkeypatch):
    base = sharded_checkpoint("phi3", tmp_path / "base")
    plan = edit_everything(ModelLayout.for_model(tiny_model("phi3")))
    stream_bake(base, plan, tmp_path / "kernel")

    def unsupported(*_args):
        raise OSError(18, "Invalid cross-device link")  # EXDEV: what old kernels answer across file systems

    monkeypatch.setattr(os, "copy_file_range", unsupported)
    stream_bake(base, plan, tmp_path / "loop")
    for name in (p.name for p in base.glob("*.safetensors")):
        assert (tmp_path / "kernel" / name).read_bytes() == (tmp_path / "loop" / name).read_bytes()


def test_base_model_checkpoint_without_prefix(tmp_path):
    """GPT-2 on the Hub stores ``h.0.attn.c_attn.weight``, not ``transformer.h.0...``; transformers accepts both."""
    base = sharded_checkpoint("gpt2", tmp_path / "base", shard="5GB")
    state = load_file(base / "model.safetensors")
    save_file({k.removeprefix("transformer."): v for k, v in state.items()}, base / "model.safetensors",
              metadata={"format": "pt"})
    plan = edit_everything(ModelLayout.for_model(tiny_model("gpt2")))
    folded = stream_bake(base, plan, tmp_path / "streamed")
    assert folded[0].name.startswith("h.0.")
    model, _ = in_memory_bake(base, plan, tmp_path / "memory", torch.bfloat16)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed", dtype=torch.bfloat16)
    for name, param in model.named_parameters():
        assert torch.equal(param, reloaded.get_parameter(name)), name


def test_only_config_tokenizer_and_licence_files_are_carried(tmp_path):
    base = sharded_checkpoint("llama", tmp_path / "base")
    (base / "LICENSE").write_text("licence")
    (base / "README.md").write_text("the base model's card")
    (base / "pytorch_model.bin").write_bytes(b"unedited weights")
    (base / "consolidated.safetensors").write_bytes(b"unedited weights")
    (base / "original").mkdir()
    notes: list[str] = []
    stream_bake(base, edit_everything(ModelLayout.for_model(tiny_model("llama"))), tmp_path / "out",
                report=notes.append)
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"LICENSE", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not names & {"README.md", "pytorch_model.bin", "consolidated.safetensors", "original"}
    assert (tmp_path / "out" / "config.json").read_bytes() == (base / "config.json").read_bytes()
    assert notes and all(n in notes[0] for n in ("README.md", "pytorch_model.bin", "consolidated.safetensors"))


def test_refusals(tmp_path):
    base = sharded_checkpoint("llama", tmp_path / "base", shard="5GB")
    layout = ModelLayout.for_model(tiny_model("llama"))
    plan = build_plan([Neuron(layer=1, site="mlp.act", index=3)], EditSpec(), layout)
    ckpt = Checkpoint.open(base)
    target = "model.layers.1.mlp.down_proj.weight"
    with pytest.raises(EditError, match=r"tied to model\.layers\.0\.mlp\.down_proj\.weight"):
        plan_tensor_edits(ckpt, layout, plan, Skeleton({target: [target, "model.layers.0.mlp.down_proj.weight"]}, []))
    with pytest.raises(EditError, match="cannot be folded by streaming"):
        plan_tensor_edits(ckpt, layout, EditPlan(kind="module"))
    with pytest.raises(EditError, match="rewrites"):
        plan_tensor_edits(ckpt, layout, plan, Skeleton({}, [r"mlp\.down_proj"]))
    state = load_file(base / "model.safetensors")
    state[target] = state[target].to(torch.int8)
    save_file(state, base / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(EditError, match="stored as I8"):
        stream_bake(base, plan, tmp_path / "out")
    del state[target]
    save_file(state, base / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(EditError, match=r"no tensor model\.layers\.1\.mlp\.down_proj\.weight"):
        stream_bake(base, plan, tmp_path / "out2")


def test_an_error_half_way_leaves_nothing(tmp_path, monkeypatch):
    base = sharded_checkpoint("llama", tmp_path / "base")
    plan = edit_everything(ModelLayout.for_model(tiny_model("llama")))
    real = stream_module._write_shard
    written: list[Path] = []

    def fail_after_first(shard, out, *args):
        if written:
            raise OSError(28, "No space left on device")
        real(shard, out, *args)
        written.append(out)

    monkeypatch.setattr(stream_module, "_write_shard", fail_after_first)
    with pytest.raises(OSError, match="No space"):
        bake_checkpoint(base, plan, tmp_path / "out")
    assert written and not written[0].exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_a_killed_stream_leaves_no_output(tmp_path, sig):
    """A real process killed after its first shard: never an OUT. Ctrl-C (SIGINT) leaves nothing at all; SIGKILL,
    which no process can react to, leaves a hidden temporary that the next run removes before it succeeds."""
    base = sharded_checkpoint("llama", tmp_path / "base")
    plan = edit_everything(ModelLayout.for_model(tiny_model("llama")))
    (tmp_path / "plan.json").write_text(plan.model_dump_json())
    # Synchronised by pipes, not by time: the child writes one byte after its first shard, then blocks reading a
    # pipe that the parent never writes, so the signal always lands mid-bake.
    ready_r, ready_w = os.pipe()
    hold_r, hold_w = os.pipe()
    script = textwrap.dedent(f"""
        import os, pathlib
        from bakeedit.export import stream
        from bakeedit.edit.plan import EditPlan
        real = stream._write_shard
        def held(*args):
            real(*args)
            os.write({ready_w}, b"1")
            os.read({hold_r}, 1)
        stream._write_shard = held
        plan = EditPlan.model_validate_json(pathlib.Path({str(tmp_path / "plan.json")!r}).read_text())
        stream.bake_checkpoint(pathlib.Path({str(base)!r}), plan, pathlib.Path({str(tmp_path / "out")!r}))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stderr=subprocess.DEVNULL,
                            pass_fds=(ready_w, hold_r))
    os.close(ready_w)
    os.close(hold_r)
    try:
        assert os.read(ready_r, 1) == b"1", "the stream exited before writing its first shard"
        os.kill(proc.pid, sig)
    finally:
        code = proc.wait(timeout=120)
        os.close(ready_r)
        os.close(hold_w)
    assert code != 0
    assert not (tmp_path / "out").exists()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    if sig == signal.SIGINT:
        assert leftovers == []
    else:
        assert len(leftovers) == 1 and any(leftovers[0].glob("*.safetensors"))
    bake_checkpoint(base, plan, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["base", "out"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_streamed_verification(tmp_path, dtype):
    base = sharded_checkpoint("gemma3_text", tmp_path / "base", dtype=dtype)
    plan = edit_everything(ModelLayout.for_model(tiny_model("gemma3_text")))
    bake_checkpoint(base, plan, tmp_path / "out")
    good = verify_blocks(base, tmp_path / "out", plan)
    assert good.result.passed and not good.mismatched and good.tensors_compared == len(tensors(base))
    assert [b.layer for b in good.blocks] == [0, 1, 2]
    assert all(b.fold_max_abs_delta <= 1e-5 for b in good.blocks)
    if dtype == torch.float32:
        assert good.result.max_abs_logit_delta <= 1e-5

    unedited = verify_blocks(base, base, plan)  # the base passed off as its own bake
    edited = plan_tensor_edits(Checkpoint.open(base), ModelLayout.for_model(tiny_model("gemma3_text")), plan)[0]
    assert not unedited.result.passed and set(unedited.mismatched) == set(edited)

    # One byte of an untouched tensor changed on disk is found.
    baked = Checkpoint.open(tmp_path / "out")
    entry = baked.entry("model.norm.weight")
    with open(baked.where["model.norm.weight"].path, "r+b") as f:
        f.seek(entry.start)
        byte = f.read(1)
        f.seek(entry.start)
        f.write(bytes([byte[0] ^ 1]))
    corrupt = verify_blocks(base, tmp_path / "out", plan)
    assert not corrupt.result.passed and corrupt.mismatched == ["model.norm.weight"]


def test_index_that_lies_is_refused(tmp_path):
    base = sharded_checkpoint("llama", tmp_path / "base")
    index = json.loads((base / INDEX_FILE).read_text())
    name = next(iter(index["weight_map"]))
    others = sorted({s for s in index["weight_map"].values() if s != index["weight_map"][name]})
    index["weight_map"][name] = others[0]
    (base / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="not where it says"):
        Checkpoint.open(base)


def test_when_apply_can_stream(tmp_path):
    base = sharded_checkpoint("llama", tmp_path / "base")
    plan = edit_everything(ModelLayout.for_model(tiny_model("llama")))
    assert edited_dtype(base, plan) == torch.bfloat16
    assert streaming_blocker(base, plan) is None
    assert streaming_blocker(base, plan, "bfloat16") is None
    assert "differs from the checkpoint's stored dtype" in streaming_blocker(base, plan, "float32")
    assert "custom module" in streaming_blocker(base, EditPlan(kind="module"))
    assert "not a folder of safetensors" in streaming_blocker(tmp_path / "model.gguf", plan)
    index = json.loads((base / INDEX_FILE).read_text())  # a refusal only planning the tensors finds
    index["weight_map"]["model.layers.0.mlp.down_proj.weight"] = "elsewhere.safetensors"
    (base / INDEX_FILE).write_text(json.dumps(index))
    assert "shard elsewhere.safetensors named by the index is missing" in streaming_blocker(base, plan)


def test_apply_flow_with_streaming(tmp_path):
    """What ``bakeedit apply`` does when it streams a model that fits in memory: reference logits from the hooked
    base (loaded in float32, the CPU default), the streamed bf16 folder reloaded in float32, compared at the
    tolerance of the *stored* dtype: the fold rounds the scaled weights to bf16, the hooks do not."""
    from bakeedit.export.verify import compare_logits, default_tolerance, probe_inputs, probe_logits
    from bakeedit.io.staging import staged_output

    base = sharded_checkpoint("qwen2", tmp_path / "base")
    loaded = load_model(ModelSpec(id=str(base)))
    assert loaded.dtype == torch.float32
    plan = edit_everything(loaded.layout)
    inputs = probe_inputs(loaded.tokenizer, None, loaded.model.config)
    with runtime_edit(loaded.model, loaded.layout, plan):
        reference = probe_logits(loaded.model, inputs)
    notes: list[str] = []
    assert stream_for_apply(loaded, plan, tmp_path / "unused", in_memory=True) is None
    assert stream_for_apply(loaded, plan, tmp_path / "unused", dtype="float32", report=notes.append) is None
    assert not (tmp_path / "unused").exists() and "folding in memory: model.dtype float32 differs" in notes[0]
    with staged_output(tmp_path / "out") as tmp:
        streamed = stream_for_apply(loaded, plan, tmp, report=notes.append)
        assert streamed is not None and streamed.stored_dtype == torch.bfloat16 and len(notes) == 1
        assert {f.name for f in streamed.folded} == set(plan_tensor_edits(Checkpoint.open(base), loaded.layout,
                                                                          plan)[0])
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=loaded.dtype)
        candidate = probe_logits(reloaded, inputs)
        result = compare_logits(reference, candidate, streamed.stored_dtype, None, 5, "test")
        assert result.passed, result
        assert result.max_abs_logit_delta > default_tolerance(torch.float32, result.max_abs_logit), \
            "the float32 bound would wrongly fail a correct bf16 bake"
