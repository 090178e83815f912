"""Capability tasks on hand-made items in each data set's original format, with log-likelihoods set by hand so
that acc / acc_norm / exact match / perplexity are known in advance."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from bakeedit.evaluate import get_task
from bakeedit.evaluate.engine import LLResult, Scorer
from bakeedit.evaluate.tasks.gsm8k import extract_flexible, extract_strict, gold_number, normalize


class FakeScorer:
    """Answers every request from a table ``{(context, continuation): logprob}`` (KeyError = unexpected prompt)."""

    def __init__(self, table: dict[tuple[str, str], float] | None = None,
                 gen: Callable[[str], str] | None = None) -> None:
        self.table = table or {}
        self.gen = gen
        self.requests: list[tuple[str, str]] = []
        self.prompts: list[str] = []

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[LLResult]:
        self.requests += list(requests)
        return [LLResult(self.table[r], 1, len(r[1]), False) for r in requests]

    def rolling_loglikelihood(self, texts: Sequence[str]) -> list[LLResult]:
        return [LLResult(self.table[("", t)], 2 * len(t.split()), len(t), False) for t in texts]  # 2 tokens a word

    def generate(self, prompts: Sequence[str], max_new_tokens: int, stop: Sequence[str] = ()) -> list[str]:
        self.prompts += list(prompts)
        return [self.gen(p) for p in prompts]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_arc_acc_and_acc_norm_by_hand(tmp_path):
    write_jsonl(tmp_path / "arc" / "arc_easy_test.jsonl", [
        {"query": "Question: Q1?", "choices": ["a", "bbbb"], "gold": 1},
        {"query": "Question: Q2?", "choices": ["xyz", "uvw", "rst"], "gold": 0},
        {"query": "Question: Q3?", "choices": ["aa", "b"], "gold": 1},
    ])
    table = {
        # Q1: raw LL prefers "a" (wrong); per character -2/1 < -4/4, so acc_norm picks "bbbb" (right)
        ("Question: Q1?\nAnswer:", " a"): -2.0, ("Question: Q1?\nAnswer:", " bbbb"): -4.0,
        # Q2: equal lengths, both pick gold
        ("Question: Q2?\nAnswer:", " xyz"): -1.0, ("Question: Q2?\nAnswer:", " uvw"): -3.0,
        ("Question: Q2?\nAnswer:", " rst"): -5.0,
        # Q3: raw picks "aa" (wrong) -1 > -1.5; per char -0.5 > -1.5, still wrong
        ("Question: Q3?\nAnswer:", " aa"): -1.0, ("Question: Q3?\nAnswer:", " b"): -1.5,
    }
    result = get_task("arc_easy").run(FakeScorer(table), tmp_path)
    assert result.metrics["acc"].value == pytest.approx(1 / 3)
    assert result.metrics["acc_norm"].value == pytest.approx(2 / 3)
    assert result.n == 3 and result.kind == "capability" and result.limit is None
    assert result.metrics["acc"].stderr > 0 and result.metrics["acc"].higher_is_better is True
    assert len(result.data_sha256) == 64 and result.data_source.endswith("arc_easy_test.jsonl")


def test_limit_is_a_seeded_sample_recorded_in_the_result(tmp_path):
    rows = [{"query": f"Question: Q{i}?", "choices": ["a", "b"], "gold": 0} for i in range(10)]
    write_jsonl(tmp_path / "arc_challenge_test.jsonl", rows)
    task = get_task("arc_challenge")
    a, b, c = (task.load(tmp_path, 4, 1), task.load(tmp_path, 4, 1), task.load(tmp_path, 4, 2))
    assert [i.id for i in a.items] == [i.id for i in b.items] != [i.id for i in c.items]
    assert a.n_total == 10 and len(a.items) == 4
    table = {(f"Question: Q{i}?\nAnswer:", o): v for i in range(10) for o, v in ((" a", -1.0), (" b", -2.0))}
    result = task.evaluate(FakeScorer(table), a)
    assert (result.limit, result.seed, result.n, result.metrics["acc"].value) == (4, 1, 4, 1.0)
    assert result.metrics["acc"].stderr == 0.0  # every resample of all-correct items has acc 1


def test_openbookqa_and_copa_prompts(tmp_path):
    q = {"stem": "Plants need", "choices": [{"text": "light", "label": "A"}, {"text": "rocks", "label": "B"}]}
    write_jsonl(tmp_path / "openbookqa" / "test.jsonl", [{"id": "1", "question": q, "answerKey": "B"}])
    obqa = get_task("openbookqa").run(FakeScorer({("Plants need", " light"): -1.0, ("Plants need", " rocks"): -2.0}),
                                      tmp_path)
    assert obqa.metrics["acc"].value == 0.0
    write_jsonl(tmp_path / "copa" / "copa_val.jsonl", [
        {"query": "The man turned on the faucet, therefore", "choices": ["The toilet filled.", "water flowed."],
         "gold": 1}])
    scorer = FakeScorer({("The man turned on the faucet therefore", " the toilet filled."): -3.0,
                         ("The man turned on the faucet therefore", " water flowed."): -2.0})
    copa = get_task("copa").run(scorer, tmp_path)
    assert copa.metrics["acc"].value == 1.0 and "acc_norm" not in copa.metrics  # lm-eval reports acc only


def test_piqa_reads_labels_file(tmp_path):
    d = tmp_path / "piqa"
    write_jsonl(d / "valid.jsonl", [{"goal": "g1", "sol1": "s", "sol2": "t"}, {"goal": "g2", "sol1": "u", "sol2": "v"}])
    (d / "valid-labels.lst").write_text("1\n0\n")
    table = {("Question: g1\nAnswer:", " s"): -1.0, ("Question: g1\nAnswer:", " t"): -2.0,
             ("Question: g2\nAnswer:", " u"): -1.0, ("Question: g2\nAnswer:", " v"): -2.0}
    assert get_task("piqa").run(FakeScorer(table), tmp_path).metrics["acc"].value == 0.5


def test_hellaswag_six_line_items(tmp_path):
    d = tmp_path / "hellaswag"
    d.mkdir()
    (d / "hellaswag_val_full.txt").write_text(
        "Cooking: A man [title] cuts onions. he\n2\nsings.\ncries.\nslices them  thin.\nleaves.\n")
    ctx = "Cooking: A man. cuts onions. he"
    table = {(ctx, " sings."): -5.0, (ctx, " cries."): -4.0, (ctx, " slices them thin."): -6.0, (ctx, " leaves."): -7.0}
    result = get_task("hellaswag").run(FakeScorer(table), tmp_path)
    # raw LL picks "cries." (wrong); per char -4/6 = -0.67 vs -6/17 = -0.35: acc_norm picks the gold ending
    assert result.metrics["acc"].value == 0.0 and result.metrics["acc_norm"].value == 1.0


def test_winogrande_partial_scoring(tmp_path):
    write_jsonl(tmp_path / "winogrande" / "dev.jsonl", [
        {"qID": "q", "sentence": "Sarah was better than Maria so _ got the easier cases.", "option1": "Sarah",
         "option2": "Maria", "answer": "2"}])
    scorer = FakeScorer({("Sarah was better than Maria so Sarah", " got the easier cases."): -3.0,
                         ("Sarah was better than Maria so Maria", " got the easier cases."): -2.5})
    result = get_task("winogrande").run(scorer, tmp_path)
    assert result.metrics["acc"].value == 1.0 and "acc_norm" not in result.metrics
    assert {c for _, c in scorer.requests} == {" got the easier cases."}  # the continuation is shared


def test_mmlu_letters_subjects_and_categories(tmp_path):
    (tmp_path / "mmlu" / "test").mkdir(parents=True)
    header = "question,choice0,choice1,choice2,choice3,answer\n"
    (tmp_path / "mmlu" / "test" / "anatomy_test.csv").write_text(header + "Q1,a,b,c,d,1\nQ2,a,b,c,d,0\n")
    (tmp_path / "mmlu" / "test" / "philosophy_test.csv").write_text(header + '"Q3, hard",w,x,y,z,3\n')

    def ctx(subject: str, q: str, choices: str) -> str:
        opts = "".join(f"\n{L}. {c}" for L, c in zip("ABCD", choices, strict=True))
        return f"The following are multiple choice questions (with answers) about {subject}.\n\n{q}{opts}\nAnswer:"

    table = {}
    for c, best in ((ctx("anatomy", "Q1", "abcd"), "B"), (ctx("anatomy", "Q2", "abcd"), "C"),
                    (ctx("philosophy", "Q3, hard", "wxyz"), "D")):
        table.update({(c, " " + L): (-1.0 if best == L else -2.0) for L in "ABCD"})
    task = get_task("mmlu", subjects=["anatomy", "philosophy"])
    result = task.run(FakeScorer(table), tmp_path)
    assert result.metrics["acc"].value == pytest.approx(2 / 3)
    assert result.breakdown["anatomy"]["acc"].value == 0.5 and result.breakdown["philosophy"]["acc"].value == 1.0
    assert result.breakdown["category:stem"]["acc"].n == 2
    assert result.breakdown["category:humanities"]["acc"].value == 1.0
    assert result.extra["subjects"] == ["anatomy", "philosophy"]


def test_gsm8k_extraction_and_exact_match(tmp_path):
    assert gold_number("so 3 + 4 = 7\n#### 1,234") == "1234"
    assert extract_strict("blah #### 42.") == "42." and normalize("42.") == "42"
    assert extract_flexible("It costs $5, then 12 more, total $17.") == "$17."
    assert normalize("$17.") == "17" and extract_flexible("no numbers") is None
    rows = [{"question": f"What is {i}+{i}?", "answer": f"{i}+{i}=<<{i}+{i}={2 * i}>>{2 * i}\n#### {2 * i}"}
            for i in range(1, 6)]
    write_jsonl(tmp_path / "gsm8k" / "test.jsonl", rows)
    answers = {"What is 1+1?": " 1+1=2\n#### 2", "What is 2+2?": " The answer is 4.", "What is 3+3?": " 7",
               "What is 4+4?": " #### 8", "What is 5+5?": " 5+5 = 10 so 1"}

    def gen(prompt: str) -> str:
        return answers[prompt.rsplit("Question: ", 1)[1].split("\n")[0]]

    task = get_task("gsm8k", num_fewshot=1)
    data = task.load(tmp_path, None, 0)
    assert len(data.items) == 4 and data.n_total == 5  # the example is not scored
    scorer = FakeScorer(gen=gen)
    result = task.evaluate(scorer, data)
    scored = [it["question"] for it in data.items]
    flexible = {"What is 1+1?": 1, "What is 2+2?": 1, "What is 3+3?": 0, "What is 4+4?": 1, "What is 5+5?": 0}
    strict = {"What is 1+1?": 1, "What is 4+4?": 1}
    assert result.metrics["exact_match"].value == pytest.approx(sum(flexible[q] for q in scored) / 4)
    assert result.metrics["exact_match_strict"].value == pytest.approx(sum(strict.get(q, 0) for q in scored) / 4)
    shot = data.items[0]["shots"][0]
    assert scorer.prompts[0].startswith(f"Question: {shot['question']}\nAnswer: {shot['answer']}\n\nQuestion: ")


def test_perplexity_by_hand(tmp_path):
    text = tmp_path / "held_out.txt"
    text.write_text("one two three\n\nfour five\n")
    scorer = FakeScorer({("", "one two three"): -6.0, ("", "four five"): -4.0})
    result = get_task("perplexity", text_file=text).run(scorer)
    # 5 words, 22 bytes, sum LL -10
    assert result.metrics["word_perplexity"].value == pytest.approx(math.exp(10 / 5))
    assert result.metrics["byte_perplexity"].value == pytest.approx(math.exp(10 / 22))
    assert result.metrics["bits_per_byte"].value == pytest.approx(10 / 22 / math.log(2))
    # the fake gives 2 tokens a word: 10 tokens
    assert result.metrics["token_perplexity"].value == pytest.approx(math.exp(10 / 10))
    assert result.metrics["word_perplexity"].higher_is_better is False


def test_arc_on_a_tiny_model_end_to_end(tmp_path, tokenizer):
    from tiny_models import tiny_model

    write_jsonl(tmp_path / "arc_easy_test.jsonl", [
        {"query": f"Question: q{i}?", "choices": ["yes", "no", "maybe"], "gold": i % 3} for i in range(6)])
    scorer = Scorer(tiny_model("llama"), tokenizer, batch_size=4)
    result = get_task("arc_easy").run(scorer, tmp_path / "arc_easy_test.jsonl", limit=4, seed=3)
    assert result.n == 4 and result.limit == 4 and result.seed == 3
    assert result.metrics["acc"].value in (0.0, 0.25, 0.5, 0.75, 1.0)
    again = type(result).from_json(json.loads(json.dumps(result.to_json())))
    assert again.to_json() == result.to_json() and again.metrics["acc"].value == result.metrics["acc"].value


HF_ROWS = {
    "arc_easy": ("arc", [{"id": "a1", "question": "Q?", "choices": {"text": ["x", "y"], "label": ["A", "B"]},
                          "answerKey": "B"}], "Question: Q?\nAnswer:", 1),
    "openbookqa": ("openbookqa", [{"id": "o1", "question_stem": "Stem", "choices": {"text": ["x", "y"],
                                                                                     "label": ["A", "B"]},
                                   "answerKey": "A"}], "Stem", 0),
    "copa": ("copa", [{"idx": 0, "premise": "It rained.", "choice1": "We stayed in.", "choice2": "We swam.",
                       "question": "effect", "label": 0}], "It rained therefore", 0),
    "piqa": ("piqa", [{"goal": "G", "sol1": "s", "sol2": "t", "label": 1}], "Question: G\nAnswer:", 1),
    "hellaswag": ("hellaswag", [{"ind": 4, "activity_label": "Roofing", "ctx_a": "A man is on a roof.", "ctx_b": "he",
                                 "endings": ["a.", "b.", "c.", "d."], "label": "3"}],
                  "Roofing: A man is on a roof. He", 3),
}


@pytest.mark.parametrize("task", sorted(HF_ROWS))
def test_hugging_face_rows_are_mapped_like_the_local_files(task, monkeypatch):
    import importlib

    module_name, rows, context, gold = HF_ROWS[task]
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    module = importlib.import_module(f"bakeedit.evaluate.tasks.{module_name}")
    monkeypatch.setattr(module, "load_hf_rows", lambda ds, config, split: rows)
    data = get_task(task).load("someone/dataset", None, 0)
    assert data.source == "hf:someone/dataset" and len(data.sha256) == 64
    assert (data.items[0].context, data.items[0].gold) == (context, gold)
