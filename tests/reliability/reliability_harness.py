"""Shared pieces of the reliability tests: run the real CLI entry point, and snapshot a folder before and after.

Every case in ``tests/reliability/`` goes through :func:`run_cli` (the ``bakeedit`` Click group, in process) or
:func:`spawn_cli` (a real ``python -m bakeedit.cli`` subprocess, for signals) and then checks three things the
issue promises: the exit code, that the first line of output names the file or field, and that no traceback was
printed. The plain progress lines of the steps that ran before the fault (``bakeedit [  1.2s] load model``, on
stderr when it is not a terminal, as here) may come first: :func:`message_lines` drops them (``PROGRESS_LINE``) and
nothing else, and exactly one ``error:`` line must remain. :func:`snapshot` lists a folder recursively with each
file's sha256, so "the old output is byte-identical", "user files are untouched" and "no stray temporaries" are plain
equality checks.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from click.testing import CliRunner

from bakeedit.cli import main
from bakeedit.cli.progress import PROGRESS_LINE

REPO = Path(__file__).resolve().parents[2]


@dataclass
class CliOutcome:
    exit_code: int
    stdout: str
    stderr: str
    exception: BaseException | None = None

    @property
    def output(self) -> str:
        return self.stderr + self.stdout

    @property
    def first_line(self) -> str:
        """The first line of stderr that is not blank and not a progress line."""
        lines = message_lines(self.stderr)
        return lines[0] if lines else ""


def message_lines(text: str) -> list[str]:
    """The lines of a command's stderr that are neither blank nor plain progress lines (``PROGRESS_LINE``)."""
    return [line for line in text.splitlines() if line.strip() and not PROGRESS_LINE.match(line)]


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> CliOutcome:
    """Invoke the ``bakeedit`` group in this process, as a user's shell would (``sys.exit`` codes kept)."""
    old = Path.cwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        result = CliRunner().invoke(main, list(args), env=env, catch_exceptions=True)
    finally:
        os.chdir(old)
    exc = result.exception if not isinstance(result.exception, SystemExit) else None
    return CliOutcome(result.exit_code, result.stdout, result.stderr, exc)


def spawn_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, **popen) -> subprocess.Popen:
    """``python -m bakeedit.cli ARGS`` as a real process (one torch thread: tests run side by side)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "bakeedit.cli", *args], cwd=cwd or REPO, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def assert_one_clear_line(outcome: CliOutcome, code: int, names: str | tuple[str, ...]) -> None:
    """The promise for every bad input: exit ``code``, the first line names the file/field, no traceback."""
    assert outcome.exception is None, f"uncaught {outcome.exception!r}\n{outcome.output}"
    assert outcome.exit_code == code, outcome.output
    assert "Traceback" not in outcome.output, outcome.output
    first = outcome.first_line
    assert first.startswith("error:"), outcome.output
    assert sum(line.startswith("error:") for line in message_lines(outcome.stderr)) == 1, outcome.output
    wanted = (names,) if isinstance(names, str) else names
    assert any(name in first for name in wanted), f"first line {first!r} names none of {wanted}"


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 (files) or '<dir>' (folders), hidden entries included, for equality checks."""
    folder = Path(folder)
    if not folder.exists():
        return {}
    out: dict[str, str] = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_symlink():
            out[rel] = f"<link {os.readlink(path)}>"
        elif path.is_dir():
            out[rel] = "<dir>"
        else:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def hidden_entries(parent: Path) -> list[str]:
    """Names of hidden siblings (``.NAME.tmp-*``, ``.NAME.old-*``): what an interrupted write could leave."""
    return sorted(p.name for p in Path(parent).iterdir() if p.name.startswith("."))


# --- a workspace to run apply in, and a child process held mid-save -------------------------------------------

NEURONS = """neurons:
  - {layer: 0, site: attn.q, index: 3}
  - {layer: 2, site: mlp.act, index: 7}
"""


