"""Issue #10, section 2: what is published is exactly what was verified (the push side).

Through the real CLI (in process), against the strict Hub protocol double of ``tests/hub``: ``push --dry-run`` runs
every check the push runs before sending (the same first line, and the push sends no request); no pickle and no
Python file but the hashed custom module is uploaded; a re-push deletes the shards of an earlier layout in the same
commit; and whatever huggingface_hub raises when an upload fails (its ``RuntimeError("Error while uploading ...")``,
dropped connections, httpx errors, a server without Xet) is one line that says nothing was pushed.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from baked_folders import NONLINEAR, bake
from reliability_harness import assert_one_clear_line, run_cli, snapshot

from bakeedit.export.manifest import check_folder, refresh_manifest

sys.path.insert(0, str(Path(__file__).parents[1] / "hub"))
from hub_double import HubDouble

REPO_ID = "tester/tiny-edit"
TOKEN = "hf_" + "k" * 34
LEAKED = "hf_" + "t" * 34  # a token pasted into a recipe's description


@pytest.fixture(scope="module")
def baked(tmp_path_factory) -> Path:
    return bake(tmp_path_factory.mktemp("publish"), name="tiny-edit")


@pytest.fixture
def folder(baked, tmp_path) -> Path:
    copy = tmp_path / "tiny-edit"
    shutil.copytree(baked, copy)
    return copy


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Iterator[HubDouble]:
    """The double, with huggingface_hub in this process pointed at it (LFS uploads, no Xet, not offline)."""
    from huggingface_hub import constants

    with HubDouble(tmp_path / "hub-storage", TOKEN, max_lifetime=300) as double:
        monkeypatch.setattr(constants, "ENDPOINT", double.url)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        yield double
    assert double.rejected == [], "the client made requests the protocol double does not understand"


def assert_one_error_line(outcome, names: str | tuple[str, ...]) -> str:
    """As ``assert_one_clear_line``, for a push that got as far as the Hub: its progress steps come first on
    stderr, so the promise is one ``error:`` line (naming ``names``), exit 1, no traceback. Returns the line."""
    assert outcome.exception is None, f"uncaught {outcome.exception!r}\n{outcome.output}"
    assert outcome.exit_code == 1 and "Traceback" not in outcome.output, outcome.output
    errors = [line for line in outcome.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, outcome.output
    wanted = (names,) if isinstance(names, str) else names
    assert any(name in errors[0] for name in wanted), f"{errors[0]!r} names none of {wanted}"
    return errors[0]


def push(folder: Path, *extra: str, token: str = TOKEN):
    return run_cli("push", str(folder), REPO_ID, *extra, env={"HF_TOKEN": token})


def commits(hub: HubDouble) -> set[str]:
    """The files at main (only ``.gitattributes`` when nothing was pushed)."""
    return set(hub.files(REPO_ID)) if REPO_ID in hub.repos else set()


# ------------------------------------------------------------------------------------------------ dry run = push


def apply_tiny(tmp_path: Path, name: str, header: str = "", extra_files: dict[str, str] | None = None) -> Path:
    """``bakeedit apply`` of a one-neuron recipe on a fresh tiny base (with ``extra_files`` beside its weights)."""
    from tiny_models import save_tiny_checkpoint

    base = tmp_path / f"{name}-base"
    save_tiny_checkpoint("llama", base)
    for file_name, text in (extra_files or {}).items():
        (base / file_name).write_text(text)
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(f"name: {name}\n{header}model: {base}\nedit: {{lambda: 2}}\n"
                      "neurons: [{layer: 0, site: mlp.act, index: 3}]\n")
    out = tmp_path / f"{name}-out"
    ran = run_cli("apply", str(recipe), "-o", str(out))
    assert ran.exit_code == 0, ran.output
    return out


def leaked_token_folder(_folder: Path, tmp_path: Path) -> tuple[Path, str]:
    """A token pasted into the recipe's description: it is in recipe.yaml, bakeedit.json and the card."""
    return apply_tiny(tmp_path, "leaky", header=f"description: my token is {LEAKED}\n"), LEAKED


def listed(name: str, data: bytes) -> Callable[[Path, Path], tuple[Path, str]]:
    """A file of ``name`` that the manifest records (as if bakeedit had written it): only push's own rule refuses."""
    def prepare(folder: Path, _tmp: Path) -> tuple[Path, str]:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
        refresh_manifest(folder, [name])
        return folder, TOKEN
    return prepare


