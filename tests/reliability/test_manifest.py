"""Issue #10, section 2: what is published is exactly what was verified (the manifest side).

``bakeedit.json`` lists every file of a baked folder with its sha256 and a digest of itself, and its plan must be
the one its recipe derives. Every way of changing a baked folder by hand is refused by ``verify``, ``push --dry-run``
and ``card`` through the real CLI: exit 1, one line naming the file or field, no traceback, the folder unchanged.
``card`` and ``eval``, which rewrite files themselves, keep a valid folder valid; and no written file carries an
absolute local path.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from baked_folders import bake
from reliability_harness import assert_one_clear_line, run_cli, snapshot

from bakeedit.export.provenance import PROVENANCE_FILE, canonical_digest
from bakeedit.io.hashing import file_sha256

REPO_ID = "tester/tiny-edit"


@pytest.fixture(scope="module")
def baked(tmp_path_factory) -> Path:
    """One verified tiny folder; every test works on its own copy."""
    return bake(tmp_path_factory.mktemp("manifest"), name="tiny-edit")


@pytest.fixture
def folder(baked, tmp_path) -> Path:
    """A copy of the baked folder, with its base where bakeedit.json says (``../base-llama``, from the folder)."""
    copy = tmp_path / "tiny-edit"
    shutil.copytree(baked, copy)
    (tmp_path / "base-llama").symlink_to(baked.parent / "base-llama", target_is_directory=True)
    return copy


# ------------------------------------------------------------------------------------------------ tampering


def edit_record(folder: Path, change: Callable[[dict], None], redigest: bool = False) -> None:
    """Change ``bakeedit.json`` as a hand would; ``redigest`` also recomputes its digest, as a forger would."""
    path = folder / PROVENANCE_FILE
    raw = json.loads(path.read_text())
    change(raw)
    if redigest:
        raw["manifest_sha256"] = canonical_digest(raw)
    path.write_text(json.dumps(raw, indent=1))


def change_shard(folder: Path) -> None:
    """Scale one weight matrix of the shard (it still loads; only its bytes and logits differ)."""
    from safetensors.torch import load_file, save_file

    shard = folder / "model.safetensors"
    weights = load_file(shard)
    key = next(k for k in weights if "layers.2.mlp.down_proj" in k)
    weights[key] = weights[key] * 1.5
    save_file(weights, shard, metadata={"format": "pt"})


def rehash_shard(folder: Path, redigest: bool = False) -> None:
    """Change the shard and record its new sha256 in bakeedit.json."""
    change_shard(folder)
    digest = file_sha256(folder / "model.safetensors")
    edit_record(folder, lambda raw: raw["files_sha256"].update({"model.safetensors": digest}), redigest)


def append(name: str, text: str = "\n{# changed #}\n") -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_text((folder / name).read_text() + text)


def set_plan_lambda(raw: dict) -> None:
    raw["plan"]["groups"][0]["lambdas"][0] = 9.0


def set_recipe_lambda(raw: dict) -> None:
    raw["recipe"]["data"]["edit"]["lambda"] = 9.0


def set_neuron_index(folder: Path) -> None:
    path = folder / "neurons.json"
    raw = json.loads(path.read_text())
    raw["neurons"][0]["index"] += 1
    path.write_text(json.dumps(raw, indent=1))


def tokenizer_config(folder: Path) -> None:
    path = folder / "tokenizer_config.json"
    raw = json.loads(path.read_text())
    raw["model_max_length"] = 7
    path.write_text(json.dumps(raw))


#: (id, tampering, what the first line must name, whether `bakeedit card` must refuse it too: the card and heat
#: map are the files card itself rewrites, so a hand-edited card is repaired by card, not refused).
TAMPERING: list[tuple[str, Callable[[Path], None], tuple[str, ...], bool]] = [
    ("adds-a-pickle", lambda f: (f / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01."), ("pytorch_model.bin",),
     True),
    ("adds-an-unlisted-file", lambda f: (f / "notes.txt").write_text("mine"), ("notes.txt",), True),
    ("adds-a-file-under-eval", lambda f: ((f / "eval").mkdir(), (f / "eval" / "x.json").write_text("{}")),
     ("eval/x.json",), True),
    ("deletes-a-listed-file", lambda f: (f / "tokenizer.json").unlink(), ("tokenizer.json",), True),
    ("changes-the-chat-template", append("chat_template.jinja"), ("chat_template.jinja",), True),
    ("changes-tokenizer-config", tokenizer_config, ("tokenizer_config.json",), True),
    ("changes-recipe-yaml", append("recipe.yaml", "# changed\n"), ("recipe.yaml",), True),
    ("changes-neurons-json", set_neuron_index, ("neurons.json",), True),
    ("changes-a-shard", change_shard, ("model.safetensors",), True),
    ("edits-the-card", append("README.md", "\nhand-written claim\n"), ("README.md",), False),
    ("deletes-the-heat-map", lambda f: (f / "neurons_heatmap.png").unlink(), ("neurons_heatmap.png",), False),
    ("edits-plan-lambda", lambda f: edit_record(f, set_plan_lambda), ("plan.groups[0].lambdas[0]",), True),
    ("edits-recipe-lambda", lambda f: edit_record(f, set_recipe_lambda), ("recipe.data.edit.lambda",), True),
    ("edits-plan-lambda-redigested", lambda f: edit_record(f, set_plan_lambda, redigest=True),
     ("plan.groups[0].lambdas[0]",), True),
    ("edits-recipe-lambda-redigested", lambda f: edit_record(f, set_recipe_lambda, redigest=True),
     ("recipe.data.edit.lambda",), True),
    ("edits-the-verification", lambda f: edit_record(f, lambda r: r["verification"].update(passed=True, tolerance=9)),
     ("manifest_sha256",), True),
    ("rehashes-a-tampered-shard", rehash_shard, ("manifest_sha256",), True),
    ("old-format", lambda f: edit_record(f, lambda r: r.update(format_version=1), redigest=True),
     ("format_version",), True),
    ("unreadable-record", lambda f: (f / PROVENANCE_FILE).write_text("{not json"), (PROVENANCE_FILE,), True),
]

COMMANDS = {
    "verify": lambda folder: ("verify", str(folder)),
    "push-dry-run": lambda folder: ("push", str(folder), REPO_ID, "--dry-run"),
    "card": lambda folder: ("card", str(folder)),
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize(("tamper", "names", "card_refuses"), [t[1:] for t in TAMPERING], ids=[t[0] for t in TAMPERING])
def test_a_hand_changed_folder_is_refused_naming_what_changed(folder, command, tamper, names, card_refuses):
    tamper(folder)
    before = snapshot(folder)
    outcome = run_cli(*COMMANDS[command](folder))
    if command == "card" and not card_refuses:  # card rewrites exactly these: it repairs the folder
        assert outcome.exit_code == 0, outcome.output
        assert run_cli("verify", str(folder)).exit_code == 0
        return
    assert_one_clear_line(outcome, 1, names)
    assert snapshot(folder) == before  # nothing written, no temporary left


def test_a_reforged_shard_passes_the_record_checks_but_verify_fails_on_logits(folder):
    """Shard, its recorded hash and the record's digest all changed together: consistent on paper. Only verify's
    comparison with the base model running the recorded plan can see that the weights do something else."""
    rehash_shard(folder, redigest=True)
    before = snapshot(folder)
    outcome = run_cli("verify", str(folder))
    assert_one_clear_line(outcome, 1, "verification failed")
    assert snapshot(folder) == before


def test_old_format_is_refused_with_a_hint_to_bake_again(folder):
    edit_record(folder, lambda r: r.update(format_version=1), redigest=True)
    outcome = run_cli("verify", str(folder))
    assert_one_clear_line(outcome, 1, "format_version 1")
    assert "re-run bakeedit apply" in outcome.output


# ------------------------------------------------------------------------------------------------ rewriting commands


def test_card_keeps_a_valid_folder_valid(folder):
    card = run_cli("card", str(folder), "--repo-id", REPO_ID)
    assert card.exit_code == 0, card.output
    assert f"from_pretrained('{REPO_ID}')" in (folder / "README.md").read_text()
    recorded = json.loads((folder / PROVENANCE_FILE).read_text())["files_sha256"]
    assert recorded["README.md"] == file_sha256(folder / "README.md")
    for command in ("verify", "push-dry-run"):
        ran = run_cli(*COMMANDS[command](folder))
        assert ran.exit_code == 0, ran.output


def test_eval_into_the_folder_keeps_it_valid_and_its_files_are_then_checked(folder):
    ran = run_cli("eval", str(folder), "--tasks", "gender_words", "--limit", "2")
    assert ran.exit_code == 0, ran.output
    recorded = json.loads((folder / PROVENANCE_FILE).read_text())
    assert {"eval/results.json", "eval/report.md"} <= set(recorded["files_sha256"])
    assert recorded["evaluation"]["written_by"] == "bakeedit eval"
    for command in ("verify", "push-dry-run", "card"):
        again = run_cli(*COMMANDS[command](folder))
        assert again.exit_code == 0, again.output
    append("eval/report.md", "\nbetter numbers\n")(folder)
    assert_one_clear_line(run_cli("verify", str(folder)), 1, "eval/report.md")


def test_eval_refuses_a_tampered_folder_before_evaluating(folder):
    (folder / "notes.txt").write_text("mine")
    before = snapshot(folder)
    outcome = run_cli("eval", str(folder), "--tasks", "gender_words", "--limit", "2")
    assert_one_clear_line(outcome, 1, "notes.txt")
    assert snapshot(folder) == before


# ------------------------------------------------------------------------------------------------ no local paths


def test_no_written_file_holds_an_absolute_local_path(tmp_path, tiny_checkpoint):
    """A recipe with a relative model path and a neurons file whose side report was given as an absolute path (as
    `bakeedit locate` records it): nothing of the machine's paths reaches the folder, after apply, eval and card.
    The base is recorded relative to the folder, so verify finds it from any working directory, and asks for
    --base once it has moved."""
    tiny_checkpoint("llama")  # tmp_path / base-llama
    neurons = {"method": "explicit", "params": {"report": str(tmp_path / "found.report.json"), "seed": 1},
               "neurons": [{"layer": 0, "site": "mlp.act", "index": 3}, {"layer": 1, "site": "attn.v", "index": 2}]}
    (tmp_path / "found.json").write_text(json.dumps(neurons))
    (tmp_path / "r.yaml").write_text("name: portable\nmodel: base-llama\nedit: {lambda: 2}\nneurons_file: found.json\n")
    out = tmp_path / "out"
    for args in (("apply", "r.yaml", "-o", str(out)), ("eval", str(out), "--tasks", "gender_words", "--limit", "2"),
                 ("card", str(out))):
        ran = run_cli(*args, cwd=tmp_path)
        assert ran.exit_code == 0, ran.output
    local = {str(tmp_path), str(tmp_path.resolve())}
    holding = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()
               and any(s in p.read_bytes().decode("latin-1") for s in local)]
    assert holding == []
    record = json.loads((out / PROVENANCE_FILE).read_text())
    assert record["recipe"]["path"] == "r.yaml" and record["neurons"]["params"]["report"] == "found.report.json"

    assert record["base_model"]["ref"] == "../base-llama"  # relative to the folder: found from anywhere
    assert json.loads((out / "neurons.json").read_text())["params"]["report"] == "found.report.json"

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert run_cli("verify", str(out), cwd=elsewhere).exit_code == 0
    (tmp_path / "base-llama").rename(tmp_path / "moved-base")
    outcome = run_cli("verify", str(out), cwd=elsewhere)
    assert_one_clear_line(outcome, 1, "base_model.ref")
    assert "--base" in outcome.output
    assert run_cli("verify", str(out), "--base", str(tmp_path / "moved-base"), cwd=elsewhere).exit_code == 0



def test_a_folder_baked_for_another_device_is_verified_on_this_one(tmp_path, monkeypatch):
    """The recorded model.device is where apply ran; verify runs here: a cuda:1 record verified on this CPU machine
    loads the base on this machine's device instead of failing on a device it lacks."""
    from baked_folders import bake
    from reliability_harness import run_cli

    import bakeedit.workflows.apply as pipeline
    from bakeedit.export.manifest import check_folder

    folder = bake(tmp_path)
    prov = check_folder(folder)
    prov.recipe.data["model"]["device"] = "cuda:1"  # as a GPU machine records it (the record itself is intact)
    monkeypatch.setattr(pipeline, "check_folder", lambda _folder: prov)
    seen = {}
    real = pipeline.load_model
    monkeypatch.setattr(pipeline, "load_model", lambda spec: seen.setdefault("device", spec.device) and real(spec))
    outcome = run_cli("verify", str(folder))
    assert outcome.exit_code == 0, outcome.output
    assert seen["device"] == "auto"
