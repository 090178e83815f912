"""Blockwise ("lazy") execution: the lazy model computes what the in-memory model computes, one block at a time, and
``auto`` picks it only when the checkpoint does not fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

import bakeedit.models.lazy as lazy
from bakeedit.errors import ModelLoadError
from bakeedit.models.arch import ModelLayout
from bakeedit.models.hookpoints import site_hooks
from bakeedit.models.lazy import ANCHOR, fits_in_memory, is_lazy, lazy_model, lazy_state
from bakeedit.models.load import load_model

from tiny_models import ARCHS, probe_ids, tiny_model, tiny_tokenizer


def sharded_checkpoint(arch: str, folder: Path, dtype: torch.dtype = torch.float32) -> Path:
    """A tiny checkpoint cut into many shards (so blocks straddle files), with the tokenizer."""
    tiny_model(arch, dtype=dtype).save_pretrained(folder, max_shard_size="20KB")
    tiny_tokenizer().save_pretrained(folder)
    assert len(list(folder.glob("*.safetensors"))) > 2
    return folder


def both(folder: Path, dtype: torch.dtype = torch.float32):
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    return reference, lazy_model(folder, AutoConfig.from_pretrained(folder), dtype)


def block_params_real(model: torch.nn.Module) -> list[int]:
    """The blocks that hold a real (non-meta) parameter right now; iteration does not trigger reads."""
    blocks = ModelLayout.for_model(model).blocks(model)
    return [i for i, block in enumerate(blocks) if any(not p.is_meta for p in block.parameters())]


@pytest.mark.parametrize("arch", ARCHS)
def test_lazy_logits_equal_the_in_memory_model(arch, tmp_path):
    reference, model = both(sharded_checkpoint(arch, tmp_path / arch))
    ids = probe_ids(batch=2, seq=9)
    with torch.no_grad():
        want, got = reference(ids).logits, model(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert block_params_real(model) == []
    assert all(p.is_meta for name, p in model.named_parameters() if name != ANCHOR)


@pytest.mark.parametrize("run_dtype", [torch.float32, torch.bfloat16])
def test_a_bf16_checkpoint_runs_in_the_dtype_asked_for(run_dtype, tmp_path):
    reference, model = both(sharded_checkpoint("qwen2", tmp_path / "bf16", dtype=torch.bfloat16), run_dtype)
    ids = probe_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)
    first = next(model.parameters())
    assert (first.device.type, first.dtype) == ("cpu", run_dtype)  # the anchor: inputs' device and mask dtype


def test_never_two_blocks_at_once_forward_and_backward_recomputation(tmp_path):
    """Hooks on every submodule count the blocks holding real parameters; gradients flow through the checkpointed
    blocks (backward recomputes them, one at a time) and equal the in-memory gradients."""
    reference, model = both(sharded_checkpoint("llama", tmp_path / "ck"))
    seen: list[list[int]] = []
    handles = [m.register_forward_hook(lambda *_: seen.append(block_params_real(model))) for m in model.modules()]
    state = lazy_state(model)
    ids = probe_ids()

    def run(net: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        leaf = torch.zeros(ids.shape[0], ids.shape[1], 32, requires_grad=True)
        block = ModelLayout.for_model(net).blocks(net)[1]
        # a scale inside the attention: its gradient needs block 1's saved tensors, so backward recomputes block 1
        handle = block.self_attn.q_proj.register_forward_hook(lambda _m, _a, out: out * (leaf + 0.5))
        try:
            loss = net(ids).logits.float().pow(2).mean()
        finally:
            handle.remove()  # removed before backward, as IG removes its hooks: recomputation must still apply it
        return loss, leaf

    loss, leaf = run(model)
    loads_after_forward = state.loads
    assert seen and max(len(s) for s in seen) == 1
    assert block_params_real(model) == []
    seen.clear()
    (grad,) = torch.autograd.grad(loss, leaf)
    assert state.loads > loads_after_forward, "backward recomputed no block"
    assert seen and max(len(s) for s in seen) <= 1
    for h in handles:
        h.remove()
    ref_loss, ref_leaf = run(reference)
    (ref_grad,) = torch.autograd.grad(ref_loss, ref_leaf)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)
    assert block_params_real(model) == []


def test_recomputation_replays_a_routed_expert_hook_removed_before_backward(tmp_path):
    """An expert site has no module: its hook replaces the experts module's ``forward`` (models/expert_hooks.py).
    Backward's recomputation must run that replaced forward again, after the hook is gone."""
    reference, model = both(sharded_checkpoint("qwen2_moe", tmp_path / "moe"))
    ids = probe_ids()
    grads = []
    for net in (reference, model):
        scale = torch.zeros((), requires_grad=True)
        layout = ModelLayout.for_model(net)
        with site_hooks(net, layout, {(1, "mlp.experts.2.act"): lambda a, s=scale: a * (s + 0.5)}):
            loss = net(ids).logits.float().pow(2).mean()
        grads.append(torch.autograd.grad(loss, scale)[0])
    assert float(grads[0].abs()) > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-8)