def carried_code(_folder: Path, tmp_path: Path) -> tuple[Path, str]:
    """A base model with a Python file of its own: streaming carries it into the folder (hashed, verifiable)."""
    out = apply_tiny(tmp_path, "code", extra_files={"helper.py": "print('hello')\n"})
    assert (out / "helper.py").is_file() and run_cli("verify", str(out)).exit_code == 0  # valid, yet not published
    return out, TOKEN


def redigest_missing(folder: Path, _tmp: Path) -> tuple[Path, str]:
    import json

    from bakeedit.io.hashing import file_sha256

    shard = folder / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))
    raw = json.loads((folder / "bakeedit.json").read_text())
    raw["files_sha256"]["model.safetensors"] = file_sha256(shard)  # the hash re-recorded, the digest not
    (folder / "bakeedit.json").write_text(json.dumps(raw))
    return folder, TOKEN


PUSH_REFUSALS = [
    ("token-in-the-recipe", leaked_token_folder, ("README.md", "recipe.yaml", "bakeedit.json")),
    ("pickle-bin", listed("pytorch_model.bin", b"\x80\x04K\x01."), ("pytorch_model.bin",)),
    ("pickle-pt", listed("extra.pt", b"\x80\x04K\x01."), ("extra.pt",)),
    ("pickle-pth", listed("extra.pth", b"\x80\x04K\x01."), ("extra.pth",)),
    ("pickle-pkl", listed("state.pkl", b"\x80\x04K\x01."), ("state.pkl",)),
    ("pickle-pickle", listed("state.pickle", b"\x80\x04K\x01."), ("state.pickle",)),
    ("pickle-ckpt", listed("model.ckpt", b"\x80\x04K\x01."), ("model.ckpt",)),
    ("foreign-python", listed("tools/run.py", b"import os\n"), ("tools/run.py",)),
    ("carried-base-code", carried_code, ("helper.py",)),
    ("rehashed-shard-without-digest", redigest_missing, ("manifest_sha256",)),
    ("unlisted-file", lambda f, _t: ((f / "notes.txt").write_text("x"), (f, TOKEN))[1], ("notes.txt",)),
]


@pytest.mark.parametrize(("prepare", "names"), [c[1:] for c in PUSH_REFUSALS], ids=[c[0] for c in PUSH_REFUSALS])
def test_dry_run_refuses_what_the_push_refuses_and_the_push_sends_nothing(folder, tmp_path, hub, prepare, names):
    target, token = prepare(folder, tmp_path)
    before = snapshot(target)
    dry = push(target, "--dry-run", token=token)
    assert_one_clear_line(dry, 1, names)
    real = push(target, token=token)
    assert_one_clear_line(real, 1, names)
    assert real.first_line == dry.first_line
    assert hub.requests == [] and snapshot(target) == before
    assert token not in dry.output + real.output


def test_dry_run_refuses_a_repo_id_the_push_refuses(folder, hub):
    for extra in (("--dry-run",), ()):
        outcome = run_cli("push", str(folder), "not a repo id", *extra, env={"HF_TOKEN": TOKEN})
        assert_one_clear_line(outcome, 1, "not a repo id")
    assert hub.requests == []


def test_dry_run_without_a_token_says_what_it_could_not_check(folder, monkeypatch):
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    outcome = run_cli("push", str(folder), REPO_ID, "--dry-run")
    assert outcome.exit_code == 0, outcome.output
    assert "not logged in" in outcome.output and "nothing was sent (dry run)" in outcome.output


# ------------------------------------------------------------------------------------------------ what is uploaded


def test_the_custom_module_is_the_only_code_pushed_and_the_repo_equals_the_folder(tmp_path, hub):
    folder = bake(tmp_path, name="module", edit=NONLINEAR)
    ran = push(folder)
    assert ran.exit_code == 0, ran.output
    stored = hub.files(REPO_ID)
    local = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert {k: v for k, v in stored.items() if k != ".gitattributes"} == local
    code = [name for name in stored if name.endswith((".py", ".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"))]
    assert code == [check_folder(folder).custom_module.module_file]
    assert check_folder(folder).files_sha256["README.md"]  # the card regenerated for the repo id is recorded


