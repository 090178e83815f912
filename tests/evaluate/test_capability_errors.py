"""Malformed data files give a DataError naming the file, the line and the missing field; the real data loads."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bakeedit.errors import DataError
from bakeedit.evaluate import get_task


def _jsonl(path: Path, rows: list[dict | str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


@pytest.mark.parametrize(
    ("task", "file", "rows", "line", "field"),
    [
        ("arc_easy", "arc/arc_easy_test.jsonl",
         [{"query": "Question: a", "choices": ["x", "y"], "gold": 0}, {"query": "Question: b", "gold": 1}], 2,
         "choices"),
        ("arc_challenge", "arc/arc_challenge_test.jsonl", [{"query": "Q", "choices": ["x"], "gold": 3}], 1, "gold"),
        ("openbookqa", "openbookqa/test.jsonl", [{"id": "1", "question": {"stem": "s", "choices": []}}], 1,
         "answerKey"),
        ("copa", "copa/copa_val.jsonl", ["", {"choices": ["a", "b"], "gold": 0}], 2, "query"),
        ("winogrande", "winogrande/dev.jsonl",
         [{"qID": "q", "sentence": "A _ b", "option1": "x", "answer": "1"}], 1, "option2"),
        ("gsm8k", "gsm8k/test.jsonl", [{"question": "q", "answer": "#### 1"}] * 5 + [{"question": "q"}], 6, "answer"),
    ],
)
def test_jsonl_missing_field(tmp_path, task, file, rows, line, field):
    _jsonl(tmp_path / file, rows)
    with pytest.raises(DataError) as err:
        get_task(task).load(tmp_path, None, 0)
    msg = str(err.value)
    assert f"{tmp_path / file}:{line}" in msg and re.search(rf"\b{field}\b", msg)


def test_null_required_field_counts_as_missing(tmp_path):
    _jsonl(tmp_path / "arc" / "arc_easy_test.jsonl", [{"query": "Q", "choices": None, "gold": 0}])
    with pytest.raises(DataError, match=r"arc_easy_test\.jsonl:1: missing field 'choices'"):
        get_task("arc_easy").load(tmp_path, None, 0)


def test_gsm8k_answer_without_final_number_names_its_line(tmp_path):
    _jsonl(tmp_path / "gsm8k" / "test.jsonl", [{"question": "q", "answer": "#### 1"}, "",
                                                {"question": "q2", "answer": "no final line"}])
    with pytest.raises(DataError, match=r"test\.jsonl:3: field 'answer' has no final '#### <number>' line"):
        get_task("gsm8k").load(tmp_path, None, 0)


def test_line_numbers_count_blank_lines(tmp_path):
    """Rows keep their file line numbers across blank lines (they name the line of a bad value later)."""
    _jsonl(tmp_path / "arc" / "arc_easy_test.jsonl",
           [{"query": "Q", "choices": ["a"], "gold": 0}, "", "   ", {"query": "Q2", "choices": ["a"], "gold": 5}])
    with pytest.raises(DataError, match=r"arc_easy_test\.jsonl:4:"):
        get_task("arc_easy").load(tmp_path, None, 0)


def test_invalid_json_line_is_named(tmp_path):
    _jsonl(tmp_path / "arc" / "arc_easy_test.jsonl", [{"query": "Q", "choices": ["x"], "gold": 0}, "{not json"])
    with pytest.raises(DataError, match=r"arc_easy_test\.jsonl:2: not valid JSON"):
        get_task("arc_easy").load(tmp_path, None, 0)


def test_piqa_label_count_mismatch_and_bad_label(tmp_path):
    d = tmp_path / "piqa"
    _jsonl(d / "valid.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b"}] * 2)
    (d / "valid-labels.lst").write_text("0\n")
    with pytest.raises(DataError, match=r"1 labels but .* 2 rows"):
        get_task("piqa").load(tmp_path, None, 0)
    (d / "valid-labels.lst").write_text("0\n7\n")
    with pytest.raises(DataError, match=r"valid-labels\.lst:2: field 'label' = 7 is out of range"):
        get_task("piqa").load(tmp_path, None, 0)


def test_hellaswag_incomplete_item_and_empty_ending(tmp_path):
    d = tmp_path / "hellaswag"
    d.mkdir()
    f = d / "hellaswag_val_full.txt"
    f.write_text("ctx\n0\na\nb\nc\nd\nctx2\n1\na\n")
    with pytest.raises(DataError, match=r"hellaswag_val_full\.txt:7: incomplete item"):
        get_task("hellaswag").load(tmp_path, None, 0)
    f.write_text("ctx\n0\na\nb\n\nd\n")
    with pytest.raises(DataError, match=r"hellaswag_val_full\.txt:5: missing field 'ending 2'"):
        get_task("hellaswag").load(tmp_path, None, 0)


def test_mmlu_short_row_and_bad_answer(tmp_path):
    t = tmp_path / "mmlu" / "test"
    t.mkdir(parents=True)
    header = "question,choice0,choice1,choice2,choice3,answer\n"
    (t / "anatomy_test.csv").write_text(header + "Q1,a,b,c,d,0\nQ2,a,b,c\n")
    with pytest.raises(DataError, match=r"anatomy_test\.csv:3: expected 6 fields, got 4 \(missing field 'choice3'\)"):
        get_task("mmlu", subjects="anatomy").load(tmp_path, None, 0)
    (t / "anatomy_test.csv").write_text(header + "Q1,a,b,c,d,E\n")
    with pytest.raises(DataError, match=r"anatomy_test\.csv:2: field 'answer' must be an integer"):
        get_task("mmlu", subjects="anatomy").load(tmp_path, None, 0)


def test_missing_data_folder_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("BAKEEDIT_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="no data for 'piqa'") as err:
        get_task("piqa").load(None, None, 0)
    assert "--data-dir" in err.value.hint


# the sizes SOURCE.md gives for each data set
SIZES = {"arc_easy": 2376, "arc_challenge": 1172, "openbookqa": 500, "copa": 100, "piqa": 1838, "hellaswag": 10042,
         "winogrande": 1267, "mmlu": 14042, "gsm8k": 1319, "perplexity": 10042}


@pytest.mark.parametrize("task", sorted(SIZES))
def test_real_data_loads(shared_data, task):
    data = get_task(task).load(shared_data, 5, 0)
    assert data.n_total == SIZES[task] and len(data.items) == 5 and len(data.sha256) == 64
