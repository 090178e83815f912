"""The packaged contrast prompts: categories, sizes, a stratified held-out third, and items that make sense."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from bakeedit.data import package_data_path
from bakeedit.data.contrast import CONTRAST_FILE, load_contrast_items
from bakeedit.errors import DataError

REQUIRED = {"gender", "race_ethnicity", "religion", "age", "disability", "nationality"}


def test_package_file_covers_the_categories_with_a_stratified_heldout_third():
    items = load_contrast_items(split=None)
    per_category = Counter(it.category for it in items)
    assert set(per_category) >= REQUIRED
    assert min(per_category.values()) >= 30
    held = Counter(it.category for it in items if it.split == "heldout")
    for category, n in per_category.items():
        assert abs(held[category] - n / 3) <= 1, category
    assert {it.category for it in load_contrast_items()} == set(per_category)  # every category can be located


def test_items_are_ambiguous_two_person_contexts_with_matched_questions():
    for it in load_contrast_items(split=None):
        assert it.question != it.neutral_question and it.question.endswith("?") and it.neutral_question.endswith("?")
        options = it.options
        assert len({options["stereotyped"], options["anti_stereotyped"], options["unknown"]}) == 3
        for key in ("stereotyped", "anti_stereotyped"):  # both people are named in the context
            person = options[key].lower().removeprefix("the ").removeprefix("my ")
            assert person in it.context.lower(), (it.id, key)
        assert it.x_text.startswith(it.context) and it.y_text.endswith(it.neutral_question)


def test_the_stereotyped_person_is_named_first_in_about_half_of_each_category():
    first: Counter[str] = Counter()
    items = load_contrast_items(split=None)
    for it in items:
        stereotyped = it.options["stereotyped"].lower().removeprefix("the ").removeprefix("my ")
        anti = it.options["anti_stereotyped"].lower().removeprefix("the ").removeprefix("my ")
        first[it.category] += it.context.lower().index(stereotyped) < it.context.lower().index(" and ") < \
            it.context.lower().rindex(anti)
    for category, n in Counter(it.category for it in items).items():
        assert abs(first[category] - n / 2) <= 1.5, (category, first[category], n)


def test_file_lines_have_exactly_the_documented_fields():
    for line in package_data_path(CONTRAST_FILE).read_text().splitlines():
        item = json.loads(line)
        assert set(item) == {"id", "category", "context", "question", "neutral_question", "options", "split"}
        assert set(item["options"]) == {"stereotyped", "anti_stereotyped", "unknown"}


def test_selection_by_category_and_max_items():
    items = load_contrast_items(categories=["age", "religion"], max_items=4)
    assert Counter(it.category for it in items) == {"age": 4, "religion": 4}
    with pytest.raises(DataError, match="no locate items of category klingon"):
        load_contrast_items(categories=["klingon"])


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d.pop("neutral_question"), r":1: missing field\(s\) neutral_question"),
    (lambda d: d.update(split="train"), r"item 1 \(id 'a-1'\): split 'train'"),
    (lambda d: d.update(options={"stereotyped": "x"}), r"item 1 \(id 'a-1'\): 'options' must map"),
])
def test_malformed_files_name_the_item(tmp_path, change, message):
    item = {"id": "a-1", "category": "a", "context": "A and B met.", "question": "Who is bad?",
            "neutral_question": "Who met?", "split": "locate",
            "options": {"stereotyped": "A", "anti_stereotyped": "B", "unknown": "Unknown"}}
    change(item)
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(item) + "\n")
    with pytest.raises(DataError, match=message):
        load_contrast_items(path)


def test_duplicate_ids_are_refused(tmp_path):
    item = {"id": "a-1", "category": "a", "context": "A and B met.", "question": "Who is bad?",
            "neutral_question": "Who met?", "split": "locate",
            "options": {"stereotyped": "A", "anti_stereotyped": "B", "unknown": "Unknown"}}
    path = tmp_path / "dup.jsonl"
    path.write_text((json.dumps(item) + "\n") * 2)
    with pytest.raises(DataError, match="duplicate item id"):
        load_contrast_items(path)
