"""``-o`` and ``--overwrite`` replace only what bakeedit wrote (issue #10), through the real CLI.

Every case checks the exit code, that the first stderr line names the field or file, that no traceback was
printed, and the file system afterwards: a snapshot of the parent before and after (user files untouched, the old
output byte-identical or the new one complete, no stray hidden temporaries or lock files).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from reliability_harness import (
    Workspace,
    assert_one_clear_line,
    hidden_entries,
    make_workspace,
    run_cli,
    save_base,
    snapshot,
)

from bakeedit.export.manifest import check_file_hashes
from bakeedit.export.provenance import read_provenance
from bakeedit.io import ownership, staging, temporaries
from bakeedit.models.embedded import cache_root


@pytest.fixture(scope="module")
def templates(tmp_path_factory) -> dict[str, Path]:
    """Made once: a tiny base checkpoint, and a complete bakeedit apply output of it."""
    root = tmp_path_factory.mktemp("templates")
    base = save_base(root / "base")
    ws = make_workspace(root / "ws", base)
    result = run_cli("apply", str(ws.recipe), "-o", str(root / "baked"), "--no-eval")
    assert result.exit_code == 0, result.output
    return {"base": base, "baked": root / "baked"}


@pytest.fixture
def ws(tmp_path, templates, monkeypatch) -> Workspace:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return make_workspace(tmp_path, templates["base"])


@pytest.fixture
def no_model_load(monkeypatch):
    """A refusal must come before any model is loaded: loading is a test failure (exit 3, 'unexpected ...')."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("a model was loaded before -o was checked")

    for target in ("bakeedit.workflows.apply.load_model", "bakeedit.workflows.sweep.load_model",
                   "bakeedit.cli.locate.load_model", "bakeedit.cli.eval._load"):
        monkeypatch.setattr(target, refuse)


# --- -o that would destroy a folder the run reads, or the user's own -----------------------------------------------

def _gguf_recipe(ws: Workspace) -> str:
    (ws.root / "gguf").mkdir()
    (ws.root / "gguf" / "m.gguf").write_bytes(b"GGUF")
    return str(ws.write_recipe("g.yaml", model=str(ws.root / "gguf" / "m.gguf")))


PROTECTED = [
    # id, command, recipe (ws -> path), -o (ws -> text), extra args, what the first line must say
    ("dot-with-notes", "apply", lambda ws: str(ws.recipe), lambda ws: ".", ["--overwrite"],
     "is the current directory"),
    ("empty", "apply", lambda ws: str(ws.recipe), lambda ws: "", ["--overwrite"], "-o"),
    ("base-folder", "apply", lambda ws: str(ws.recipe), lambda ws: str(ws.base), ["--overwrite"],
     "is the base model's folder"),
    ("inside-base", "apply", lambda ws: str(ws.recipe), lambda ws: str(ws.base / "edited"), [],
     "is inside the base model's folder"),
    ("above-base", "apply", lambda ws: str(ws.recipe), lambda ws: str(ws.base.parent), ["--overwrite"],
     "contains the base model's folder"),
    ("relative-model-path", "apply", lambda ws: str(ws.write_recipe("rel.yaml", model="../models/base")),
     lambda ws: "../models/base", ["--overwrite"], "is the base model's folder"),
    ("gguf-folder", "apply", _gguf_recipe, lambda ws: str(ws.root / "gguf"), ["--overwrite"],
     "is the folder of the model's .gguf file"),
    ("recipe-folder", "apply", lambda ws: str(ws.recipe), lambda ws: str(ws.recipes), ["--overwrite"],
     "is the recipe's folder"),
    ("neurons-file-folder", "apply",
     lambda ws: str(ws.write_recipe("n.yaml", body=f"neurons_file: {ws.neurons}\n")),
     lambda ws: str(ws.neurons.parent), ["--overwrite"], "is the neurons_file's folder"),
    ("home", "apply", lambda ws: str(ws.recipe), lambda ws: str(ws.home), ["--overwrite"], "is your home folder"),
    ("above-home", "apply", lambda ws: str(ws.recipe), lambda ws: str(ws.root), ["--overwrite"], "contains"),
    ("root", "apply", lambda ws: str(ws.recipe), lambda ws: "/", ["--overwrite"], "is the root folder"),
    ("inside-cache", "apply", lambda ws: str(ws.recipe), lambda ws: str(cache_root() / "edited"), [],
     "is inside bakeedit's cache"),
    ("sweep-recipe-folder", "sweep", lambda ws: str(ws.recipe), lambda ws: str(ws.recipes),
     ["--overwrite", "--lambda", "0,1", "--tasks", "bias"], "is the recipe's folder"),
    ("sweep-dot", "sweep", lambda ws: str(ws.recipe), lambda ws: ".", ["--lambda", "0,1", "--tasks", "bias"],
     "is the current directory"),
]


