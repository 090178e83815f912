"""Custom-module checkpoints: saved, reloaded in a fresh offline Python process with ``trust_remote_code=True``, they
must compute what the runtime-hooked base model computes (logits to 1e-5 in float32, greedy generations with and
without the KV cache), refuse to load without ``trust_remote_code``, and ship a short, ruff-clean module."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

from bakeedit.cli import main
from bakeedit.edit import build_plan, fold_plan, runtime_edit
from bakeedit.errors import EditError
from bakeedit.export.custom_module import (
    EDIT_FILE,
    MAX_MODULE_LINES,
    MODULE_FILE,
    render_module,
    write_custom_module,
)
from bakeedit.io.hashing import file_sha256
from bakeedit.models.arch import ModelLayout
from bakeedit.models.custom import read_base_config
from bakeedit.neurons import Neuron
from bakeedit.recipe import EditSpec

from tiny_models import ARCHS, CONFIGS, probe_ids, tiny_model, tiny_tokenizer

REPO = Path(__file__).resolve().parents[2]
ROUNDTRIP_ARCHS = ("llama", "mistral", "qwen2")
NEURONS = (
    [Neuron(layer=0, site="attn.q", index=i) for i in range(0, 32, 3)]
    + [Neuron(layer=1, site="attn.v", index=i) for i in range(0, 16, 2)]
    + [Neuron(layer=2, site="mlp.act", index=i) for i in range(0, 48, 5)]
)
LAST = [Neuron(layer=1, site="mlp.gate", index=i) for i in range(0, 48, 4)] + NEURONS[:3] + NEURONS[11:19]
#: name -> (neurons, edit); activations of the tiny models are about 0.1, so the parameters are scaled to that.
CASES: dict[str, tuple[list[Neuron], dict]] = {
    "tanh_gain": (NEURONS, {"type": "nonlinear", "map": "tanh_gain", "params": {"alpha": 1.0, "s": 0.05}}),
    "sigmoid_gain": (NEURONS, {"type": "nonlinear", "map": "sigmoid_gain",
                               "params": {"alpha": 8.0, "beta": 40.0, "theta": 0.05}}),
    "power": (NEURONS, {"type": "nonlinear", "map": "power",
                        "params": {"p": [0.25, 3.0] * (len(NEURONS) // 2) + [0.5] * (len(NEURONS) % 2)}}),
    # KnowBias's reference edit (gate channels scaled at the last position) plus a nonlinear map at the last
    # position from token 2 on, and a linear all-position part that folds: a mixed checkpoint.
    "last": (LAST, {"lambda": 8.0, "positions": "last", "overrides": [
        {"sites": ["attn.v"], "map": "tanh_gain", "params": {"alpha": 2.0, "s": 0.05}, "start": 2},
        {"sites": ["attn.q"], "lambda": 3.0, "positions": "all"}]}),
    # a nonlinear map at every real token from token 3 on: the index must count real tokens, not padding
    "start": (NEURONS, {"type": "nonlinear", "map": "tanh_gain", "params": {"alpha": 3.0, "s": 0.05}, "start": 3}),
}
NEW_TOKENS = 8
#: The three architectures of the issue with every case, plus fused layouts (Phi-3's qkv_proj/gate_up_proj, GPT-2's
#: Conv1D c_attn) where the module's physical channels differ from the site indices.
PAIRS = [(arch, case) for arch in ROUNDTRIP_ARCHS for case in CASES] + [
    ("phi3", "last"), ("gpt2", "tanh_gain"), ("gpt2", "start")]


def generation_inputs() -> dict[str, torch.Tensor]:
    ids = probe_ids(batch=2, seq=7, seed=5)
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0  # left padding, as generate() wants
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def hooked_outputs(model, layout, plan, ids, prompt) -> dict:
    with runtime_edit(model, layout, plan):
        return {
            "logits": model(ids).logits,
            "generate": {c: model.generate(**prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                           do_sample=False, use_cache=c) for c in (True, False)},
        }


@pytest.fixture(scope="module")
def roundtrip(tmp_path_factory):
    """Every (architecture, case) saved as a custom-module checkpoint, then all loaded by ONE fresh process."""
    root = tmp_path_factory.mktemp("custom")
    ids, prompt = probe_ids(batch=3, seq=12), generation_inputs()
    expected, folders, plans, base_logits = {}, {}, {}, {}
    for arch, case in PAIRS:
        neurons, edit = CASES[case]
        model = tiny_model(arch)
        layout = ModelLayout.for_model(model)
        plan = build_plan(neurons, EditSpec.model_validate(edit), layout)
        name = f"{arch}-{case}"
        with torch.no_grad():
            base_logits[name] = model(ids).logits
        expected[name] = hooked_outputs(model, layout, plan, ids, prompt)
        fold_plan(model, layout, plan)
        folder = root / name
        model.save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
        write_custom_module(folder, model, layout, plan)
        folders[name], plans[name] = str(folder), plan
    job = {"folders": folders, "ids": ids, "prompt": prompt, "new_tokens": NEW_TOKENS, "resave": "llama-last",
           "out": str(root / "results.pt")}
    torch.save(job, root / "job.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(root / "hf"), "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("reload_worker.py")), str(root / "job.pt")],
                          env=env, cwd=root, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"expected": expected, "got": torch.load(root / "results.pt"), "folders": folders, "plans": plans,
            "base": base_logits, "root": root}


@pytest.mark.parametrize(("arch", "case"), PAIRS)
def test_fresh_process_reload_matches_the_hooked_base(roundtrip, arch, case):
    name = f"{arch}-{case}"
    want, got = roundtrip["expected"][name], roundtrip["got"][name]
    assert (want["logits"] - roundtrip["base"][name]).abs().max() > 0.01, "the edit must change the output"
    assert (got["logits"] - want["logits"]).abs().max() <= 1e-5
    for cache in (True, False):
        assert got["generate"][cache].shape[1] == 7 + NEW_TOKENS
        assert torch.equal(got["generate"][cache], want["generate"][cache]), f"use_cache={cache}"
    assert got["class"] == "BakeeditForCausalLM"
    assert Path(got["module_file"]).is_relative_to(roundtrip["root"] / "hf" / "modules")  # loaded as remote code


def test_last_position_edits_differ_with_and_without_the_cache(roundtrip):
    """Under ``positions: last`` a cached token keeps the edit it had when it was last; a full re-run does not.

    Both loaders agree on each (tested above); this pins that the two modes really are different computations.
    """
    assert not torch.equal(*roundtrip["expected"]["llama-last"]["generate"].values())


#: The loader of :func:`padded_roundtrip`'s fresh process: forward passes with attention masks and position ids.
PADDED_WORKER = """
import sys
import torch
from transformers import AutoModelForCausalLM
job = torch.load(sys.argv[1])
out = {}
for name, folder in job["folders"].items():
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        out[name] = {kind: model(**inputs).logits for kind, inputs in job["forwards"].items()}
    out[name]["positions"] = sorted(model.bakeedit_positions)
