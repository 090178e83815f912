"""Push side: ``bakeedit push`` through huggingface_hub's real client against the protocol double, then
``from_pretrained(REPO_ID)`` back; and every way a push must fail: a 500 on commit, a wrong token, a tampered shard."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from hub_clients import bakeedit, check_remote

from bakeedit.cli import main
from bakeedit.export.hub import PushError, push_folder
from bakeedit.export.manifest import refresh_manifest

REPO_ID = "tester/tiny-edit"


def written_text(*folders: Path) -> str:
    """Every file under ``folders``, decoded leniently, for searching a secret in them."""
    return "".join(p.read_bytes().decode("latin-1") for f in folders for p in f.rglob("*") if p.is_file())


def test_push_then_from_pretrained_round_trips_without_leaking_the_token(baked, hub, token, tmp_path):
    folder = tmp_path / "tiny-edit"
    shutil.copytree(baked, folder)
    ran = bakeedit("push", str(folder), REPO_ID, "--private", "--commit-message", "first release", tmp=tmp_path,
                   endpoint=hub.url, token=token)
    assert ran.returncode == 0, ran.output
    repo = hub.repos[REPO_ID]
    assert repo.private and ran.stdout.strip() == f"{hub.url}/{REPO_ID}/commit/{repo.branches['main']}"
    assert "pushed" in ran.stderr and "matches the local files" in ran.stderr
    stored = hub.files(REPO_ID)
    local = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert {k: v for k, v in stored.items() if k != ".gitattributes"} == local  # README regenerated before upload
    assert f"from_pretrained('{REPO_ID}')" in stored["README.md"].decode()
    assert ("PUT", "/__double/lfs") in {(m, p.rsplit("/", 1)[0]) for m, p in hub.requests}  # the shard went by LFS

    result = check_remote(REPO_ID, folder, tmp_path / "reader", hub.url, token=token)  # private: the reader logs in
    assert result["snapshot_sha256"] == result["local_sha256"]
    assert result["card_data"]["license"] == "unknown" and result["card_data"]["model-index"]
    assert result["same_token_ids"] and result["max_abs_logit_diff"] == 0.0
    assert token not in ran.output + written_text(tmp_path)  # folder, the double's storage, both HF_HOMEs


def test_commit_500_claims_nothing_and_the_same_command_then_succeeds(baked, hub, token, tmp_path):
    folder = tmp_path / "tiny-edit"
    shutil.copytree(baked, folder)
    hub.fail_next("commit", 500)
    command = ("push", str(folder), REPO_ID, "--revision", "v1")
    ran = bakeedit(*command, tmp=tmp_path, endpoint=hub.url, token=token)
    assert ran.returncode == 1
    assert "HTTP 500" in ran.stderr and "nothing was pushed" in ran.stderr
    assert "run the same command again" in ran.stderr
    assert "pushed " not in ran.stderr.replace("nothing was pushed", "") and ran.stdout == ""
    assert set(hub.files(REPO_ID, "v1")) == {".gitattributes"}  # repo and branch created, no commit on them

    again = bakeedit(*command, tmp=tmp_path, endpoint=hub.url, token=token)
    assert again.returncode == 0, again.output
    assert hub.files(REPO_ID, "v1")["model.safetensors"] == (folder / "model.safetensors").read_bytes()
    assert set(hub.files(REPO_ID, "main")) == {".gitattributes"}  # --revision left main alone
    puts = [path for method, path in hub.requests if method == "PUT"]
    assert len(puts) == 2  # the LFS objects sent before the failed commit were not sent again


def test_wrong_token_is_a_clear_401_without_the_token(baked, hub, tmp_path):
    wrong = "hf_wrong_" + "x" * 24
    ran = bakeedit("push", str(baked), REPO_ID, tmp=tmp_path, endpoint=hub.url, token=wrong)
    assert ran.returncode == 1
    assert "rejected the token" in ran.stderr and "HTTP 401" in ran.stderr and "HF_TOKEN" in ran.stderr
    assert wrong not in ran.output and "Traceback" not in ran.output
    assert hub.repos == {}


def test_tampered_shard_is_refused_before_any_request(baked, hub, token, tmp_path, monkeypatch):
    """In-process (no request may be made, so no fresh client is needed), with the client pointed at the double."""
    from huggingface_hub import constants

    folder = tmp_path / "tampered"
    shutil.copytree(baked, folder)
    shard = folder / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # one byte of one weight
    shard.write_bytes(bytes(data))
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", token)
    result = CliRunner().invoke(main, ["push", str(folder), REPO_ID])
    assert result.exit_code == 1
    assert "refusing to push" in result.stderr and "model.safetensors" in result.stderr
    assert hub.requests == []


def test_dry_run_lists_files_and_size_and_sends_nothing(baked):
    result = CliRunner().invoke(main, ["push", str(baked), REPO_ID, "--dry-run"])
    assert result.exit_code == 0, result.output
    files = [p for p in baked.rglob("*") if p.is_file()]
    for name in ("model.safetensors", "bakeedit.json", "README.md", "recipe.yaml", "eval/results.json"):
        assert name in result.stderr
    total = sum(p.stat().st_size for p in files)
    assert total < 1e6 and f"{len(files)} files" in result.stderr and f"{total / 1e3:.1f} kB" in result.stderr
    assert "nothing was sent (dry run)" in result.stderr


def test_push_refuses_offline_mode_and_files_holding_the_token(baked, tmp_path, monkeypatch):
    """In-process: the checks that come before any request (tests run with HF_HUB_OFFLINE=1)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_TOKEN", "hf_" + "s" * 30)
    with pytest.raises(PushError, match="HF_HUB_OFFLINE"):
        push_folder(baked, REPO_ID)
    folder = tmp_path / "leaky"
    shutil.copytree(baked, folder)
    (folder / "notes.txt").write_text("token: hf_" + "s" * 30)
    refresh_manifest(folder, ["notes.txt"])  # listed, as if bakeedit wrote it: only the token check can refuse it
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens; nothing must be sent
    with pytest.raises(PushError, match=r"notes\.txt: this file contains your Hugging Face token") as err:
        push_folder(folder, REPO_ID)
    assert "hf_sss" not in str(err.value) + str(err.value.hint)