def test_a_repush_deletes_the_shards_of_an_earlier_layout_in_the_same_commit(tmp_path, hub):
    from tiny_models import save_tiny_checkpoint

    base = tmp_path / "base"
    save_tiny_checkpoint("llama", base)
    neurons = "neurons: [{layer: 0, site: mlp.act, index: 3}]\n"
    sharded, single = tmp_path / "sharded", tmp_path / "single"
    (tmp_path / "a.yaml").write_text(f"name: a\nmodel: {base}\nedit: {{lambda: 2}}\n{neurons}"
                                     "export: {max_shard_size: 60KB}\n")
    (tmp_path / "b.yaml").write_text(f"name: b\nmodel: {base}\nedit: {{lambda: 3}}\n{neurons}")
    for recipe, out in (("a.yaml", sharded), ("b.yaml", single)):
        ran = run_cli("apply", str(tmp_path / recipe), "-o", str(out))
        assert ran.exit_code == 0, ran.output
    old_shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(old_shards) >= 2 and not (single / "model.safetensors.index.json").exists()

    assert push(sharded).exit_code == 0
    assert set(old_shards) <= commits(hub)
    first_commit = hub.repos[REPO_ID].branches["main"]
    ran = push(single)
    assert ran.exit_code == 0, ran.output
    files = commits(hub)
    assert files == {".gitattributes", *(p.relative_to(single).as_posix() for p in single.rglob("*") if p.is_file())}
    assert not set(old_shards) & files and "model.safetensors.index.json" not in files
    assert len(hub.repos[REPO_ID].commits) == 3  # the initial commit, then one commit per push: no window
    assert hub.repos[REPO_ID].branches["main"] != first_commit and "warning" not in ran.output


# ------------------------------------------------------------------------------------------------ upload failures


def _raising(exc: BaseException) -> Callable:
    def upload_folder(*_args, **_kwargs):
        raise exc
    return upload_folder


def _wrapped(message: str, cause: BaseException) -> RuntimeError:
    try:
        raise RuntimeError(message) from cause
    except RuntimeError as exc:
        return exc


def _upload_failures() -> list[tuple[str, Callable[[], BaseException], tuple[str, ...], str | None]]:
    import httpx2

    return [
        ("lfs-put-dropped", lambda: _wrapped("Error while uploading 'model.safetensors' to the Hub.",
                                             httpx2.RemoteProtocolError("Server disconnected without a response")),
         ("model.safetensors",), None),
        ("connection-refused", lambda: httpx2.ConnectError("[Errno 111] Connection refused"), ("could not reach",),
         None),
        ("read-timeout", lambda: httpx2.ReadTimeout("The read operation timed out"), ("could not reach",), None),
        ("reset-by-peer", lambda: ConnectionResetError(104, "Connection reset by peer"), ("could not reach",), None),
        ("no-xet-on-the-server", lambda: ConnectionError(
            "Network error: Request error: HTTP status client error (404 Not Found), domain: "
            "http://127.0.0.1:1/api/models/tester/tiny-edit/xet-write-token/main"),
         ("does not support Xet",), "could not reach"),
        ("xet-data-error", lambda: RuntimeError("Data processing error: CAS service error : connection closed"),
         ("the upload failed",), None),
    ]


UPLOAD_FAILURES = [c[0] for c in _upload_failures()]


@pytest.mark.parametrize("case", UPLOAD_FAILURES)
def test_an_upload_failure_is_one_line_saying_nothing_was_pushed(folder, hub, monkeypatch, case):
    from huggingface_hub import HfApi

    _, make, names, never = next(c for c in _upload_failures() if c[0] == case)
    monkeypatch.setattr(HfApi, "upload_folder", _raising(make()))
    outcome = push(folder)
    line = assert_one_error_line(outcome, names)
    assert "nothing was pushed" in line
    assert never is None or never not in outcome.output
    assert commits(hub) == {".gitattributes"} and outcome.stdout == ""
    check_folder(folder)  # the card regenerated for the push is recorded: the folder is still valid


def test_an_lfs_upload_refused_by_the_storage_is_one_line(folder, hub):
    hub.fail_next("lfs_put", 403, times=2)  # the shard and the heat map
    outcome = push(folder)
    line = assert_one_error_line(outcome, ("model.safetensors", "neurons_heatmap.png"))
    assert "Error while uploading" in line and "nothing was pushed" in line
    assert "HTTP 403" in line and commits(hub) == {".gitattributes"}


def test_a_server_without_xet_is_not_reported_as_unreachable(folder, hub, monkeypatch):
    """With hf_xet installed and not disabled, huggingface_hub asks the server for a Xet token first; the double
    answers 404 there, as a server without Xet does."""
    from huggingface_hub import constants

    pytest.importorskip("hf_xet")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    outcome = push(folder)
    line = assert_one_error_line(outcome, "does not support Xet")
    assert "nothing was pushed" in line and "could not reach" not in outcome.output
    assert "HF_HUB_DISABLE_XET=1" in outcome.output and commits(hub) == {".gitattributes"}