@pytest.mark.parametrize(("case", "command", "recipe", "out", "extra", "says"), PROTECTED,
                         ids=[c[0] for c in PROTECTED])
def test_o_may_not_destroy_what_the_run_reads(ws, no_model_load, case, command, recipe, out, extra, says):
    recipe_path = recipe(ws)
    before = snapshot(ws.root)
    result = run_cli(command, recipe_path, "-o", out(ws), *extra, cwd=ws.work)
    assert_one_clear_line(result, 1, "-o")
    assert says in result.first_line, result.output
    assert snapshot(ws.root) == before  # nothing created, moved or deleted, the user's notes included


def test_a_streamed_bake_refuses_the_base_folder(ws):
    from bakeedit.edit.plan import EditPlan
    from bakeedit.errors import OutputPathError
    from bakeedit.export.stream import bake_checkpoint

    before = snapshot(ws.root)
    for out in (ws.base, ws.base / "baked", ws.base.parent):
        with pytest.raises(OutputPathError, match="base model's folder"):
            bake_checkpoint(ws.base, EditPlan(), out, overwrite=True)
    assert snapshot(ws.root) == before


# --- --overwrite replaces only a folder bakeedit wrote -----------------------------------------------------------

def _user_folder(out: Path, baked: Path) -> None:
    (out / "data").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    (out / "data" / "a.csv").write_text("1,2\n")


def _fake_marker(out: Path, baked: Path) -> None:
    out.mkdir()
    (out / "bakeedit.json").write_text(json.dumps({"hello": "not bakeedit's"}))
    (out / "notes.txt").write_text("mine")


def _broken_marker(out: Path, baked: Path) -> None:
    out.mkdir()
    (out / "bakeedit.json").write_text("{ not json")


def _plus(*names: str):
    def setup(out: Path, baked: Path) -> None:
        shutil.copytree(baked, out)
        for name in names:
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_text("the user's, not bakeedit's")
    return setup


def _sweep_plus_notes(out: Path, baked: Path) -> None:
    out.mkdir()
    (out / "sweep.json").write_text(json.dumps({"bakeedit_version": "0", "format_version": 1, "kind": "sweep"}))
    (out / "sweep.md").write_text("# Lambda sweep\n")
    (out / "notes.md").write_text("mine")


def _a_file(out: Path, baked: Path) -> None:
    out.write_text("a file, not a folder")


NOT_OURS = [
    ("user-folder", _user_folder, "is not a bakeedit output"),
    ("marker-without-bakeedit-keys", _fake_marker, "is not a bakeedit output"),
    ("unreadable-marker", _broken_marker, "is not a bakeedit output"),
    ("bakeedit-output-plus-user-file", _plus("notes.md"), "notes.md"),
    ("bakeedit-output-plus-user-folder", _plus("mydata/x.bin", "mydata/y.bin"), "mydata/"),
    ("user-file-in-eval", _plus("eval/notes.txt"), "eval/notes.txt"),
    ("user-txt-beside-carried-files", _plus("todo.txt"), "todo.txt"),
    ("sweep-folder-plus-user-file", _sweep_plus_notes, "notes.md"),
    ("output-is-a-file", _a_file, "is not a folder"),
]


@pytest.mark.parametrize(("case", "setup", "says"), NOT_OURS, ids=[c[0] for c in NOT_OURS])
def test_overwrite_refuses_what_bakeedit_did_not_write(ws, templates, no_model_load, case, setup, says):
    out = ws.outs / "out"
    setup(out, templates["baked"])
    before = snapshot(ws.outs)
    result = run_cli("apply", str(ws.recipe), "-o", str(out), "--overwrite", cwd=ws.work)
    assert_one_clear_line(result, 1, str(out))
    assert says in result.first_line, result.output
    assert snapshot(ws.outs) == before  # nothing touched, no temporaries, no lock file


def _dead_temporary_inside(out: Path, baked: Path) -> None:
    shutil.copytree(baked, out)
    (out / ".README.md.tmp-999999999").write_text("half a card of a killed run")


REPLACEABLE = [
    ("bakeedit-output", lambda out, baked: shutil.copytree(baked, out)),
    ("empty-folder", lambda out, baked: out.mkdir()),
    ("bakeedit-output-with-a-dead-run's-temporary", _dead_temporary_inside),
]


