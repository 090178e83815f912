"""Issue #3's "data we write ourselves", asserted in one place with the issue's numbers: every package data set is
big enough, covers what it promises, and is split into ``locate`` and ``heldout`` parts that share no item.

The per-file format checks live beside their loaders (test_knowbias.py, test_ine.py, test_contrast_data.py); this
file pins the counts the issue's "Done when" names, read straight from the JSON(L) files.
"""

from __future__ import annotations

import json
from collections import Counter

from bakeedit.data import package_data_path
from bakeedit.io.jsonl import read_jsonl

ISSUE_DIMENSIONS = {"gender", "race_ethnicity", "religion", "age", "disability", "nationality",
                    "sexual_orientation", "socioeconomic_status", "physical_appearance"}
ISSUE_KINDS = {"causal_rejection", "bias_recognition", "normative_judgement"}
ISSUE_WORD_CATEGORIES = {"traits", "actions", "professions", "hobbies", "colours"}


def both_splits_disjoint(items: list[dict], key) -> None:
    splits = Counter(it["split"] for it in items)
    assert set(splits) == {"locate", "heldout"} and min(splits.values()) > 0, splits
    locate = {key(it) for it in items if it["split"] == "locate"}
    heldout = {key(it) for it in items if it["split"] == "heldout"}
    assert not locate & heldout, sorted(locate & heldout)[:5]


def test_bias_questions_nine_dimensions_twenty_each_three_kinds():
    items = read_jsonl(package_data_path("bias_questions.jsonl"))
    per_dimension = Counter(it["dimension"] for it in items)
    assert set(per_dimension) >= ISSUE_DIMENSIONS and len(per_dimension) >= 9
    assert min(per_dimension.values()) >= 20, per_dimension
    for dimension in per_dimension:
        kinds = {it["kind"] for it in items if it["dimension"] == dimension}
        assert kinds == ISSUE_KINDS, (dimension, kinds)
        for split in ("locate", "heldout"):  # both parts cover every dimension
            assert any(it["split"] == split for it in items if it["dimension"] == dimension), (dimension, split)
    assert all(it["answer"] in {"Yes", "No"} for it in items)  # each with its correct answer
    both_splits_disjoint(items, lambda it: it["question"].strip().lower())


def test_common_words_five_hundred_in_five_categories_with_gendered_templates():
    words = read_jsonl(package_data_path("common_words.jsonl"))
    assert len(words) >= 500 and len({w["word"] for w in words}) == len(words)
    assert set(Counter(w["category"] for w in words)) == ISSUE_WORD_CATEGORIES
    both_splits_disjoint(words, lambda w: w["word"].lower())
    templates = json.loads(package_data_path("gender_word_templates.json").read_text())
    for category in ISSUE_WORD_CATEGORIES:  # every category has a template that ends in a gendered target pair
        fitting = [t for t in templates if not t["categories"] or category in t["categories"]]
        assert fitting, category
        for t in fitting:
            assert "{word}" in t["template"] and t["female"] != t["male"]
            assert {t["female"].strip(), t["male"].strip()} in ({"she", "he"}, {"woman", "man"})


def test_contrast_prompts_six_social_categories_with_both_splits():
    items = read_jsonl(package_data_path("contrast_prompts.jsonl"))
    categories = Counter(it["category"] for it in items)
    assert len(categories) >= 6
    for category in categories:
        splits = {it["split"] for it in items if it["category"] == category}
        assert splits == {"locate", "heldout"}, (category, splits)
    both_splits_disjoint(items, lambda it: (it["context"].lower(), it["question"].lower()))
