"""Every known fault is one clear line (issue #10, section 3), through the real CLI.

Each case damages one thing (a model shard, a config.json, a .gguf, a recipe field, the output's file system) and
checks: exit 1, the first stderr line names the file or the field, no traceback, and the workspace afterwards
(a snapshot before and after: nothing new, nothing changed, no stray hidden temporaries). Recipe faults must also be
refused before any model loads (loading is made a test failure). Tests run as root, so a read-only file system or a
full disk is simulated by raising the ``OSError`` the kernel would raise from the write calls, for paths in one
folder only. A damaged cache (locate entries, a converted GGUF) is the exception to "one error line": it is
reported with a warning, discarded and recomputed, and the run succeeds.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from reliability_harness import Workspace, assert_one_clear_line, hidden_entries, run_cli
from reliability_harness import snapshot as _snapshot

NEURONS_BODY = "neurons:\n  - {layer: 0, site: attn.q, index: 3}\n  - {layer: 2, site: mlp.act, index: 7}\n"




def snapshot(ws: Workspace) -> dict[str, str]:
    return _snapshot(ws.root)


def forbid_model_load(monkeypatch) -> None:
    """A fault the recipe shows must be refused before a model loads: loading fails the test (exit 3)."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("a model was loaded before the recipe was fully checked")

    for target in ("bakeedit.workflows.apply.load_model", "bakeedit.cli.locate.load_model"):
        monkeypatch.setattr(target, refuse)


# --- simulated file-system faults -----------------------------------------------------------------------------

def _inside(path, folder: Path) -> bool:
    try:
        text = os.fsdecode(os.fspath(path))
    except TypeError:
        return False
    return os.path.abspath(text).startswith(str(folder) + os.sep)