def test_a_parameter_read_outside_a_forward_comes_from_the_shards_and_is_not_kept(tmp_path):
    reference, model = both(sharded_checkpoint("qwen2_moe", tmp_path / "moe"))
    layout = ModelLayout.for_model(model)
    for site in ("mlp.shared.act", "attn.o_in", "mlp.experts.2.up"):
        got = layout.module(model, 1, site)
        want = layout.module(reference, 1, site)
        name = layout.site_map(site).param or "weight"  # a routed expert: the fused 3-D parameter
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=0, atol=0)
    assert lazy_state(model).reads == 3 and block_params_real(model) == []
    torch.testing.assert_close(model.get_output_embeddings().weight, reference.get_output_embeddings().weight)


def test_a_checkpoint_without_a_parameter_is_refused_before_running(tmp_path):
    folder = sharded_checkpoint("llama", tmp_path / "ck")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    name = "model.layers.1.mlp.down_proj.weight"
    shard = folder / index["weight_map"].pop(name)
    tensors = load_file(shard)
    del tensors[name]
    save_file(tensors, shard, metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match=r"no tensor for the model's parameter model\.layers\.1\.mlp\.down_proj"):
        lazy_model(folder, AutoConfig.from_pretrained(folder), torch.float32)


def test_fits_in_memory_compares_the_run_dtype_size_with_the_available_memory(tmp_path, monkeypatch):
    folder = sharded_checkpoint("llama", tmp_path / "bf16", dtype=torch.bfloat16)
    size16 = sum(t.numel() * 2 for f in folder.glob("*.safetensors") for t in load_file(f).values())
    assert lazy.checkpoint_bytes(folder, torch.float32) == 2 * size16  # bf16 on disk, float32 in memory
    monkeypatch.setattr(lazy, "available_memory", lambda: 10 * size16)
    assert fits_in_memory(folder, torch.float32)[0]
    monkeypatch.setattr(lazy, "available_memory", lambda: 2 * size16)
    fits, why = fits_in_memory(folder, torch.float32)
    assert not fits and "in float32 but only" in why
    assert fits_in_memory(folder, torch.bfloat16)[0]  # the same memory holds it in its stored dtype
    monkeypatch.setattr(lazy, "available_memory", lambda: None)  # no /proc/meminfo: the in-memory path, said so
    fits, why = fits_in_memory(folder, torch.float32)
    assert fits and "cannot be read" in why


def test_auto_is_blockwise_only_when_the_checkpoint_does_not_fit(tmp_path, monkeypatch):
    folder = sharded_checkpoint("gpt2", tmp_path / "ck")
    monkeypatch.setattr(lazy, "available_memory", lambda: 1 << 40)
    roomy = load_model(str(folder), execution="auto")
    assert not roomy.blockwise and not is_lazy(roomy.model)
    assert roomy.execution_reason.startswith("in memory: the checkpoint needs")
    monkeypatch.setattr(lazy, "available_memory", lambda: 4096)
    tight = load_model(str(folder), execution="auto")
    assert tight.blockwise and is_lazy(tight.model) and tight.device == torch.device("cpu")
    assert tight.execution_reason.startswith("blockwise: the checkpoint needs")
    asked = load_model(str(folder), execution="in-memory")
    assert not asked.blockwise and asked.execution_reason == "in memory: requested"
    assert load_model(str(folder)).blockwise is False  # the library default never surprises a caller that folds
    ids = probe_ids()
    with torch.no_grad():
        torch.testing.assert_close(tight.model(ids).logits, roomy.model(ids).logits, rtol=0, atol=1e-6)
    with pytest.raises(ModelLoadError, match="not one of auto, in-memory, blockwise"):
        load_model(str(folder), execution="streaming")


