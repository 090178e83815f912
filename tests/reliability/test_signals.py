"""Interrupts leave nothing half-written (issue #10): real ``bakeedit apply`` processes signalled mid-save.

Each child runs the real CLI entry point with ``bakeedit.export.stream._write_shard`` wrapped: after the first shard is
on disk it writes one byte to a pipe and blocks reading another, so the parent signals it exactly mid-save; no
sleeping, no polling. SIGINT, SIGTERM and SIGHUP unwind (the staged folder is removed) and exit 128 + signal with
one line and no traceback; SIGKILL, which no process can react to, leaves one hidden temporary that the next run
to the same parent removes. An interrupted ``--overwrite`` leaves the previous output byte-identical.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from reliability_harness import (
    Workspace,
    assert_one_clear_line,
    hidden_entries,
    make_workspace,
    message_lines,
    run_cli,
    save_base,
    snapshot,
    spawn_held,
)

from bakeedit.export.manifest import check_file_hashes
from bakeedit.export.provenance import read_provenance
from bakeedit.io import ownership, staging

UNWINDING = [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)]


@pytest.fixture(scope="module")
def sharded_base(tmp_path_factory) -> Path:
    """The tiny float32 llama in several shards, so 'after the first shard' is mid-save."""
    base = save_base(tmp_path_factory.mktemp("base") / "base", shard="40KB")
    assert len(list(base.glob("*.safetensors"))) > 1
    return base


@pytest.fixture
def ws(tmp_path, sharded_base, monkeypatch) -> Workspace:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return make_workspace(tmp_path, sharded_base)


def _interrupt(ws: Workspace, sig: int, *extra: str) -> tuple[int, str]:
    held = spawn_held("apply", str(ws.recipe), "-o", str(ws.outs / "out"), "--no-eval", *extra, cwd=ws.work)
    held.wait_held()
    assert any(p.name.startswith(".out.tmp-") for p in ws.outs.iterdir())  # it really is mid-save
    held.proc.send_signal(sig)
    return held.finish()


def _assert_reported(code: int, err: str, sig: int, expected: int) -> None:
    assert code == expected, err
    assert "Traceback" not in err, err
    lines = message_lines(err)  # the steps' plain progress lines (stderr is a pipe) may come first
    assert lines and lines[0] == f"error: interrupted by {signal.Signals(sig).name}", err


@pytest.mark.parametrize(("sig", "expected"), UNWINDING, ids=[s.name for s, _ in UNWINDING])
def test_an_interrupted_apply_leaves_nothing(ws, sig, expected):
    code, err = _interrupt(ws, sig)
    _assert_reported(code, err, sig, expected)
    assert snapshot(ws.outs) == {}  # no output, no hidden temporary, no lock file


def test_a_killed_apply_leaves_one_temporary_that_the_next_run_removes(ws):
    code, err = _interrupt(ws, signal.SIGKILL)
    assert code == -signal.SIGKILL, err
    [left] = hidden_entries(ws.outs)
    assert left.startswith(".out.tmp-") and not (ws.outs / "out").exists()
    result = run_cli("apply", str(ws.recipe), "-o", str(ws.outs / "out"), "--no-eval", cwd=ws.work)
    assert result.exit_code == 0, result.output
    assert hidden_entries(ws.outs) == []
    assert check_file_hashes(ws.outs / "out", read_provenance(ws.outs / "out")) == []


@pytest.mark.parametrize(("sig", "expected"), [*UNWINDING, (signal.SIGKILL, -signal.SIGKILL)],
                         ids=[*(s.name for s, _ in UNWINDING), "SIGKILL"])
def test_an_interrupted_overwrite_keeps_the_previous_output(ws, sig, expected):
    out = ws.outs / "out"
    first = run_cli("apply", str(ws.recipe), "-o", str(out), "--no-eval", cwd=ws.work)
    assert first.exit_code == 0, first.output
    previous = snapshot(out)
    ws.write_recipe(lam=3.0)  # the second run would write different weights
    code, err = _interrupt(ws, sig, "--overwrite")
    if sig == signal.SIGKILL:
        assert code == expected, err
        [left] = hidden_entries(ws.outs)  # only the staged copy, which the next run removes; never a .old
        assert left.startswith(".out.tmp-")
    else:
        _assert_reported(code, err, sig, expected)
        assert hidden_entries(ws.outs) == []
    assert snapshot(out) == previous  # byte for byte


def test_a_signal_during_the_swap_waits_until_the_swap_is_done(ws, monkeypatch):
    """The renames run with interrupts deferred: Ctrl-C between them can neither leave the new output half in place
    nor the old one only in a hidden folder. The interrupt is still reported (exit 130) once the swap is done."""
    out = ws.outs / "out"
    assert run_cli("apply", str(ws.recipe), "-o", str(out), "--no-eval", cwd=ws.work).exit_code == 0
    real = staging._swap
    seen = []

    def interrupted_swap(tmp, target):
        os.kill(os.getpid(), signal.SIGINT)  # arrives between the check and the renames
        seen.append(True)
        return real(tmp, target)

    monkeypatch.setattr(staging, "_swap", interrupted_swap)
    recipe = ws.write_recipe("new.yaml", lam=3.0)
    result = run_cli("apply", str(recipe), "-o", str(out), "--overwrite", "--no-eval", cwd=ws.work)
    assert seen and result.exit_code == 130, result.output
    assert read_provenance(out).recipe.text == recipe.read_text()  # the swap completed
    assert check_file_hashes(out, read_provenance(out)) == []
    assert hidden_entries(ws.outs) == []


# --- files written outside staging -------------------------------------------------------------------------------

CACHE_FAILURES = [("interrupt", KeyboardInterrupt), ("disk-full", OSError)]


@pytest.mark.parametrize(("case", "error"), CACHE_FAILURES, ids=[c[0] for c in CACHE_FAILURES])
def test_a_locate_cache_entry_is_complete_or_absent(tmp_path, monkeypatch, case, error):
    from bakeedit.locate import cache as cache_module

    cache = cache_module.ItemCache(tmp_path, {"model": "m"})
    assert cache.folder is not None
    before = snapshot(tmp_path)

    def half_written(tensors, path):
        Path(path).write_bytes(b"half a safetensors file")
        raise error("stopped mid-write")

    monkeypatch.setattr(cache_module, "save_file", half_written)
    with pytest.raises(error):
        cache.put("item", {"x": torch.ones(3)})
    assert snapshot(tmp_path) == before and cache.get("item") is None


def test_a_killed_locate_runs_cache_temporary_is_removed_on_the_next_open(tmp_path):
    from bakeedit.locate.cache import ItemCache

    folder = ItemCache(tmp_path, {"model": "m"}).folder
    assert folder is not None
    dead = folder / "0123abcd.safetensors.tmp-999999999"
    dead.write_bytes(b"half")
    me = os.getpid()
    live = folder / f"4567ef.safetensors.tmp-{me}"
    live.write_bytes(b"being written by a live run")
    ItemCache(tmp_path, {"model": "m"})
    assert not dead.exists() and live.exists()


def test_an_interrupted_locate_output_leaves_nothing(tmp_path, monkeypatch):
    """``staged_file`` (``locate -o neurons.json``): an interrupt while writing removes the temporary and keeps the
    previous file byte-identical."""
    from bakeedit.neurons import Neuron, NeuronSet

    out = tmp_path / "neurons.json"
    NeuronSet(method="explicit", neurons=[Neuron(layer=0, site="attn.q", index=1)]).save(out)
    before = snapshot(tmp_path)
    staged = staging.staged_file(out, True, ownership.is_neurons_file, "neurons file")
    with pytest.raises(KeyboardInterrupt), staged as tmp:
        tmp.write_text('{"half": ')
        raise KeyboardInterrupt
    assert snapshot(tmp_path) == before


def test_the_interrupt_line_is_one_line_through_the_cli(ws, monkeypatch):
    """In process: a KeyboardInterrupt inside the save exits 130 with one line, and leaves nothing."""
    from bakeedit.export import stream

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(stream, "_write_shard", interrupted)
    result = run_cli("apply", str(ws.recipe), "-o", str(ws.outs / "out"), "--no-eval", cwd=ws.work)
    assert_one_clear_line(result, 130, "interrupted by SIGINT")
    assert snapshot(ws.outs) == {}
