"""``bakeedit export`` and a recipe's ``export.formats`` end to end on a tiny baked folder: the adapters are written,
verified in a fresh process, listed by ``apply``, understood by ``inspect`` and ``verify`` and pushed by ``push``
(with every check a baked folder gets); what cannot be exported is one line, before any model loads."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from baked_folders import LINEAR, NEURONS, NONLINEAR, bake
from click.testing import CliRunner

from bakeedit.cli import main
from bakeedit.cli.progress import PROGRESS_LINE
from bakeedit.errors import RecipeError
from bakeedit.export.adapter_record import check_adapter_folder
from bakeedit.recipe import load_recipe

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hub"))
from hub_clients import SERVER_LIFETIME_S
from hub_clients import bakeedit as bakeedit_process
from hub_double import HubDouble


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def message_lines(result) -> list[str]:
    """stderr without the progress lines: the command's own output."""
    return [line for line in result.stderr.strip().splitlines() if not PROGRESS_LINE.match(line)]


def assert_one_line(result, *needles: str) -> str:
    assert result.exit_code == 1, result.output
    lines = message_lines(result)
    assert lines[0].startswith("error: "), result.stderr
    assert len(lines) <= 2 and "Traceback" not in result.output  # the error and at most its hint
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def no_absolute_paths(folder: Path, *roots: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".md"):
            text = path.read_text()
            for root in roots:
                assert str(root) not in text, f"{path.name} holds the local path {root}"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export-cli")


@pytest.fixture(scope="module")
def baked(root) -> Path:
    return bake(root, name="tiny")


@pytest.fixture(scope="module")
def exported(baked, root) -> dict[str, Path]:
    """``bakeedit export --to ia3`` and ``--to lora`` of the baked folder (each verified in a fresh process)."""
    folders = {}
    for kind in ("ia3", "lora"):
        out = root / f"exported-{kind}"
        result = run("export", baked, "--to", kind, "-o", out)
        assert result.exit_code == 0, result.output
        assert result.stdout.strip() == str(out)
        assert "verification passed" in result.stderr and "PeftModel.from_pretrained" in result.stderr
        folders[kind] = out
    return folders


@pytest.mark.parametrize("kind", ["ia3", "lora"])
def test_export_writes_an_adapter_that_verified_against_the_baked_folder(exported, baked, root, kind):
    out = exported[kind]
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                                     "bakeedit.json"]
    record = check_adapter_folder(out)
    v = record.verification
    assert v.passed and v.merge == "passed" and v.merge_reference == "baked checkpoint"
    assert record.adapter.kind == kind and record.plan.n_neurons == 4
    assert record.baked_folder == "../tiny"  # relative: the record names no directory of this machine
    assert record.base_model.ref == "../base-llama" and record.neurons.model_id == "../base-llama"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == kind.upper()
    no_absolute_paths(out, root)


def test_verify_and_inspect_understand_an_adapter_folder(exported):
    out = exported["lora"]
    verified = run("verify", out)
    assert verified.exit_code == 0, verified.output
    assert "verified" in verified.stderr and "adapter" in verified.stderr and "keys: passed" in verified.stderr
    shown = run("inspect", out, "--neurons")
    assert shown.exit_code == 0, shown.output
    for needle in ("LORA adapter", "rank 2", "model.layers.2.mlp.down_proj", "passed", "record intact", "mlp.act"):
        assert needle in shown.stderr, needle


def test_a_tampered_adapter_is_refused_by_verify_and_inspect_says_so(exported, tmp_path):
    out = tmp_path / "adapter"
    shutil.copytree(exported["ia3"], out)
    config = json.loads((out / "adapter_config.json").read_text())
    config["target_modules"] = config["target_modules"][:1]
    (out / "adapter_config.json").write_text(json.dumps(config))
    assert_one_line(run("verify", out), "adapter_config.json")
    shown = run("inspect", out)
    assert shown.exit_code == 0 and "not intact" in shown.stderr