def read_only(monkeypatch, folder: Path) -> None:
    """``folder`` behaves as a read-only mount: creating, opening for writing or renaming into it raises EROFS
    naming the path, as the kernel does (a 0o555 folder would not stop root)."""
    def refuse(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(os.fspath(path)))

    real_mkdir, real_open, real_io_open = os.mkdir, os.open, io.open
    real_rename, real_replace = os.rename, os.replace
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def mkdir(path, *args, **kwargs):
        if _inside(path, folder):
            refuse(path)
        return real_mkdir(path, *args, **kwargs)

    def open_fd(path, flags, *args, **kwargs):
        if flags & writing and _inside(path, folder):
            refuse(path)
        return real_open(path, flags, *args, **kwargs)

    def open_file(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and not isinstance(file, int) and _inside(file, folder):
            refuse(file)
        return real_io_open(file, mode, *args, **kwargs)

    def rename(src, dst, *args, **kwargs):
        if _inside(dst, folder):
            refuse(dst)
        return real_rename(src, dst, *args, **kwargs)

    def replace(src, dst, *args, **kwargs):
        if _inside(dst, folder):
            refuse(dst)
        return real_replace(src, dst, *args, **kwargs)

    for owner, name, fake in ((os, "mkdir", mkdir), (os, "open", open_fd), (io, "open", open_file),
                              (builtins, "open", open_file), (os, "rename", rename), (os, "replace", replace)):
        monkeypatch.setattr(owner, name, fake)


def full_disk(monkeypatch, folder: Path) -> None:
    """Writes through a file descriptor of a file in ``folder`` raise ENOSPC *without* a file name, exactly as the
    kernel reports it: naming the file is bakeedit's job."""
    def in_folder(fd: int) -> bool:
        try:
            return os.readlink(f"/proc/self/fd/{fd}").startswith(str(folder) + os.sep)
        except OSError:
            return False

    def fail():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    real_write, real_pwrite = os.write, os.pwrite
    real_cfr = getattr(os, "copy_file_range", None)

    def write(fd, data):
        if in_folder(fd):
            fail()
        return real_write(fd, data)

    def pwrite(fd, data, offset):
        if in_folder(fd):
            fail()
        return real_pwrite(fd, data, offset)

    def copy_file_range(src, dst, *args, **kwargs):
        if in_folder(dst):
            fail()
        return real_cfr(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "pwrite", pwrite)
    if real_cfr is not None:
        monkeypatch.setattr(os, "copy_file_range", copy_file_range)


class _FullFile:
    """An open file on a full disk: buffered writes fail (with no file name, as Python's io reports it)."""

    def __init__(self, real) -> None:
        self._real = real

    def write(self, _data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __enter__(self):
        return self

    def __exit__(self, *_exc) -> bool:
        self._real.close()
        return False

    def __getattr__(self, name):
        return getattr(self._real, name)


def full_disk_for_json(monkeypatch, folder: Path, names: tuple[str, ...]) -> None:
    """Python-level writes of the files called ``names`` (or their hidden temporaries) in ``folder`` fail: the
    shards (written through file descriptors) fit, the small JSON written after verification does not."""
    real_io_open = io.open

    def open_file(file, mode="r", *args, **kwargs):
        handle = real_io_open(file, mode, *args, **kwargs)
        wanted = not isinstance(file, int) and any(n in os.path.basename(os.fspath(file)) for n in names)
        if any(c in mode for c in "wax+") and wanted and _inside(file, folder):
            return _FullFile(handle)
        return handle

    monkeypatch.setattr(io, "open", open_file)
    monkeypatch.setattr(builtins, "open", open_file)


# --- the cases ------------------------------------------------------------------------------------------------

def _damaged_copy(ws: Workspace, name: str, damage: Callable[[Path], None]) -> Path:
    folder = ws.root / "models" / name
    shutil.copytree(ws.base, folder)
    damage(folder)
    return folder


def _truncate_shard(folder: Path) -> None:
    shard = folder / "model.safetensors"
    with open(shard, "r+b") as fh:
        fh.truncate(shard.stat().st_size // 2)


def _huge_header_length(folder: Path) -> None:
    shard = folder / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(b"\xff" * 8 + data[8:])


def _garbage_header(folder: Path) -> None:
    shard = folder / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:24] = b"this is not json"
    shard.write_bytes(bytes(data))


def _malformed_config(folder: Path) -> None:
    (folder / "config.json").write_text('{"model_type": "llama", "hidden_size": 32,\n')


def _damaged_tokenizer(folder: Path) -> None:
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": ')


def _gguf(ws: Workspace, data: bytes) -> Path:
    path = ws.root / "gguf" / "m.gguf"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    return path


@dataclass
class Case:
    """``setup(ws, monkeypatch) -> argv``; ``names``: what the first line must contain (one of them)."""

    id: str
    setup: Callable[[Workspace, pytest.MonkeyPatch], list[str]]
    names: tuple[str, ...]
    before_model: bool = False  # refused before any model loads
    also: tuple[str, ...] = field(default=())  # further words the first line must contain


def _apply(ws: Workspace, model: str | Path, body: str = NEURONS_BODY, extra: str = "", out: str = "edited",
           name: str = "r.yaml") -> list[str]:
    recipe = ws.write_recipe(name, model=str(model), body=body, extra=extra)
    return ["apply", str(recipe), "-o", str(ws.outs / out)]


def _neurons_file_body(ws: Workspace) -> str:
    return f"neurons_file: {ws.neurons}\n"


def _random_locate_recipe(ws: Workspace) -> Path:
    return ws.write_recipe("loc.yaml", body=f"locate: {{method: random, reference: {ws.neurons}, seed: 1}}\n")


def _ro_output(ws, mp):
    read_only(mp, ws.outs)
    return _apply(ws, ws.base)


def _ro_locate_output(ws, mp):
    read_only(mp, ws.outs)
    return ["locate", str(_random_locate_recipe(ws)), "-o", str(ws.outs / "n.json")]


def _parent_is_file(ws, _mp):
    (ws.outs / "afile").write_text("a user's file, not a folder\n")
    return _apply(ws, ws.base, out="afile/edited")


def _full_disk(ws, mp):
    full_disk(mp, ws.outs)
    return _apply(ws, ws.base)


def _full_disk_at_neurons_json(ws, mp):
    full_disk_for_json(mp, ws.outs, ("neurons.json",))
    return _apply(ws, ws.base)


def _full_disk_at_locate_output(ws, mp):
    full_disk_for_json(mp, ws.outs, ("n.json",))
    return ["locate", str(_random_locate_recipe(ws)), "-o", str(ws.outs / "n.json")]


CASES = [
    Case("truncated-shard", lambda ws, _: _apply(ws, _damaged_copy(ws, "trunc", _truncate_shard)),
         ("trunc/model.safetensors",), also=("truncated or corrupt",)),
    Case("corrupt-shard-header-length", lambda ws, _: _apply(ws, _damaged_copy(ws, "bad", _huge_header_length)),
         ("bad/model.safetensors",), also=("truncated or corrupt",)),
    Case("corrupt-shard-header-json", lambda ws, _: _apply(ws, _damaged_copy(ws, "bad", _garbage_header)),
         ("bad/model.safetensors",), also=("truncated or corrupt",)),
    Case("corrupt-shard-neurons-file-recipe",  # no config pre-check on this path: load_model names the shard
         lambda ws, _: _apply(ws, _damaged_copy(ws, "trunc", _truncate_shard), body=_neurons_file_body(ws)),
         ("trunc/model.safetensors",)),
    Case("malformed-config-json", lambda ws, _: _apply(ws, _damaged_copy(ws, "cfg", _malformed_config)),
         ("cfg/config.json",), before_model=True, also=("malformed JSON",)),
    Case("malformed-config-json-at-load",
         lambda ws, _: _apply(ws, _damaged_copy(ws, "cfg", _malformed_config), body=_neurons_file_body(ws)),
         ("cfg/config.json",), also=("malformed JSON",)),
    Case("damaged-tokenizer", lambda ws, _: _apply(ws, _damaged_copy(ws, "tok", _damaged_tokenizer)),
         ("models/tok",), also=("tokenizer",)),
    Case("not-a-gguf", lambda ws, _: _apply(ws, _gguf(ws, b"PK\x03\x04 a zip file, not a model")),
         ("m.gguf",), also=("not a GGUF file",)),
    Case("gguf-corrupt-after-magic",
         lambda ws, _: _apply(ws, _gguf(ws, b"GGUF" + (3).to_bytes(4, "little") + bytes(range(256)) * 4)),
         ("m.gguf",), also=("damaged or unsupported GGUF",)),
    Case("device-tpu", lambda ws, _: _apply(ws, f"{{id: {ws.base}, device: tpu}}"), ("model.device",),
         before_model=True),
    Case("device-missing-cuda", lambda ws, _: _apply(ws, f"{{id: {ws.base}, device: 'cuda:99'}}"),
         ("model.device",), before_model=True),
    Case("device-map-banana", lambda ws, _: _apply(ws, f"{{id: {ws.base}, device_map: banana}}"),
         ("model.device_map",), before_model=True),
    Case("max-shard-size-banana", lambda ws, _: _apply(ws, ws.base, extra="export: {max_shard_size: banana}\n"),
         ("export.max_shard_size",), before_model=True),
    Case("max-shard-size-zero", lambda ws, _: _apply(ws, ws.base, extra="export: {max_shard_size: 0GB}\n"),
         ("export.max_shard_size",), before_model=True),
    Case("corrupt-neurons-file", lambda ws, _: (ws.neurons.write_text('{"method": "x", "neurons": [{"layer"'),
                                                _apply(ws, ws.base, body=_neurons_file_body(ws)))[1],
         ("neurons.json",), also=("not valid JSON",)),
    Case("binary-neurons-file", lambda ws, _: (ws.neurons.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe"),
                                               _apply(ws, ws.base, body=_neurons_file_body(ws)))[1],
         ("neurons.json",)),
    Case("output-read-only", _ro_output, ("outs",), also=("Read-only file system",)),
    Case("locate-output-read-only", _ro_locate_output, ("outs",), also=("Read-only file system",)),
    Case("output-parent-is-a-file", _parent_is_file, ("afile",), also=("is a file, not a folder",), before_model=True),
    Case("output-disk-full", _full_disk, ("model.safetensors",), also=("No space left on device",)),
    Case("output-disk-full-at-neurons-json", _full_disk_at_neurons_json, ("neurons.json",),
         also=("No space left on device",)),
    Case("locate-output-disk-full", _full_disk_at_locate_output, ("n.json",), also=("No space left on device",)),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fault_is_one_clear_line_and_leaves_nothing(ws, monkeypatch, tmp_path, case: Case):
    argv = case.setup(ws, monkeypatch)
    if case.before_model:
        forbid_model_load(monkeypatch)
    before = snapshot(ws)
    outcome = run_cli(*argv, cwd=ws.work)
    assert_one_clear_line(outcome, 1, case.names)
    for word in case.also:
        assert word in outcome.first_line, outcome.first_line
    assert snapshot(ws) == before  # nothing written, nothing changed, no hidden temporaries
    for folder in (tmp_path / "cache" / "gguf", tmp_path / "cache" / "locate"):
        if folder.is_dir():
            assert hidden_entries(folder) == [], f"stray temporaries in {folder}"


# --- damaged caches: reported, discarded, recomputed --------------------------------------------------------------

def _contrast_file(path: Path, categories=("cat", "dog"), per_category: int = 5) -> None:
    """A tiny contrast-prompt file (the format of bakeedit/data/contrast_prompts.jsonl)."""
    people = ["Ann and Bo", "Cy and Di", "Ed and Fay", "Gus and Hal", "Ida and Jo"]
    lines = [{"id": f"{c}-{k}", "category": c, "context": f"{people[k]} met.", "question": f"Who is {c} bad?",
              "neutral_question": "Who came?", "split": "locate",
              "options": {"stereotyped": "Ann", "anti_stereotyped": "Bo", "unknown": "Unknown"}}
             for c in categories for k in range(per_category)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_damaged_locate_cache_entry_is_discarded_and_recomputed(ws, tmp_path, monkeypatch, caplog):
    import bakeedit.locate.coco.responses as responses
    from bakeedit.neurons import NeuronSet

    _contrast_file(ws.recipes / "contrast.jsonl")  # relative to the recipe, which is not the cwd
    recipe = ws.write_recipe("coco.yaml", body="locate: {method: coco, prompts: contrast.jsonl, answer_format: raw, "
                             "batch_size: 2, top_fraction: 0.05}\n")
    cache = tmp_path / "locate-cache"
    first = run_cli("locate", str(recipe), "-o", str(ws.outs / "first.json"), "--cache-dir", str(cache), cwd=ws.work)
    assert first.exit_code == 0, first.output
    entries = sorted(cache.glob("*/*.safetensors"))
    assert len(entries) == 10
    damaged = entries[3]
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])

    forward, calls = responses._forward, []
    monkeypatch.setattr(responses, "_forward", lambda *a: (calls.append(1), forward(*a))[1])
    with caplog.at_level("WARNING"):
        second = run_cli("locate", str(recipe), "-o", str(ws.outs / "second.json"), "--cache-dir", str(cache),
                         cwd=ws.work)
    assert second.exit_code == 0, second.output
    assert "Traceback" not in second.output
    assert calls == [1]  # only the damaged item was computed again (one batch of one)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(damaged.name in m and "damaged" in m for m in warned), warned
    from safetensors.torch import load_file

    load_file(damaged)  # rewritten whole
    assert NeuronSet.load(ws.outs / "second.json").neurons == NeuronSet.load(ws.outs / "first.json").neurons
    assert [p for p in cache.rglob("*") if ".tmp-" in p.name] == []


def test_damaged_gguf_conversion_in_the_cache_is_converted_again(ws, tmp_path, monkeypatch, caplog):
    import bakeedit.models.embedded as embedded
    from bakeedit.io.shards import read_shard

    gguf = _gguf(ws, b"GGUF" + (3).to_bytes(4, "little") + b"stands in for a real file")
    conversions = []

    def convert(source: Path, tmp: Path, digest: str) -> None:  # the real one dequantises a real GGUF
        conversions.append(source)
        shutil.copytree(ws.base, tmp, dirs_exist_ok=True)

    monkeypatch.setattr(embedded, "_convert", convert)
    first = run_cli(*_apply(ws, gguf, out="first"), cwd=ws.work)
    assert first.exit_code == 0, first.output
    [converted] = (tmp_path / "cache" / "gguf").iterdir()
    shard = converted / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])

    with caplog.at_level("WARNING"):
        second = run_cli(*_apply(ws, gguf, out="second"), cwd=ws.work)
    assert second.exit_code == 0, second.output
    assert len(conversions) == 2
    assert any("damaged" in r.getMessage() and "m.gguf" in r.getMessage() for r in caplog.records)
    read_shard(shard)  # whole again
    assert hidden_entries(converted.parent) == []
