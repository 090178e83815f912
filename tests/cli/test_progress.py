"""Progress when the output is not a terminal (a log, CI, a pipe): plain ``bakeedit [  1.2s] step`` lines on stderr,
an estimate per tenth of a bar; and an error still one clear line once those lines are set aside."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import bakeedit.cli.progress as progress_module
from bakeedit.cli import main
from bakeedit.cli.main import console
from bakeedit.cli.progress import PROGRESS_ENV, PROGRESS_LINE, PlainProgress, command_progress, progress_mode

NEURONS = """neurons:
  - {layer: 0, site: attn.q, index: 3}
  - {layer: 2, site: mlp.act, index: 7}
"""
STEP = r"^bakeedit \[ *(\d+\.\d)s\] "


@pytest.fixture(autouse=True)
def not_a_terminal(monkeypatch):
    """Whatever the machine running the tests sets: no forced mode, no forced colour, so the CLI decides."""
    for name in (PROGRESS_ENV, "FORCE_COLOR", "TTY_COMPATIBLE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def recipe(folder: Path, model: Path, body: str = NEURONS, extra: str = "") -> Path:
    path = folder / "r.yaml"
    path.write_text(f"name: progress-test\nmodel: {model}\nedit: {{lambda: 2.5}}\n{body}{extra}")
    return path


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def progress_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if PROGRESS_LINE.match(line)]


def other_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not PROGRESS_LINE.match(line)]


def test_steps_and_bars_are_plain_lines_when_the_output_is_not_a_terminal(tmp_path, tiny_checkpoint, shared_data,
                                                                          monkeypatch):
    monkeypatch.setattr(progress_module, "MIN_BAR_INTERVAL_S", 0.0)  # a tiny run is over in seconds: every tenth
    path = recipe(tmp_path, tiny_checkpoint("llama"),
                  extra=f"evaluate: {{tasks: [crows_pairs], limit: 20, seed: 0, data_dir: {shared_data}}}\n")
    result = run("apply", str(path), "-o", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    lines = progress_lines(result.stderr)
    steps = [re.sub(STEP, "", line) for line in lines]
    for step in ("load model", "read neurons", "reference logits (runtime hooks)", "evaluate base and random control",
                 "fold edit into weights", "verify (reload + compare)", "evaluate edited checkpoint"):
        assert steps.count(step) == 1, result.stderr  # one line per step: its name alone after the elapsed time
    elapsed = [float(re.match(STEP, line).group(1)) for line in lines]
    assert elapsed == sorted(elapsed) and elapsed[0] < 60, lines  # seconds since the first step, never back
    # a bar that has progressed gets an estimate of the time left, and a line when it completes
    estimate = r"base: crows_pairs \d+% \(\d+/\d+, est\. \d+(s|m\d\ds|h\d\dm) left\)"
    assert any(re.fullmatch(estimate, s) for s in steps), lines
    assert any(re.fullmatch(r"edited: crows_pairs 100% \((\d+)/\1, took \d+\S*\)", s) for s in steps), lines
    assert "\x1b" not in result.stderr, "terminal control codes in a log"
    assert not progress_lines(result.stdout) and result.stdout.strip() == str(tmp_path / "out")
    assert any("bakeedit apply: progress-test" in line for line in other_lines(result.stderr))  # the summary follows


def test_a_bar_shows_a_line_per_tenth_at_most_every_two_seconds_and_its_completion():
    ticks = [0]  # tenths of a second: exact times, no float drift
    with console.capture() as captured:
        progress = PlainProgress(console=console, get_time=lambda: 100 + ticks[0] / 10)
        progress.step("locate neurons")
        progress.step("locate neurons")  # the same step again: no second line
        bar = progress.add_task("coco: scoring categories", total=100)
        for _ in range(100):  # 1 % every 0.1 s: a tenth each second, a line every other second
            ticks[0] += 1
            progress.advance(bar)
    lines = captured.get().splitlines()
    assert all(PROGRESS_LINE.match(line) for line in lines), lines
    assert [re.sub(STEP, "", line) for line in lines] == [
        "locate neurons",
        "coco: scoring categories 20% (20/100, est. 8s left)",
        "coco: scoring categories 40% (40/100, est. 6s left)",
        "coco: scoring categories 60% (60/100, est. 4s left)",
        "coco: scoring categories 80% (80/100, est. 2s left)",
        "coco: scoring categories 100% (100/100, took 10s)",
    ]
    assert lines[0].startswith("bakeedit [   0.0s] ") and lines[-1].startswith("bakeedit [  10.0s] ")


def test_a_bad_input_found_after_the_first_steps_is_still_one_error_line(tmp_path, tiny_checkpoint):
    """The neuron index is checked against the loaded model's layout, so steps ran before the fault: their lines
    are progress lines, and what is left is the one error line naming the field (and at most its hint)."""
    path = recipe(tmp_path, tiny_checkpoint("llama"), body="neurons: [{layer: 0, site: attn.k, index: 99}]\n")
    result = run("apply", str(path), "-o", str(tmp_path / "out"))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert progress_lines(result.stderr), result.stderr  # the case is the one the filter exists for
    rest = other_lines(result.stderr)
    assert 1 <= len(rest) <= 2 and rest[0].startswith("error: ") and "neurons[0].index: 99" in rest[0], rest
    assert sum(line.startswith("error:") for line in rest) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["malformed-recipe", "output-exists", "bad-lambda-list"])
def test_a_fault_found_while_validating_prints_no_progress_at_all(tmp_path, tiny_checkpoint, case):
    """Recipe, output and option checks come before the first step, so nothing but the error is printed."""
    path = recipe(tmp_path, tiny_checkpoint("llama"), extra="evaluate: {tasks: [copa]}\n")
    out = tmp_path / "out"
    if case == "malformed-recipe":
        path.write_text("name: x\nmodel: [\n")
        result = run("apply", str(path), "-o", str(out))
    elif case == "output-exists":
        out.mkdir()
        (out / "mine.txt").write_text("a user's file\n")
        result = run("apply", str(path), "-o", str(out))
    else:
        result = run("sweep", str(path), "--lambda", "0,abc", "-o", str(out))
    assert result.exit_code == 1
    assert not progress_lines(result.stderr), result.stderr
    assert other_lines(result.stderr)[0].startswith("error: "), result.stderr


def test_a_real_pipe_gets_plain_lines_and_none_silences_them(tmp_path, tiny_checkpoint):
    """As a log or CI sees it: a real process whose stderr is a pipe, not CliRunner's stream."""
    path = recipe(tmp_path, tiny_checkpoint("llama"))
    env = {k: v for k, v in os.environ.items() if k not in (PROGRESS_ENV, "FORCE_COLOR", "TTY_COMPATIBLE")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "bakeedit.cli", "apply", str(path), "-o", str(tmp_path / "a")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [re.sub(STEP, "", line) for line in progress_lines(done.stderr)][:2] == ["load model", "read neurons"]

    with_none = CliRunner().invoke(main, ["apply", str(path), "-o", str(tmp_path / "b")], env={PROGRESS_ENV: "none"})
    assert with_none.exit_code == 0, with_none.output
    assert not progress_lines(with_none.stderr) and "bakeedit apply: progress-test" in with_none.stderr


def test_the_mode_follows_the_terminal_unless_forced(monkeypatch):
    monkeypatch.setattr(console, "_force_terminal", True)
    assert progress_mode() == "rich"  # a terminal keeps rich's live bars
    monkeypatch.setattr(console, "_force_terminal", False)
    assert progress_mode() == "plain"
    with command_progress() as (progress, _report):
        assert isinstance(progress, PlainProgress)
    for mode in ("plain", "rich", "none"):
        monkeypatch.setenv(PROGRESS_ENV, mode)
        assert progress_mode() == mode
    monkeypatch.setenv(PROGRESS_ENV, "none")
    with console.capture() as captured, command_progress() as (progress, report):
        report("load model")
        bar = progress.add_task("x", total=2)
        progress.update(bar, completed=2)
    assert captured.get() == ""


def test_an_unknown_progress_mode_is_one_clear_line(tmp_path, tiny_checkpoint):
    path = recipe(tmp_path, tiny_checkpoint("llama"))
    result = CliRunner().invoke(main, ["apply", str(path), "-o", str(tmp_path / "out")],
                                env={PROGRESS_ENV: "fancy"})
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = other_lines(result.stderr)
    assert lines[0] == "error: BAKEEDIT_PROGRESS: 'fancy' is not one of plain, rich, none", result.stderr
    assert len(lines) == 2 and lines[1].startswith("hint: ")
    assert not (tmp_path / "out").exists()