@dataclass
class Workspace:
    """Separate folders for everything ``-o`` must not destroy, so a refusal's message is unambiguous:
    ``models/base`` (tiny checkpoint), ``recipes/r.yaml``, ``neurons/neurons.json``, ``work`` (the current
    directory, holding a user's notes), ``home`` ($HOME) and ``outs`` (where outputs go)."""

    root: Path

    @property
    def base(self) -> Path:
        return self.root / "models" / "base"

    @property
    def recipes(self) -> Path:
        return self.root / "recipes"

    @property
    def recipe(self) -> Path:
        return self.recipes / "r.yaml"

    @property
    def neurons(self) -> Path:
        return self.root / "neurons" / "neurons.json"

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def outs(self) -> Path:
        return self.root / "outs"

    def write_recipe(self, name: str = "r.yaml", lam: float = 2.5, body: str = NEURONS, model: str | None = None,
                     extra: str = "") -> Path:
        path = self.recipes / name
        path.write_text(f"name: reliability\nmodel: {model or self.base}\nedit: {{lambda: {lam}}}\n{body}{extra}")
        return path


def make_workspace(root: Path, base_template: Path) -> Workspace:
    """A fresh workspace under ``root`` whose base model is a copy of ``base_template`` (made once per module)."""
    import shutil

    from bakeedit.neurons import Neuron, NeuronSet

    ws = Workspace(Path(root))
    for folder in (ws.recipes, ws.neurons.parent, ws.work, ws.home, ws.outs):
        folder.mkdir(parents=True)
    shutil.copytree(base_template, ws.base)
    (ws.work / "notes.txt").write_text("a user's notes: never deleted\n")
    (ws.home / ".profile").write_text("# home\n")
    NeuronSet(method="explicit", neurons=[Neuron(layer=0, site="attn.q", index=3)]).save(ws.neurons)
    ws.write_recipe()
    return ws


def save_base(folder: Path, shard: str | None = None) -> Path:
    """The tiny llama checkpoint (float32, so ``apply`` streams it), in several shards when ``shard`` is given."""
    from tiny_models import tiny_model, tiny_tokenizer

    model = tiny_model("llama")
    if shard:
        model.save_pretrained(folder, max_shard_size=shard)
    else:
        model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


HELD_SCRIPT = """
import os, signal, sys
# As an interactive shell starts a command: default dispositions, whatever the test runner inherited.
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGTERM, signal.SIG_DFL)
signal.signal(signal.SIGHUP, signal.SIG_DFL)
from bakeedit.export import stream
real = stream._write_shard
def held(*args, **kwargs):
    real(*args, **kwargs)
    os.write({ready}, b"1")   # the first shard is on disk: tell the test
    os.read({hold}, 1)        # and wait here, mid-save, for the signal (the test never writes this pipe)
stream._write_shard = held
from bakeedit.cli import main
main({args!r}, prog_name="bakeedit")
"""


@dataclass
class HeldRun:
    """A real ``bakeedit`` process stopped inside its save, after the first shard (synchronised by pipes)."""

    proc: subprocess.Popen
    ready_r: int
    hold_w: int

    def wait_held(self, timeout: float = 300) -> None:
        import select

        readable, _, _ = select.select([self.ready_r], [], [], timeout)
        byte = os.read(self.ready_r, 1) if readable else b""
        if byte != b"1":
            self.proc.kill()
            _, err = self.proc.communicate()
            raise AssertionError(f"the child never reached its first shard:\n{err}")

    def finish(self, timeout: float = 300) -> tuple[int, str]:
        try:
            _, err = self.proc.communicate(timeout=timeout)
        finally:
            os.close(self.ready_r)
            os.close(self.hold_w)
        return self.proc.returncode, err


def spawn_held(*args: str, cwd: Path | None = None) -> HeldRun:
    """``bakeedit ARGS`` in a child whose streamed save stops after its first shard until it is signalled."""
    ready_r, ready_w = os.pipe()
    hold_r, hold_w = os.pipe()
    script = HELD_SCRIPT.format(ready=ready_w, hold=hold_r, args=list(args))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=cwd or REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, pass_fds=(ready_w, hold_r))
    os.close(ready_w)
    os.close(hold_r)
    return HeldRun(proc, ready_r, hold_w)
