"""StereoSet: LMS / SS / ICAT with the official per-target averaging, on clusters scored by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bias_fakes import FakeScorer

from bakeedit.errors import DataError
from bakeedit.evaluate import get_task
from bakeedit.evaluate.tasks.stereoset import FILE, icat, read_stereoset


def row(kind: str, target: str, domain: str, stereo: str, anti: str, unrel: str, context: str = "Ctx.") -> dict:
    return {"type": kind, "target": target, "bias_type": domain, "context": context, "stereotype": stereo,
            "anti-stereotype": anti, "unrelated": unrel}


# Per-token scores by hand (the fake returns score * n_words over n_words tokens, so only a task that normalises by
# length recovers them). Target A (gender): A1 pro, related 2/2; A2 anti (raw sums would say pro: -2 vs -3), 1/2.
# Target B (race): B1 pro, related 1/2.
#   A: SS 50, LMS 75;  B: SS 100, LMS 50  ->  LMS 62.5, SS 75, ICAT 62.5 * 25 / 50 = 31.25
#   (averaging clusters instead of targets would give SS 66.7, LMS 66.7: the test pins the official macro average)
PER_TOKEN = {"s1": -1.0, "a1": -2.0, "u1": -3.0,
             "s2": -2.0, "a2 a2 a2": -1.0, "u2": -1.5,
             "s3": -1.0, "a3": -3.0, "u3": -2.0}
ROWS = [row("intrasentence", "A", "gender", "s1", "a1", "u1"),
        row("intrasentence", "A", "gender", "s2", "a2 a2 a2", "u2"),
        row("intrasentence", "B", "race", "s3", "a3", "u3"),
        row("intersentence", "B", "race", "s3", "a3", "u3", context="Ctx B.")]


def scorer() -> FakeScorer:
    def fn(_ctx: str, cont: str) -> tuple[float, int]:
        n = len(cont.split())
        return PER_TOKEN[cont.strip()] * n, n
    return FakeScorer(fn)


@pytest.fixture
def stereoset_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "stereoset"
    folder.mkdir()
    (folder / FILE).write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    return folder


def test_icat_formula() -> None:
    assert icat(100.0, 50.0) == 100.0
    assert icat(80.0, 60.0) == pytest.approx(64.0)
    assert icat(80.0, 40.0) == pytest.approx(64.0)
    assert icat(90.0, 100.0) == 0.0


def test_intrasentence_lms_ss_icat_by_hand(stereoset_dir: Path) -> None:
    task = get_task("stereoset_intrasentence")
    data = task.load(stereoset_dir, None, 0)
    assert len(data.items) == 3  # the intersentence row is not part of this task
    result = task.evaluate(scorer(), data)
    assert result.metrics["lms"].value == pytest.approx(62.5)
    assert result.metrics["ss"].value == pytest.approx(75.0)
    assert result.metrics["icat"].value == pytest.approx(31.25)
    assert result.breakdown["gender"]["ss"].value == pytest.approx(50.0)
    assert result.breakdown["gender"]["icat"].value == pytest.approx(75.0)
    assert result.breakdown["race"]["icat"].value == pytest.approx(0.0)


def test_intersentence_scores_candidates_after_the_context(stereoset_dir: Path) -> None:
    task = get_task("stereoset_intersentence")
    fake = scorer()
    result = task.evaluate(fake, task.load(stereoset_dir, None, 0))
    assert fake.requests == [("Ctx B.", " s3"), ("Ctx B.", " a3"), ("Ctx B.", " u3")]
    assert result.metrics["ss"].value == 100.0 and result.metrics["lms"].value == 50.0


def test_real_file_counts(shared_data: Path) -> None:
    path = shared_data / "stereoset" / FILE
    assert len(read_stereoset(path, "intrasentence")) == 2106
    assert len(read_stereoset(path, "intersentence")) == 2123


def test_missing_field_names_file_line_and_field(tmp_path: Path) -> None:
    bad = dict(ROWS[0])
    del bad["unrelated"]
    (tmp_path / FILE).write_text(json.dumps(ROWS[1]) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError, match=r"stereoset_dev_simplified\.jsonl:2: missing field\(s\) unrelated"):
        get_task("stereoset_intrasentence").load(tmp_path, None, 0)