@pytest.mark.parametrize(("case", "setup"), REPLACEABLE, ids=[c[0] for c in REPLACEABLE])
def test_overwrite_replaces_a_bakeedit_output_completely(ws, templates, case, setup):
    out = ws.outs / "out"
    setup(out, templates["baked"])
    recipe = ws.write_recipe("new.yaml", lam=3.0)
    result = run_cli("apply", str(recipe), "-o", str(out), "--overwrite", "--no-eval", cwd=ws.work)
    assert result.exit_code == 0, result.output
    prov = read_provenance(out)
    assert prov.recipe.text == recipe.read_text()  # the new output, not the old one
    assert check_file_hashes(out, prov) == []  # complete: every recorded file there, byte for byte
    assert sorted(snapshot(out)) == sorted(snapshot(templates["baked"]))  # every file of an apply output, no other
    assert set(snapshot(ws.outs)) == {"out"} | {f"out/{name}" for name in snapshot(out)}
    assert hidden_entries(ws.outs) == []
    assert ownership.why_not_replaceable(out) is None  # and it can be replaced again


def test_without_overwrite_an_existing_output_is_kept(ws, templates):
    out = ws.outs / "out"
    shutil.copytree(templates["baked"], out)
    before = snapshot(ws.outs)
    result = run_cli("apply", str(ws.recipe), "-o", str(out), cwd=ws.work)
    assert_one_clear_line(result, 1, str(out))
    assert "already exists" in result.first_line and "--overwrite" in result.output
    assert snapshot(ws.outs) == before


def test_the_recognised_names_follow_their_writers():
    """staging keeps literal copies of the writers' file names (importing them would be circular): keep in step."""
    from bakeedit.export.card import CARD_FILE, HEATMAP_FILE
    from bakeedit.export.provenance import PROVENANCE_FILE
    from bakeedit.export.save import LICENSE_FILES
    from bakeedit.workflows.apply import NEURONS_FILE, RECIPE_FILE
    from bakeedit.workflows.apply_eval import CONTROL_NEURONS_FILE

    assert {CONTROL_NEURONS_FILE, CARD_FILE, HEATMAP_FILE, PROVENANCE_FILE, NEURONS_FILE,
            RECIPE_FILE} <= ownership.CHECKPOINT_NAMES
    assert set(LICENSE_FILES) <= ownership.CARRIED_NAMES
    assert ownership.PROVENANCE_MARKER == PROVENANCE_FILE


# --- the swap: never the only copy in a hidden folder ---------------------------------------------------------

def _failing_rename(monkeypatch, out: Path, also_undo: bool) -> None:
    real = os.rename

    def rename(src, dst, *args, **kwargs):
        src, dst = Path(src), Path(dst)
        if dst == out and (src.name.startswith(f".{out.name}.tmp-") or (also_undo and ".old-" in src.name)):
            raise OSError(errno.EIO, "injected rename failure", str(src))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", rename)


def test_a_failing_second_rename_puts_the_old_output_back(ws, templates, monkeypatch):
    out = ws.outs / "out"
    shutil.copytree(templates["baked"], out)
    before = snapshot(ws.outs)
    _failing_rename(monkeypatch, out, also_undo=False)
    result = run_cli("apply", str(ws.write_recipe("new.yaml", lam=3.0)), "-o", str(out), "--overwrite",
                     "--no-eval", cwd=ws.work)
    assert_one_clear_line(result, 1, "injected rename failure")
    assert snapshot(ws.outs) == before  # the old output in place, byte for byte; the new temporary removed


def test_when_even_the_undo_fails_the_message_says_where_the_old_output_is(ws, templates, monkeypatch):
    out = ws.outs / "out"
    shutil.copytree(templates["baked"], out)
    old_files = snapshot(out)
    real_rename = os.rename
    _failing_rename(monkeypatch, out, also_undo=True)
    result = run_cli("apply", str(ws.write_recipe("new.yaml", lam=3.0)), "-o", str(out), "--overwrite",
                     "--no-eval", cwd=ws.work)
    assert_one_clear_line(result, 1, str(out))
    [old] = hidden_entries(ws.outs)
    assert old.startswith(".out.old-") and old in result.first_line
    assert snapshot(ws.outs / old) == old_files  # the previous output, intact, and named in the message
    monkeypatch.setattr(os, "rename", real_rename)
    # The owner (this process) is alive, so only a run whose owner is gone may put it back: pretend it died.
    dead = ws.outs / ".out.old-999999999-abcd"
    (ws.outs / old).rename(dead)
    result = run_cli("apply", str(ws.recipe), "-o", str(out), "--no-eval", cwd=ws.work)
    assert_one_clear_line(result, 1, "already exists")  # it was put back first, so it exists
    assert snapshot(out) == old_files and hidden_entries(ws.outs) == []