def test_export_gguf_of_a_non_gguf_base_is_one_line_before_anything_loads(baked, root, monkeypatch):
    monkeypatch.setattr("bakeedit.workflows.export.load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    out = root / "tiny-gguf"
    line = assert_one_line(run("export", baked, "--to", "gguf", "-o", out), "is not a GGUF file")
    assert "../base-llama" in line
    assert "llama.cpp" in run("export", baked, "--to", "gguf", "-o", out).stderr  # the hint says what to do
    assert not out.exists()


def test_export_refuses_an_output_inside_the_baked_folder_and_a_tampered_folder(baked, tmp_path, monkeypatch):
    monkeypatch.setattr("bakeedit.workflows.export.load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    assert_one_line(run("export", baked, "--to", "ia3", "-o", baked / "ia3"), "is inside the baked folder")
    copy = tmp_path / "tiny"
    shutil.copytree(baked, copy)
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")
    assert_one_line(run("export", copy, "--to", "lora", "-o", tmp_path / "lora"), "refusing to export it",
                    "config.json")
    assert not (tmp_path / "lora").exists()


def test_export_of_a_nonlinear_edit_is_the_adapters_one_line(root):
    nonlinear = bake(root, name="tiny-nonlinear", edit=NONLINEAR)
    out = root / "nonlinear-ia3"
    assert_one_line(run("export", nonlinear, "--to", "ia3", "-o", out), "cannot carry this plan")
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ push


def test_push_dry_run_of_an_adapter_folder_passes_and_of_a_tampered_one_fails(exported, tmp_path):
    dry = run("push", exported["ia3"], "tester/tiny-ia3", "--dry-run")
    assert dry.exit_code == 0, dry.output
    for name in ("adapter_model.safetensors", "adapter_config.json", "README.md", "bakeedit.json", "4 files",
                 "nothing was sent (dry run)"):
        assert name in dry.stderr, name

    for tamper, needle in ((lambda f: (f / "adapter_model.safetensors").write_bytes(b"x" * 760),
                            "adapter_model.safetensors"),
                           (lambda f: (f / "extra.bin").write_bytes(b"pickle"), "extra.bin"),
                           (lambda f: (f / "README.md").unlink(), "README.md")):
        folder = tmp_path / f"adapter-{needle}"
        shutil.copytree(exported["ia3"], folder)
        tamper(folder)
        assert_one_line(run("push", folder, "tester/tiny-ia3", "--dry-run"), "refusing to push", needle)


def test_an_adapter_folder_is_pushed_exactly_and_its_card_is_kept(exported, tmp_path):
    """The real client against the strict protocol double: the repository holds exactly the adapter folder (an
    adapter's card is not regenerated: it names no repository)."""
    token = "hf_" + "a1" * 16
    folder = tmp_path / "tiny-lora"
    shutil.copytree(exported["lora"], folder)
    with HubDouble(tmp_path / "hub", token, max_lifetime=SERVER_LIFETIME_S) as hub:
        ran = bakeedit_process("push", str(folder), "tester/tiny-lora", tmp=tmp_path / "client", endpoint=hub.url,
                               token=token)
        assert ran.returncode == 0, ran.output
        stored = {k: v for k, v in hub.files("tester/tiny-lora").items() if k != ".gitattributes"}
        url = hub.url
    assert hub.rejected == []
    assert stored == {p.name: p.read_bytes() for p in folder.iterdir()}
    assert stored == {p.name: p.read_bytes() for p in exported["lora"].iterdir()}  # nothing rewritten
    assert ran.stdout.strip().startswith(f"{url}/tester/tiny-lora/commit/")
    assert token not in ran.output


# ------------------------------------------------------------------------------------------------ apply


def write_recipe(folder: Path, formats: str, name: str = "formats", edit: str = LINEAR) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(f"name: {name}\nmodel: {folder / 'base-llama'}\n{edit}{NEURONS}export: {{formats: {formats}}}\n")
    return path


def test_apply_writes_the_sibling_artefacts_and_they_verify(root, baked):
    out = root / "applied"
    result = run("apply", write_recipe(root, "[safetensors, ia3, lora]"), "-o", out)
    assert result.exit_code == 0, result.output
    ia3, lora = root / "applied-ia3", root / "applied-lora"
    for kind, folder in (("ia3", ia3), ("lora", lora)):
        record = check_adapter_folder(folder)
        assert record.adapter.kind == kind and record.baked_folder == "../applied"
        assert record.verification.passed and record.verification.merge_reference == "baked checkpoint"
        assert f"adapter: {folder} (" in result.stderr  # the summary lists them
        no_absolute_paths(folder, root)
    prov = json.loads((out / "bakeedit.json").read_text())
    assert prov["recipe"]["data"]["export"]["formats"] == ["safetensors", "ia3", "lora"]
    assert not any(p.name.startswith(".applied") and "tmp" in p.name for p in root.iterdir())
    for folder in (out, ia3, lora):
        verified = run("verify", folder)
        assert verified.exit_code == 0, verified.output
        assert "verified" in verified.stderr
    shown = run("inspect", ia3)
    assert shown.exit_code == 0 and "IA3 adapter" in shown.stderr and "baked checkpoint of the same plan: ../applied" \
        in shown.stderr


@pytest.mark.parametrize("overwrite", [False, True], ids=["without-overwrite", "with-overwrite"])
def test_a_sibling_folder_that_is_not_bakeedit_s_stops_apply_before_any_model_loads(root, baked, tmp_path,
                                                                                      monkeypatch, overwrite):
    monkeypatch.setattr("bakeedit.workflows.apply.load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    shutil.copytree(root / "base-llama", tmp_path / "base-llama")
    sibling = tmp_path / "out-lora"
    sibling.mkdir()
    (sibling / "notes.txt").write_text("mine")
    args = ["apply", write_recipe(tmp_path, "[safetensors, ia3, lora]"), "-o", tmp_path / "out"]
    line = assert_one_line(run(*args, *(["--overwrite"] if overwrite else [])), str(sibling))
    assert ("will not replace it" if overwrite else "already exists") in line
    assert (sibling / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "out").exists() and not (tmp_path / "out-ia3").exists()


def test_apply_refuses_an_adapter_of_a_nonlinear_edit_before_the_bake(root, tmp_path):
    shutil.copytree(root / "base-llama", tmp_path / "base-llama")
    recipe = write_recipe(tmp_path, "[safetensors, ia3]", edit=NONLINEAR)
    assert_one_line(run("apply", recipe, "-o", tmp_path / "out"), "cannot carry this plan")
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["base-llama",
                                                                                         "formats.yaml"]


def test_apply_refuses_gguf_for_a_non_gguf_base_before_any_model_loads(root, tmp_path, monkeypatch):
    monkeypatch.setattr("bakeedit.workflows.apply.load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    shutil.copytree(root / "base-llama", tmp_path / "base-llama")
    line = assert_one_line(run("apply", write_recipe(tmp_path, "[safetensors, gguf]"), "-o", tmp_path / "out"),
                           "export.formats: gguf needs a GGUF base model")
    assert "formats.yaml" in line


@pytest.mark.parametrize(("formats", "message"), [
    ("[safetensors, banana]", "export.formats: unknown format 'banana'"),
    ("[safetensors, ia3, ia3]", "export.formats: ia3 is listed twice"),
    ("[lora]", "export.formats: safetensors must be listed"),
])
def test_export_formats_are_checked_when_the_recipe_is_read(tmp_path, formats, message):
    (tmp_path / "base-llama").mkdir()
    with pytest.raises(RecipeError) as err:
        load_recipe(write_recipe(tmp_path, formats))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_default_formats_are_the_checkpoint_alone(tmp_path):
    (tmp_path / "r.yaml").write_text("name: x\nmodel: embedded\nneurons: []\n")
    spec = load_recipe(tmp_path / "r.yaml").recipe.export
    assert spec.formats == ["safetensors"] and spec.extra_formats == []


# ------------------------------------------------------------------------------------------------ GGUF


def tiny_gguf_base(folder: Path) -> Path:
    """A tiny llama GGUF in Q8_0, written by ``test_gguf``'s converter-like writer, with a small SentencePiece
    vocabulary added (bakeedit loads a GGUF base with its tokenizer, as transformers does)."""
    import test_gguf
    from gguf import GGMLQuantizationType, GGUFWriter

    class WithTokenizer(GGUFWriter):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            words = ["\u2581the", "\u2581a", "\u2581nurse", "\u2581said", "\u2581that"]
            self.add_tokenizer_model("llama")
            self.add_token_list(["<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256)), *words])
            self.add_token_scores([0.0] * 259 + [-1.0 - i for i in range(len(words))])
            self.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(words))
            self.add_bos_token_id(1)
            self.add_eos_token_id(2)
            self.add_unk_token_id(0)

    folder.mkdir(parents=True, exist_ok=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(test_gguf, "GGUFWriter", WithTokenizer)
        return test_gguf.write_model_gguf(test_gguf.tiny_model("llama"), "llama", folder / "tiny-llama-Q8_0.gguf",
                                          GGMLQuantizationType.Q8_0)


def test_gguf_beside_apply_and_from_export_verify(tmp_path, monkeypatch):
    monkeypatch.setenv("BAKEEDIT_CACHE", str(tmp_path / "cache"))  # the GGUF's safetensors conversion
    source = tiny_gguf_base(tmp_path / "src")
    recipe = tmp_path / "gguf.yaml"
    recipe.write_text(f"name: tiny-gguf\nmodel: {source}\nedit: {{lambda: 2.0}}\nneurons:\n"
                      "  - {layer: 0, site: attn.q, index: 3}\n  - {layer: 1, site: attn.v, index: 5, lambda: 0}\n"
                      "  - {layer: 1, site: mlp.act, index: 7}\nexport: {formats: [safetensors, gguf]}\n")
    out = tmp_path / "out"
    applied = run("apply", recipe, "-o", out)
    assert applied.exit_code == 0, applied.output
    sibling = tmp_path / "out-gguf"
    assert f"baked GGUF: {sibling} (" in applied.stderr and "Repo card metadata" not in applied.output
    record = json.loads((sibling / "bakeedit.json").read_text())
    assert record["record"] == "gguf" and record["verification"]["passed"]
    assert record["source"]["file"] == "../src/tiny-llama-Q8_0.gguf" and len(record["changes"]) == 3
    assert sorted(p.name for p in sibling.iterdir()) == ["Modelfile", "README.md", "bakeedit.json",
                                                        record["gguf_file"]]
    no_absolute_paths(sibling, tmp_path)

    exported = run("export", out, "--to", "gguf", "-o", tmp_path / "again")
    assert exported.exit_code == 0, exported.output
    assert "llama-cli -m" in exported.stderr and "ollama create" in exported.stderr
    gguf_file = record["gguf_file"]
    assert (tmp_path / "again" / gguf_file).read_bytes() == (sibling / gguf_file).read_bytes()

    verified = run("verify", sibling)
    assert verified.exit_code == 0, verified.output
    assert "byte-identical to a fresh bake" in verified.stderr
    shown = run("inspect", sibling)
    assert shown.exit_code == 0 and "blk.1.ffn_up.weight" in shown.stderr and "Q8_0" in shown.stderr
    dry = run("push", sibling, "tester/tiny-gguf", "--dry-run")
    assert dry.exit_code == 0 and gguf_file in dry.stderr, dry.output

    data = bytearray((sibling / gguf_file).read_bytes())
    data[-1] ^= 1
    (sibling / gguf_file).write_bytes(bytes(data))
    assert_one_line(run("push", sibling, "tester/tiny-gguf", "--dry-run"), "refusing to push", gguf_file)
    assert_one_line(run("verify", sibling), gguf_file)