def test_files_of_an_earlier_push_that_the_folder_lacks_are_deleted_in_the_same_commit(baked, hub, token, tmp_path,
                                                                                        monkeypatch):
    """In-process through ``push_folder(endpoint=...)``: upload_folder adds and overwrites, so the push asks it to
    delete every other file of the branch in the same commit (deletedFile lines): an old shard cannot stay online."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_TOKEN", token)
    first = tmp_path / "first"
    shutil.copytree(baked, first)
    (first / "old-shard.safetensors").write_bytes(b"not a real shard")
    refresh_manifest(first, ["old-shard.safetensors"])  # recorded, as if an earlier bake had written it
    assert push_folder(first, REPO_ID, endpoint=hub.url).stale == []
    assert "old-shard.safetensors" in hub.files(REPO_ID)
    second = tmp_path / "second"
    shutil.copytree(baked, second)
    result = push_folder(second, REPO_ID, endpoint=hub.url)
    assert result.stale == [] and "old-shard.safetensors" not in hub.files(REPO_ID)
    assert set(hub.files(REPO_ID)) == {".gitattributes", *(p.relative_to(second).as_posix()
                                                            for p in second.rglob("*") if p.is_file())}
    assert result.commit_oid == hub.repos[REPO_ID].branches["main"] and "README.md" in result.checked


def test_a_failure_after_the_commit_does_not_claim_nothing_was_pushed(baked, hub, token, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_TOKEN", token)
    folder = tmp_path / "tiny-edit"
    shutil.copytree(baked, folder)
    # the listing that checks the new commit, after the one that finds the files to delete (5xx would be retried)
    hub.fail_next("tree", 403, after=1)
    with pytest.raises(PushError, match="was made on 'tester/tiny-edit', but checking it failed") as err:
        push_folder(folder, REPO_ID, endpoint=hub.url)
    assert hub.repos[REPO_ID].branches["main"] in str(err.value) and "nothing was pushed" not in str(err.value)


def test_apply_push_publishes_only_a_verified_folder(hub, token, tmp_path):
    from tiny_models import save_tiny_checkpoint

    base = tmp_path / "base"
    save_tiny_checkpoint("llama", base)
    neurons = "neurons: [{layer: 0, site: mlp.act, index: 3}, {layer: 1, site: attn.v, index: 2}]\n"
    good = tmp_path / "good.yaml"
    good.write_text(f"name: pushed\nmodel: {base}\nedit: {{lambda: 2}}\n{neurons}")
    out = tmp_path / "out"
    ran = bakeedit("apply", str(good), "-o", str(out), "--push", REPO_ID, tmp=tmp_path, endpoint=hub.url, token=token)
    assert ran.returncode == 0, ran.output
    assert ran.stdout.strip().splitlines()[-1] == f"{hub.url}/{REPO_ID}/commit/{hub.repos[REPO_ID].branches['main']}"
    stored = hub.files(REPO_ID)
    assert stored["model.safetensors"] == (out / "model.safetensors").read_bytes()
    assert stored["bakeedit.json"] == (out / "bakeedit.json").read_bytes()
    assert token not in ran.output

    # bf16 folding rounds, so a zero tolerance cannot pass: apply fails at verification and nothing is pushed
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"name: unverified\nmodel: {{id: {base}, dtype: bfloat16}}\nedit: {{lambda: 3.3}}\n{neurons}"
                   "verify: {tolerance: 1.0e-12}\n")
    ran = bakeedit("apply", str(bad), "-o", str(tmp_path / "bad-out"), "--push", "tester/unverified", tmp=tmp_path,
                   endpoint=hub.url, token=token)
    assert ran.returncode == 1 and "differs from the runtime edit" in ran.stderr, ran.output
    assert "tester/unverified" not in hub.repos and not (tmp_path / "bad-out").exists()