# --- the sweep of a killed run's leftovers ---------------------------------------------------------------------

def test_stale_sweep_keeps_live_temporaries_and_restores_an_orphaned_old(ws, templates):
    out = ws.outs / "out"
    me, token = os.getpid(), temporaries.process_token(os.getpid())
    live = ws.outs / (f".out.tmp-{me}-t{token}-aaaa" if token else f".out.tmp-{me}-aaaa")
    live.mkdir()
    (live / "model.safetensors").write_bytes(b"a live run's shard")
    orphan_old = ws.outs / ".out.old-999999999-dddd"  # killed between its two renames: the only copy
    shutil.copytree(templates["baked"], orphan_old)
    dead_tmp = ws.outs / ".out.tmp-999999999-cccc"
    dead_tmp.mkdir()
    (dead_tmp / "model.safetensors").write_bytes(b"half")
    stale = [dead_tmp]
    if token:  # a live pid with another start time: the pid was reused, the owner is gone
        reused = ws.outs / f".out.tmp-{me}-tdeadbeef0-bbbb"
        reused.mkdir()
        stale.append(reused)
    previous = snapshot(orphan_old)

    result = run_cli("apply", str(ws.recipe), "-o", str(out), "--no-eval", cwd=ws.work)
    assert_one_clear_line(result, 1, "already exists")  # the orphan is the output again, so it is not replaced
    assert snapshot(out) == previous
    assert hidden_entries(ws.outs) == [live.name]
    assert not any(p.exists() for p in stale)

    result = run_cli("apply", str(ws.write_recipe("new.yaml", lam=3.0)), "-o", str(out), "--overwrite",
                     "--no-eval", cwd=ws.work)
    assert result.exit_code == 0, result.output
    assert check_file_hashes(out, read_provenance(out)) == []
    assert hidden_entries(ws.outs) == [live.name]  # still not ours to delete: its owner runs


# --- a concurrent writer ------------------------------------------------------------------------------------------

def _other_user_folder(out: Path, baked: Path) -> None:
    out.mkdir()
    (out / "theirs.txt").write_text("written by someone else meanwhile")


RACES = [
    ("user-folder-no-overwrite", _other_user_folder, [], "already exists"),
    ("user-folder-overwrite", _other_user_folder, ["--overwrite"], "is not a bakeedit output"),
    ("other-apply-no-overwrite", lambda out, baked: shutil.copytree(baked, out), [], "already exists"),
]


@pytest.mark.parametrize(("case", "other", "extra", "says"), RACES, ids=[c[0] for c in RACES])
def test_a_concurrent_writer_makes_the_losing_run_leave_nothing(ws, templates, monkeypatch, case, other, extra,
                                                                 says):
    """Another run creates OUT after this one staged its folder and before the swap: the re-check under the lock
    refuses, and the staged copy is removed (before, the loser left a complete hidden checkpoint)."""
    out = ws.outs / "out"
    real = staging.fsync_tree

    def other_writer_first(folder):
        other(out, templates["baked"])
        return real(folder)

    monkeypatch.setattr(staging, "fsync_tree", other_writer_first)
    result = run_cli("apply", str(ws.recipe), "-o", str(out), "--no-eval", *extra, cwd=ws.work)
    assert_one_clear_line(result, 1, str(out))
    assert says in result.first_line
    expected = ws.root / "expected"
    other(expected, templates["baked"])
    assert snapshot(out) == snapshot(expected)  # the winner's output untouched
    assert hidden_entries(ws.outs) == []  # no staged copy, no lock file


def test_the_output_lock_excludes_another_process(tmp_path):
    out = tmp_path / "out"
    probe = ("import fcntl, os, sys\nfd = os.open(sys.argv[1], os.O_RDWR)\n"
             "try:\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept BlockingIOError:\n    sys.exit(7)\n")
    with staging.output_lock(out):
        lock = tmp_path / ".out.lock"
        assert subprocess.run([sys.executable, "-c", probe, str(lock)]).returncode == 7
    assert hidden_entries(tmp_path) == []  # released and removed


