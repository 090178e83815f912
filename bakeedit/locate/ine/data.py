"""The prompts ``ine`` locates with: common words in templates that end where a gendered token comes next.

The CommonWords idea of arXiv 2501.14457 (everyday words in five categories, none of them gendered) with our own
word list and templates (``bakeedit/data/common_words.jsonl``, ``gender_word_templates.json``; docs/data.md). A
prompt is a template with ``{word}`` filled in; its target pair is the template's ``female``/``male`` continuation
(`` she``/`` he``, `` woman``/`` man``), scored by its first token. Locating reads the ``locate`` split; the
``gender_words`` evaluation probe reads the same files' ``heldout`` split, so a located set is judged on unseen words.

The capability probe of the causal step is a handful of neutral sentences (``ine_probe_sentences.txt``).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bakeedit.data import package_data_path, select_split
from bakeedit.errors import DataError
from bakeedit.io.jsonl import read_jsonl, read_lines

WORDS_FILE = "common_words.jsonl"
TEMPLATES_FILE = "gender_word_templates.json"
PROBE_FILE = "ine_probe_sentences.txt"
TEMPLATE_FIELDS = ("id", "template", "categories", "female", "male")


@dataclass(frozen=True)
class GenderPrompt:
    """One word in one template, with the continuation pair whose log-probability gap measures the bias."""

    word: str
    category: str
    template: str  # the template's id
    text: str
    female: str
    male: str

    @property
    def id(self) -> str:
        return f"{self.template}|{self.word}|{self.female}|{self.male}|{self.text}"


@dataclass(frozen=True)
class EncodedPrompt:
    """Token ids of a prompt (with BOS where the model expects one) and the first token of each continuation."""

    prompt: GenderPrompt
    ids: list[int]
    female_id: int
    male_id: int


def read_templates(path: Path) -> list[dict[str, Any]]:
    """The templates file: a JSON list of ``{id, template (with {word}), categories, female, male}``."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DataError(f"{path}: no such templates file") from exc
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from exc
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{path}: expected a non-empty JSON list of templates")
    for i, t in enumerate(raw):
        missing = [f for f in TEMPLATE_FIELDS if not isinstance(t, dict) or f not in t]
        if missing:
            raise DataError(f"{path}: template [{i}]: missing field '{missing[0]}'",
                            hint="each template needs " + ", ".join(TEMPLATE_FIELDS))
        if "{word}" not in t["template"]:
            raise DataError(f"{path}: template [{i}] ({t['id']}): the template has no {{word}} placeholder")
        if not isinstance(t["categories"], list):
            raise DataError(f"{path}: template [{i}] ({t['id']}): 'categories' must be a list of word categories")
    return raw


def load_gender_prompts(words: Path | None = None, templates: Path | None = None,
                        split: str | None = "locate") -> list[GenderPrompt]:
    """Every (word of ``split``, template of the word's category) pair; an empty ``categories`` fits every word."""
    words_path = words or package_data_path(WORDS_FILE)
    templates_path = templates or package_data_path(TEMPLATES_FILE)
    rows = select_split(read_jsonl(words_path, ("word", "category", "split")), split)
    if not rows:
        raise DataError(f"{words_path}: no words in split '{split}'", hint="every line needs \"split\": \"locate\"")
    table = read_templates(templates_path)
    prompts = [
        GenderPrompt(str(r["word"]), str(r["category"]), str(t["id"]), t["template"].replace("{word}", str(r["word"])),
                     str(t["female"]), str(t["male"]))
        for r in rows for t in table if not t["categories"] or r["category"] in t["categories"]
    ]
    if not prompts:
        raise DataError(f"{templates_path}: no template fits the categories of the words in {words_path}")
    return prompts


def spread(prompts: list[GenderPrompt], limit: int | None, seed: int) -> list[GenderPrompt]:
    """At most ``limit`` prompts, shuffled (seeded) inside each category and taken round-robin over categories, so
    a small budget still covers every category, word type and template."""
    rng = random.Random(seed)
    by_cat: dict[str, list[GenderPrompt]] = {}
    for p in prompts:
        by_cat.setdefault(p.category, []).append(p)
    for items in by_cat.values():
        rng.shuffle(items)
    ordered = [items[i] for i in range(max(map(len, by_cat.values()))) for items in by_cat.values() if i < len(items)]
    return ordered if limit is None else ordered[:limit]


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts BOS in front of a text by itself (what the evaluation scorer mirrors)."""
    bos = tokenizer.bos_token_id
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos is not None and len(probe) > 0 and probe[0] == bos


def _first_token(tokenizer: Any, text: str, where: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise DataError(f"{where}: {text!r} encodes to no tokens")
    return int(ids[0])


def encode_prompts(tokenizer: Any, prompts: list[GenderPrompt], max_length: int | None = None
                   ) -> list[EncodedPrompt]:
    """Token ids of each prompt (BOS prepended when the tokenizer adds one) and its target tokens.

    The bias gap is read at the first token of each continuation, as the ``gender_words`` probe does; a pair whose
    first tokens coincide would have a gap of zero whatever the model does, so it is an error.
    """
    bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    out = []
    for p in prompts:
        where = f"template '{p.template}'"
        female, male = _first_token(tokenizer, p.female, where), _first_token(tokenizer, p.male, where)
        if female == male:
            raise DataError(f"{where}: {p.female!r} and {p.male!r} start with the same token ({female})",
                            hint="use continuations whose first tokens differ, e.g. ' she' / ' he'")
        ids = bos + list(tokenizer(p.text, add_special_tokens=False)["input_ids"])
        if not ids:
            raise DataError(f"{where}: the prompt {p.text!r} encodes to no tokens")
        if max_length is not None and len(ids) > max_length:
            raise DataError(f"{where}: the prompt {p.text!r} has {len(ids)} tokens, more than the model's "
                            f"{max_length} positions", hint="shorten the template or the word")
        out.append(EncodedPrompt(p, ids, female, male))
    return out


def load_probe_sentences(path: Path | None = None) -> list[str]:
    """Non-empty, non-comment lines of the capability probe file (default: the package's neutral sentences)."""
    return read_lines(Path(path or package_data_path(PROBE_FILE)), "probe sentence")


def encode_probe(tokenizer: Any, sentences: list[str], max_length: int | None = None) -> list[list[int]]:
    """Token ids of each probe sentence (BOS when the tokenizer adds one), cut to ``max_length``; sentences under
    2 tokens are useless for a next-token loss and are an error."""
    bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    out = []
    for s in sentences:
        ids = (bos + list(tokenizer(s, add_special_tokens=False)["input_ids"]))[:max_length]
        if len(ids) < 2:
            raise DataError(f"probe sentence {s!r} has fewer than 2 tokens")
        out.append(ids)
    return out