def record_reads(monkeypatch, model: torch.nn.Module, stored: str) -> tuple[list[tuple[int, int]], list[str]]:
    """Spy on the lazy model's checkpoint: the row ranges read of tensor ``stored``, and every tensor read whole."""
    ckpt = lazy_state(model).ckpt
    ranges: list[tuple[int, int]] = []
    whole: list[str] = []
    real_rows, real_read = ckpt.read_rows, ckpt.read

    def rows(name, first, last, *args, **kwargs):
        if name == stored:
            ranges.append((first, last))
        return real_rows(name, first, last, *args, **kwargs)

    def read(name, *args, **kwargs):
        whole.append(name)
        return real_read(name, *args, **kwargs)

    monkeypatch.setattr(ckpt, "read_rows", rows)
    monkeypatch.setattr(ckpt, "read", read)
    return ranges, whole


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2"])
def test_the_embedding_reads_only_the_rows_of_the_batchs_ids(arch, tmp_path, monkeypatch):
    """Without gradients, the embedding unit reads the rows of the ids in the batch and nothing else of its matrix
    (a 128k-token vocabulary's embedding is bigger than a block); the logits stay the in-memory ones."""
    reference, model = both(sharded_checkpoint(arch, tmp_path / arch))
    embedding = model.get_input_embeddings()
    stored = next(s.source.stored[0] for u in lazy_state(model).units if u.module is embedding for s in u.slots)
    ranges, whole = record_reads(monkeypatch, model, stored)
    ids = torch.tensor([[5, 6, 7, 40, 41, 5, 200]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=1e-6)
    assert ranges == [(5, 8), (40, 42), (200, 201)]
    tied = model.config.get_text_config().tie_word_embeddings  # the head reads the tied matrix whole (it is small)
    assert (stored in whole) == tied, (arch, tied)
    assert all(p.is_meta for name, p in embedding.named_parameters())


def test_a_large_lm_head_is_applied_a_slice_of_rows_at_a_time(tmp_path, monkeypatch):
    """Above HEAD_SLICE_MIN_BYTES the head's output is computed slice by slice, each slice read and freed: the
    logits equal the whole head's (to float32 rounding of the slices' products), the matrix is never read whole."""
    reference, model = both(sharded_checkpoint("llama", tmp_path / "ck"))
    monkeypatch.setattr(lazy, "HEAD_SLICE_MIN_BYTES", 0)
    monkeypatch.setattr(lazy, "_SLICE_BYTES", 40 * 4 * model.config.hidden_size)  # 40 rows a slice
    head = model.get_output_embeddings()
    stored = next(s.source.stored[0] for u in lazy_state(model).units if u.module is head for s in u.slots)
    slices, whole = record_reads(monkeypatch, model, stored)
    ids = probe_ids(batch=2, seq=9)
    with torch.no_grad():
        got, want = model(ids).logits, reference(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    vocab = model.config.vocab_size
    assert slices == [(a, min(vocab, a + 40)) for a in range(0, vocab, 40)] and len(slices) > 2
    assert stored not in whole


def test_the_sliced_lm_head_carries_the_gradient_of_its_input(tmp_path, monkeypatch):
    """With gradients (KnowBias' IG), the sliced head re-reads its slices for the input's gradient instead of keeping
    the matrix: the gradient at a block's activation equals the in-memory model's."""
    reference, model = both(sharded_checkpoint("llama", tmp_path / "ck"))
    monkeypatch.setattr(lazy, "HEAD_SLICE_MIN_BYTES", 0)
    monkeypatch.setattr(lazy, "_SLICE_BYTES", 40 * 4 * model.config.hidden_size)
    head = model.get_output_embeddings()
    stored = next(s.source.stored[0] for u in lazy_state(model).units if u.module is head for s in u.slots)
    reads, _ = record_reads(monkeypatch, model, stored)
    ids = probe_ids()

    def grad_of(net: torch.nn.Module) -> torch.Tensor:
        leaf = torch.zeros(ids.shape[0], ids.shape[1], net.config.hidden_size, requires_grad=True)
        block = ModelLayout.for_model(net).blocks(net)[-1]
        handle = block.register_forward_hook(lambda _m, _a, out: (out[0] + leaf, *out[1:]) if isinstance(out, tuple)
                                             else out + leaf)
        try:
            loss = net(ids).logits.float().pow(2).mean()
        finally:
            handle.remove()
        return torch.autograd.grad(loss, leaf)[0]

    got = grad_of(model)
    vocab = model.config.vocab_size
    assert len(reads) == 2 * len(range(0, vocab, 40))  # every slice read forward, and again backward
    torch.testing.assert_close(got, grad_of(reference), rtol=1e-5, atol=1e-7)