# --- permissions --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002], ids=["022", "027", "002"])
def test_output_folders_follow_the_umask(ws, umask):
    out = ws.outs / "out"
    old = os.umask(umask)
    try:
        result = run_cli("apply", str(ws.recipe), "-o", str(out), "--no-eval", cwd=ws.work)
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    folders = [out, *(p for p in out.rglob("*") if p.is_dir())]
    assert {oct(p.stat().st_mode & 0o777) for p in folders} == {oct(0o777 & ~umask)}  # not mkdtemp's 0700
    written = [out / name for name in ("bakeedit.json", "README.md", "neurons.json", "model.safetensors")]
    assert {oct(p.stat().st_mode & 0o777) for p in written} == {oct(0o666 & ~umask)}


# --- single-file outputs: locate -o FILE, eval -o FOLDER/results.json --------------------------------------------

def _locate_recipe(ws: Workspace) -> Path:
    return ws.write_recipe("loc.yaml", body=f"locate: {{method: random, reference: {ws.neurons}, seed: 3}}\n")


def _user_json(ws: Workspace) -> str:
    (ws.outs / "mine.json").write_text('{"a user": "file"}\n')
    return str(ws.outs / "mine.json")


def _existing_neurons(ws: Workspace) -> str:
    shutil.copy(ws.neurons, ws.outs / "neurons.json")
    return str(ws.outs / "neurons.json")


def _user_png(ws: Workspace) -> str:
    (ws.outs / "found.png").write_bytes(b"a user's picture")
    return str(ws.outs / "found.json")


def _user_results(ws: Workspace) -> str:
    (ws.outs / "ev").mkdir()
    (ws.outs / "ev" / "results.json").write_text('{"mine": true}\n')
    return str(ws.outs / "ev")


def _a_results_file(ws: Workspace) -> str:
    (ws.outs / "ev").write_text("a file")
    return str(ws.outs / "ev")


FILE_OUTPUTS = [
    ("locate-user-json-overwrite", "locate", _user_json, ["--overwrite"], "is not a neurons file written by bakeedit"),
    ("locate-onto-its-recipe", "locate", lambda ws: str(ws.recipes / "loc.yaml"), ["--overwrite"],
     "is not a neurons file written by bakeedit"),
    ("locate-empty", "locate", lambda ws: "", [], "is a folder"),  # click makes '' the current directory
    ("locate-existing-no-overwrite", "locate", _existing_neurons, [], "already exists"),
    ("locate-user-png-in-the-way", "locate", _user_png, [], "found.png"),
    ("eval-user-results-overwrite", "eval", _user_results, ["--overwrite"],
     "is not a results file written by bakeedit"),
    ("eval-output-is-a-file", "eval", _a_results_file, [], "is not a folder"),
]


@pytest.mark.parametrize(("case", "command", "out", "extra", "says"), FILE_OUTPUTS, ids=[c[0] for c in FILE_OUTPUTS])
def test_single_file_outputs_replace_only_bakeedit_files(ws, no_model_load, case, command, out, extra, says):
    target = _locate_recipe(ws) if command == "locate" else ws.base
    where = out(ws)
    before = snapshot(ws.root)
    result = run_cli(command, str(target), "-o", where, *extra, cwd=ws.work)
    assert_one_clear_line(result, 1, (where, "-o") if where else "-o")
    assert says in result.first_line, result.output
    assert snapshot(ws.root) == before


def test_locate_replaces_its_own_neurons_file_atomically(ws):
    from bakeedit.neurons import NeuronSet

    out = _existing_neurons(ws)
    result = run_cli("locate", str(_locate_recipe(ws)), "-o", out, "--overwrite", cwd=ws.work)
    assert result.exit_code == 0, result.output
    assert NeuronSet.load(Path(out)).method == "random"
    assert hidden_entries(ws.outs) == []


def test_eval_files_appear_complete_or_not_at_all(tmp_path):
    """``staged_into``: an error half-way leaves the folder as it was; success moves every file, the marker last."""
    folder = tmp_path / "eval"
    folder.mkdir()
    (folder / "keep.md").write_text("the user's")
    before = snapshot(tmp_path)
    with pytest.raises(RuntimeError), staging.staged_into(folder, "results.json", False, ownership.is_results_file,
                                                          "results file") as tmp:
        (tmp / "report.md").write_text("half")
        raise RuntimeError("disk full, say")
    assert snapshot(tmp_path) == before
    with staging.staged_into(folder, "results.json", False, ownership.is_results_file, "results file") as tmp:
        (tmp / "plots").mkdir()
        (tmp / "plots" / "a.png").write_bytes(b"png")
        (tmp / "report.md").write_text("report")
        (tmp / "results.json").write_text(json.dumps({"bakeedit_version": "x", "format_version": 1,
                                                      "results": {}}))
    assert sorted(snapshot(folder)) == ["keep.md", "plots", "plots/a.png", "report.md", "results.json"]
    assert hidden_entries(folder) == []