out["bakeedit_imported"] = sorted(m for m in sys.modules if m.split(".")[0] == "bakeedit")
torch.save(out, job["out"])
"""
PADDED_NAMES = ("llama-last", "qwen2-last", "phi3-last", "llama-start", "gpt2-start")


def padded_forwards() -> dict[str, dict[str, torch.Tensor]]:
    """Rows of 12 and 7 tokens right-padded (mask only) and left-padded (with and without position ids, as
    ``generate()`` and a plain call give them), and one packed row as the scorer builds it: a pad, a context of 5,
    then segments of 3 and 2 tokens that restart at position 5, then a copy of the context's last token (position 4,
    seeing the context but not the original), under a 4D "may attend" mask."""
    rows = [probe_ids(batch=1, seq=12, seed=8)[0], probe_ids(batch=1, seq=7, seed=9)[0]]
    right, left = torch.zeros(2, 12, dtype=torch.long), torch.zeros(2, 12, dtype=torch.long)
    right_mask, left_mask = torch.zeros_like(right), torch.zeros_like(left)
    for k, row in enumerate(rows):
        right[k, :len(row)], right_mask[k, :len(row)] = row, 1
        left[k, 12 - len(row):], left_mask[k, 12 - len(row):] = row, 1
    segment = torch.tensor([-1] + [0] * 5 + [1] * 3 + [2] * 2 + [3])  # -1 pad, 0 context, 1.. segments
    allowed = torch.ones(12, 12, dtype=torch.bool).tril() & (segment != -1)[None, :] & (
        (segment == 0)[None, :] | (segment[:, None] == segment[None, :]))
    allowed[11, 5] = False  # the copy does not see the original
    return {
        "right": {"input_ids": right, "attention_mask": right_mask},
        "left": {"input_ids": left, "attention_mask": left_mask,
                 "position_ids": (left_mask.cumsum(1) - 1).clamp(min=0)},
        "left_mask_only": {"input_ids": left, "attention_mask": left_mask},
        "packed": {"input_ids": probe_ids(batch=1, seq=12, seed=10),
                   "attention_mask": (allowed | torch.eye(12, dtype=torch.bool))[None, None],
                   "position_ids": torch.tensor([[0, 0, 1, 2, 3, 4, 5, 6, 7, 5, 6, 4]])},
    }


@pytest.fixture(scope="module")
def padded_roundtrip(roundtrip):
    """The position-scoped checkpoints of :func:`roundtrip`, reloaded in one more fresh process and run on padded
    and packed batches, against the hooked base on the same batches."""
    root, forwards = roundtrip["root"], padded_forwards()
    expected = {}
    for name in PADDED_NAMES:
        model = tiny_model(name.split("-")[0])
        with torch.no_grad(), runtime_edit(model, ModelLayout.for_model(model), roundtrip["plans"][name]):
            expected[name] = {kind: model(**inputs).logits for kind, inputs in forwards.items()}
    job = {"folders": {name: roundtrip["folders"][name] for name in PADDED_NAMES}, "forwards": forwards,
           "out": str(root / "padded.pt")}
    torch.save(job, root / "padded-job.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(root / "hf"), "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, "-c", PADDED_WORKER, str(root / "padded-job.pt")], env=env, cwd=root,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"expected": expected, "got": torch.load(root / "padded.pt"), "forwards": forwards}


@pytest.mark.parametrize("name", PADDED_NAMES)
@pytest.mark.parametrize("kind", ["right", "left", "left_mask_only", "packed"])
def test_reloaded_module_equals_the_hooked_base_under_padding_and_packing(padded_roundtrip, name, kind):
    mask = padded_roundtrip["forwards"][kind]["attention_mask"]
    real = mask.bool() if mask.dim() == 2 else torch.tensor([[False] + [True] * (mask.shape[-1] - 1)])
    want, got = padded_roundtrip["expected"][name][kind], padded_roundtrip["got"][name][kind]
    assert (got[real] - want[real]).abs().max() <= 1e-5


def test_reloaded_module_announces_its_position_scopes(padded_roundtrip, roundtrip):
    """What the scorer reads to pick and refuse modes (bakeedit/evaluate/engine.py)."""
    for name in PADDED_NAMES:
        plan = roundtrip["plans"][name]
        assert padded_roundtrip["got"][name]["positions"] == sorted({g.positions for g in plan.module_groups})
    assert padded_roundtrip["got"]["bakeedit_imported"] == []


def test_fresh_process_never_imports_bakeedit(roundtrip):
    assert roundtrip["got"]["_meta"]["bakeedit_imported"] == []


@pytest.mark.parametrize("how", ["refused_false", "refused_default"])
def test_loading_without_trust_remote_code_fails_with_transformers_message(roundtrip, how):
    message = roundtrip["got"]["_meta"][how]
    assert message.startswith("ValueError: The repository")
    assert "contains custom code which must be executed" in message
    assert "trust_remote_code=True" in message


def test_tokenizer_loads_with_the_same_flag(roundtrip):
    assert roundtrip["got"]["_meta"]["tokenizer"] == type(tiny_tokenizer()).__name__


def test_save_pretrained_of_the_loaded_model_keeps_the_edit(roundtrip):
    resaved, want = roundtrip["got"]["_meta"]["resaved"], roundtrip["expected"]["llama-last"]
    assert (resaved["logits"] - want["logits"]).abs().max() <= 1e-5
    assert torch.equal(resaved["generate"][True], want["generate"][True])


def test_folder_holds_base_weights_with_only_the_linear_part_folded(roundtrip):
    folder = Path(roundtrip["folders"]["llama-last"])
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "bakeedit_llama" and config["bakeedit_base_model_type"] == "llama"
    assert config["architectures"] == ["BakeeditForCausalLM"]
    assert config["auto_map"] == {"AutoConfig": "modeling_bakeedit.BakeeditConfig",
                                  "AutoModelForCausalLM": "modeling_bakeedit.BakeeditForCausalLM"}
    saved, base = load_file(folder / "model.safetensors"), tiny_model("llama").state_dict()
    assert set(saved) == set(base)  # the base tensors, nothing added
    changed = sorted(k for k in saved if not torch.equal(saved[k], base[k]))
    assert changed == ["model.layers.0.self_attn.q_proj.weight"]  # the attn.q override at all positions folds
    with safe_open(folder / EDIT_FILE, framework="pt") as f:
        meta = json.loads(f.metadata()["bakeedit"])
        assert [(g["module"], g["axis"], g["map"], g["positions"], g["start"]) for g in meta["groups"]] == [
            ("model.layers.1.self_attn.v_proj", "out", "tanh_gain", "last", 2),
            ("model.layers.1.mlp.gate_proj", "out", "scale", "last", 0)]
        assert f.get_tensor("1.channels").tolist() == list(range(0, 48, 4))
        assert f.get_tensor("1.lambda").dtype == torch.float32


def test_module_refuses_what_it_cannot_carry(tmp_path):
    model = tiny_model("llama")
    layout = ModelLayout.for_model(model)
    folded_only = build_plan(NEURONS[:2], EditSpec(), layout)
    with pytest.raises(EditError, match="no nonlinear or position-scoped part"):
        write_custom_module(tmp_path, model, layout, folded_only)
    with pytest.raises(EditError, match="transformers does not export 'NoSuchForCausalLM'"):
        render_module("NoSuchForCausalLM", "LlamaConfig", "llama")


def test_generated_modules_are_short_ruff_clean_and_self_contained(tmp_path):
    for arch in ARCHS:
        model = tiny_model(arch)
        source = render_module(type(model).__name__, type(model.config).__name__, CONFIGS[arch].model_type)
        assert len(source.splitlines()) < MAX_MODULE_LINES == 150
        imported = {
            (node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
            for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Import | ast.ImportFrom)
            for alias in node.names
        }
        assert imported == {"__future__", "json", "os", "torch", "safetensors", "transformers"}, arch
        assert f"({type(model).__name__})" in source and f'"bakeedit_{CONFIGS[arch].model_type}"' in source
        (tmp_path / f"modeling_{arch}.py").write_text(source)
    for config in (["--config", str(REPO / "pyproject.toml")], ["--isolated"]):  # repo rules, then ruff defaults
        lint = subprocess.run([sys.executable, "-m", "ruff", "check", *config, str(tmp_path)],
                              capture_output=True, text=True)
        assert lint.returncode == 0, lint.stdout + lint.stderr


def test_base_config_is_read_without_running_the_module(roundtrip):
    folder = roundtrip["folders"]["qwen2-power"]
    config = read_base_config(folder)
    assert type(config).__name__ == "Qwen2Config"
    assert ModelLayout.for_config(config).site_size("attn.v") == 16


MIXED = """name: mixed-tiny
model: {base}
neurons:
  - {{layer: 0, site: attn.q, index: 3}}
  - {{layer: 0, site: attn.q, index: 4}}
  - {{layer: 1, site: attn.v, index: 5}}
  - {{layer: 2, site: mlp.act, index: 7}}
  - {{layer: 1, site: mlp.gate, index: 9}}
