"""The two bake paths of ``bakeedit apply`` (streamed, the default, and ``--in-memory``) write the same folder: the
same non-weight files, the stored dtype kept, and each verified by both legs (docs/verification.md)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from transformers import AutoTokenizer

from bakeedit.cli import main
from bakeedit.cli.progress import PROGRESS_LINE

from tiny_models import tiny_tokenizer

MASKED = """neurons:
  - {layer: 1, site: mlp.act, index: 2}
  - {layer: 1, site: mlp.act, index: 7}
  - {layer: 1, site: mlp.act, index: 11}
"""
#: Written by bakeedit itself and legitimately different between the paths: bakeedit.json records ``baked_by``,
#: timings, the time of the bake and the verification of each folder; the card is generated from it.
OWN_FILES = {"bakeedit.json", "README.md"}


def apply(recipe: Path, out: Path, *extra: str):
    return CliRunner().invoke(main, ["apply", str(recipe), "-o", str(out), *extra])


def write_recipe(folder: Path, base: Path, lam: float = 0.0) -> Path:
    path = folder / "masked.yaml"
    path.write_text(f"name: masked\nmodel: {base}\nedit: {{lambda: {lam}}}\n{MASKED}")
    return path


def without_pad_token(base: Path) -> Path:
    """The tiny checkpoint with a tokenizer that has no pad token, as many base models ship (GPT-2, Llama)."""
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (base / name).unlink(missing_ok=True)
    tok = tiny_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(base)
    assert AutoTokenizer.from_pretrained(base).pad_token is None
    return base


def non_weight_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()
            if p.is_file() and p.suffix != ".safetensors" and not p.name.endswith(".safetensors.index.json")}


def stored_dtypes(folder: Path) -> set[str]:
    """The safetensors dtypes (``BF16``, ``F32``...) of every tensor in the folder's shards."""
    dtypes = set()
    for shard in folder.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            dtypes |= {str(f.get_slice(name).get_dtype()) for name in f.keys()}  # noqa: SIM118 (safe_open API)
    return dtypes


@pytest.mark.parametrize("arch_name", ["llama", "gpt2"])
def test_both_paths_write_the_same_non_weight_files(tmp_path, tiny_checkpoint, arch_name):
    base = without_pad_token(tiny_checkpoint(arch_name))
    recipe = write_recipe(tmp_path, base)
    streamed, in_memory = tmp_path / "streamed", tmp_path / "in-memory"
    for out, extra in ((streamed, ()), (in_memory, ("--in-memory",))):
        result = apply(recipe, out, *extra)
        assert result.exit_code == 0, result.output
    a, b = non_weight_files(streamed), non_weight_files(in_memory)
    assert set(a) == set(b)
    differ = sorted(name for name in a if a[name] != b[name])
    assert set(differ) <= OWN_FILES, differ
    base_files = non_weight_files(base)
    for name, data in base_files.items():  # config, generation config and tokenizer: the base's own bytes
        assert b[name] == data, name
    assert AutoTokenizer.from_pretrained(in_memory).pad_token is None  # probing did not add one


def test_bf16_checkpoint_baked_in_memory_on_cpu_stays_bf16_and_verifies(tmp_path, tiny_checkpoint):
    base = tiny_checkpoint("llama", dtype=torch.bfloat16)
    out = tmp_path / "out"
    result = apply(write_recipe(tmp_path, base, lam=2.5), out, "--in-memory")
    assert result.exit_code == 0, result.output
    assert stored_dtypes(out) == {"BF16"} == stored_dtypes(base)
    assert (out / "model.safetensors").stat().st_size == (base / "model.safetensors").stat().st_size
    record = json.loads((out / "bakeedit.json").read_text())
    ver = record["verification"]
    assert record["dtype"] == ver["dtype"] == "bfloat16" and ver["runtime_dtype"] == "float32"
    assert any("ran in float32" in note for note in ver["notes"])
    assert ver["passed"] and ver["power"] == "passed" and ver["exact"] == "passed"
    verified = CliRunner().invoke(main, ["verify", str(out)])
    assert verified.exit_code == 0, verified.output


def test_recipe_dtype_converts_and_says_so(tmp_path, tiny_checkpoint):
    base = tiny_checkpoint("llama", dtype=torch.bfloat16)
    recipe = write_recipe(tmp_path, base, lam=2.5)
    recipe.write_text(recipe.read_text().replace(f"model: {base}", f"model: {{id: {base}, dtype: float32}}"))
    out = tmp_path / "out"
    result = apply(recipe, out, "--in-memory")
    assert result.exit_code == 0, result.output
    assert stored_dtypes(out) == {"F32"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"  # not the base's config
    ver = json.loads((out / "bakeedit.json").read_text())["verification"]
    assert ver["passed"] and ver["exact"] == "passed" and ver["dtype"] == "float32"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_a_fold_that_did_nothing_is_refused_and_nothing_is_written(tmp_path, tiny_checkpoint, monkeypatch, dtype):
    """The bug this guards against: in bf16 the dtype bound alone (2^-4 x max |logit|) is larger than the effect of
    three masked neurons, so an in-memory bake whose fold wrote nothing used to be "verified"."""
    import bakeedit.workflows.apply as apply_module

    monkeypatch.setattr(apply_module, "fold_plan", lambda *_args: [])
    base = tiny_checkpoint("gpt2", dtype=dtype)
    result = apply(write_recipe(tmp_path, base), tmp_path / "out", "--in-memory")
    assert result.exit_code == 1
    line = next((line for line in result.stderr.strip().splitlines() if not PROGRESS_LINE.match(line)), "")
    assert "is not below 1/4 of the edit's own effect" in line and "differ from the fold of the base" in line, line
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_verify_reruns_both_legs_on_a_streamed_bake(tmp_path, tiny_checkpoint):
    base = tiny_checkpoint("llama", dtype=torch.bfloat16)
    out = tmp_path / "out"
    assert apply(write_recipe(tmp_path, base), out).exit_code == 0
    ver = json.loads((out / "bakeedit.json").read_text())["verification"]
    assert ver["power"] == "passed" and ver["exact"] == "passed" and ver["edit_effect"] > 0
    assert ver["exact_tensors_compared"] == len(tensor_names(base))
    shutil.copyfile(base / "model.safetensors", out / "model.safetensors")  # the base passed off as the bake...
    from bakeedit.export.provenance import hash_written_files, read_provenance, write_provenance

    prov = read_provenance(out)
    prov.files_sha256 = hash_written_files(out)  # ... with its hashes re-recorded: only the two legs can tell
    write_provenance(out, prov)
    result = CliRunner().invoke(main, ["verify", str(out)])
    assert result.exit_code == 1 and "verification failed" in result.stderr


def tensor_names(folder: Path) -> list[str]:
    with safe_open(folder / "model.safetensors", "pt") as f:
        return list(f.keys())