edit:
  type: nonlinear
  map: tanh_gain
  params: {{alpha: 1.0, s: 0.05}}
  overrides:
    - {{sites: [mlp.act], lambda: 2.5}}
    - {{sites: [mlp.gate], lambda: 4.0, positions: last}}
"""


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def test_mixed_recipe_through_apply_inspect_verify(tmp_path, tiny_checkpoint):
    recipe = tmp_path / "mixed.yaml"
    recipe.write_text(MIXED.format(base=tiny_checkpoint("llama")))
    out = tmp_path / "out"
    result = run("apply", str(recipe), "-o", str(out))
    assert result.exit_code == 0, result.output
    assert "trust_remote_code=True" in result.stderr + result.stdout
    prov = json.loads((out / "bakeedit.json").read_text())
    assert prov["edit_form"] == "mixed" and prov["plan"]["kind"] == "mixed"
    assert prov["folded_tensors"] == ["model.layers.2.mlp.down_proj.weight"]
    assert [(g["site"], g["map"], g["positions"]) for g in prov["plan"]["module_groups"]] == [
        ("attn.q", "tanh_gain", "all"), ("attn.v", "tanh_gain", "all"), ("mlp.gate", "scale", "last")]
    module = prov["custom_module"]
    assert module["module_sha256"] == file_sha256(out / MODULE_FILE) == prov["files_sha256"][MODULE_FILE]
    assert module["edit_sha256"] == prov["files_sha256"][EDIT_FILE]
    assert prov["verification"]["passed"] and prov["verification"]["max_abs_logit_delta"] <= 1e-5
    assert "trust_remote_code=True" in prov["verification"]["compared"]

    shown = run("inspect", str(out))
    assert shown.exit_code == 0, shown.output
    assert "custom module" in shown.stderr and "tanh_gain" in shown.stderr and module["module_sha256"] in shown.stderr

    verified = run("verify", str(out))
    assert verified.exit_code == 0, verified.output

    (out / MODULE_FILE).write_text((out / MODULE_FILE).read_text().replace('"scale": lambda a, p: a * p["lambda"]',
                                                                           '"scale": lambda a, p: a'))
    tampered = run("verify", str(out))
    assert tampered.exit_code == 1
    assert f"files changed since they were written: {MODULE_FILE}" in tampered.stderr


def test_bakeedit_eval_loads_a_custom_module_folder_only_when_trusted(tmp_path, shared_data):
    from baked_folders import NONLINEAR, bake

    from bakeedit.evaluate.report import read_results

    folder = bake(tmp_path, name="nl", edit=NONLINEAR)
    command = ["eval", str(folder), "--tasks", "copa", "--limit", "4", "--data-dir", str(shared_data)]
    refused = CliRunner().invoke(main, command)
    assert refused.exit_code == 1
    assert "custom-module checkpoint" in refused.stderr and "--trust-remote-code" in refused.stderr
    assert not (folder / "eval").exists()

    trusted = CliRunner().invoke(main, [*command, "--trust-remote-code"])
    assert trusted.exit_code == 0, trusted.output
    [result] = read_results(folder / "eval").results["model"]
    assert result.task == "copa" and result.n == 4
