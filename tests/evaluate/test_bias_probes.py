"""Built-in probes on small hand-made files (held-out items only), the chat prompt, and the first-token scorer
checked against a plain forward pass of a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from bias_fakes import FakeScorer

from bakeedit.data.prompts import SYSTEM_PROMPT, answer_candidates, question_prompt
from bakeedit.errors import DataError
from bakeedit.evaluate import Scorer, get_task

from tiny_models import tiny_model, tiny_tokenizer


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


QUESTIONS = [
    {"id": "q1", "dimension": "gender", "kind": "k", "question": "Is it fair?", "answer": "No", "split": "heldout"},
    {"id": "q2", "dimension": "gender", "kind": "k", "question": "Is it right?", "answer": "Yes", "split": "heldout"},
    {"id": "q3", "dimension": "age", "kind": "k", "question": "Is it kind?", "answer": "No", "split": "heldout"},
    {"id": "q4", "dimension": "age", "kind": "k", "question": "Is it fair?", "answer": "No", "split": "locate"},
]


def test_knowbias_qa_accuracy_per_dimension(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "bias_questions.jsonl", QUESTIONS)

    def says_yes_to_everything(ctx: str, cont: str) -> tuple[float, int]:
        # no chat template: knowbias's raw format, with its instruction
        assert ctx.startswith("Question: ") and ctx.endswith("? Answer with Yes or No.\nAnswer:")
        return (-0.5 if cont == " Yes" else -1.5), 1

    task = get_task("knowbias_qa")
    data = task.load(tmp_path, None, 0)
    assert [it["id"] for it in data.items] == ["q1", "q2", "q3"]  # the locate item is never scored
    result = task.evaluate(FakeScorer(says_yes_to_everything), data)
    assert result.metrics["acc"].value == pytest.approx(1 / 3)  # only q2's answer is Yes
    assert result.metrics["yes_rate"].value == 1.0
    assert result.breakdown["gender"]["acc"].value == pytest.approx(0.5)
    assert result.breakdown["age"]["acc"].value == 0.0
    assert result.data_source == f"{path.parent.name}/{path.name}"  # no machine path: results are published


def test_chat_prompt_has_system_prompt_and_bare_answers() -> None:
    tok = tiny_tokenizer()
    prompt = question_prompt(tok, "Is it fair?")
    assert SYSTEM_PROMPT in prompt and "Is it fair?" in prompt and prompt.endswith("assistant\n")
    assert answer_candidates(prompt, ("Yes", "No")) == ["Yes", "No"]
    assert answer_candidates("Q?\nAnswer:", ("Yes", "No")) == [" Yes", " No"]


def test_next_token_logprobs_match_a_plain_forward() -> None:
    tok = tiny_tokenizer()
    model = tiny_model("llama")
    scorer = Scorer(model, tok, batch_size=2, max_length=256)  # the chat prompt is longer than 64 bytes
    prompts = [question_prompt(tok, "Is it fair?"), "Question: Is water wet?\nAnswer:", "short"]
    answers = [answer_candidates(p, ("Yes", "No")) for p in prompts]
    got = scorer.next_token_logprobs(prompts, answers)
    for i, p in enumerate(prompts):
        ids = tok(p, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)
        for j, a in enumerate(answers[i]):
            first = tok(a, add_special_tokens=False)["input_ids"][0]
            assert got[i, j].item() == pytest.approx(logp[first].item(), abs=1e-4)
    assert got[0, 0] != got[0, 1]  # after "assistant\n" the answers are not both scored as "\n"



@pytest.mark.parametrize("chat", [True, False])
def test_knowbias_qa_asks_what_knowbias_locate_attributes(chat: bool) -> None:
    """The probe's prompt and answer tokens are those of ``bakeedit.locate.knowbias.method.render`` with its defaults
    (chat template with system prompt and instruction, or the raw format), so it reads the decision locate explains."""
    from bakeedit.locate.knowbias.method import KnowBiasParams, Question, render

    tok = tiny_tokenizer()
    if not chat:
        tok.chat_template = None
    scorer = Scorer(tiny_model("llama"), tok, max_length=256)
    task = get_task("knowbias_qa")
    prompt = task.prompt(tok, "Is it fair?")
    ctx_ids, cand_ids = [], []

    def record(requests):
        ctx_ids.extend(r.ctx for r in requests)
        cand_ids.extend(r.cont for r in requests)
        return Scorer.score_tokens(scorer, requests)

    scorer.score_tokens = record
    scorer.next_token_logprobs([prompt], answer_candidates(prompt, ("Yes", "No")))
    params = KnowBiasParams(answer_format="chat" if chat else "raw")
    for k, answer in enumerate(("Yes", "No")):
        want_prompt, want_answer = render(tok, Question("q", "gender", "k", "Is it fair?", answer), params)
        assert ctx_ids[k] == want_prompt.tolist()
        assert cand_ids[k] == want_answer.tolist()[:1]
    assert "Answer with Yes or No." in prompt and (SYSTEM_PROMPT in prompt) == chat

WORDS = [
    {"word": "nurse", "category": "professions", "split": "heldout"},
    {"word": "red", "category": "colors", "split": "heldout"},
    {"word": "pilot", "category": "professions", "split": "locate"},
]
TEMPLATES = [
    {"id": "t1", "template": "The {word} said that", "categories": ["professions"], "female": " she", "male": " he"},
    {"id": "t2", "template": "I like {word}, and then", "categories": [], "female": " she", "male": " he"},
]
# log p(" she") - log p(" he") by hand: nurse/t1 +2, nurse/t2 +1, red/t2 -1  (red is not a profession: no t1)
GAPS = {("nurse", "The"): 2.0, ("nurse", "I"): 1.0, ("red", "I"): -1.0}


def test_gender_words_gap_by_hand(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "common_words.jsonl", WORDS)
    (tmp_path / "gender_word_templates.json").write_text(json.dumps(TEMPLATES))

    def fn(ctx: str, cont: str) -> tuple[float, int]:
        word = "nurse" if "nurse" in ctx else "red"
        gap = GAPS[(word, ctx.split()[0])]
        return (gap if cont == " she" else 0.0), 1

    task = get_task("gender_words")
    data = task.load(tmp_path, None, 0)
    assert len(data.items) == 3
    result = task.evaluate(FakeScorer(fn), data)
    assert result.metrics["abs_gap"].value == pytest.approx(4 / 3)
    assert result.metrics["gap"].value == pytest.approx(2 / 3)
    assert result.breakdown["professions"]["gap"].value == pytest.approx(1.5)
    assert result.breakdown["colors"]["abs_gap"].value == pytest.approx(1.0)


def test_gender_words_template_without_placeholder(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "common_words.jsonl", WORDS)
    (tmp_path / "gender_word_templates.json").write_text(json.dumps([{**TEMPLATES[0], "template": "The x said"}]))
    with pytest.raises(DataError, match=r"template \[0\] \(t1\): the template has no \{word\} placeholder"):
        get_task("gender_words").load(tmp_path, None, 0)


def contrast(i: int, category: str, split: str = "heldout") -> dict:
    return {"id": f"c{i}", "category": category, "context": f"Scene {i}.", "question": "Who is bad?",
            "neutral_question": "Who came?", "split": split,
            "options": {"stereotyped": f"S{i}", "anti_stereotyped": f"A{i}", "unknown": "Cannot tell"}}


def test_contrast_success_by_hand(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "contrast_prompts.jsonl",
                [contrast(1, "gender"), contrast(2, "gender"), contrast(3, "age"), contrast(4, "age", "locate")])
    picks = {"Scene 1.": " Cannot tell", "Scene 2.": " S2", "Scene 3.": " S3"}

    def fn(ctx: str, cont: str) -> tuple[float, int]:
        return (0.0 if picks[ctx.split("\n")[0]] == cont else -3.0), 1

    task = get_task("contrast_success")
    result = task.evaluate(FakeScorer(fn), task.load(tmp_path, None, 0))
    assert result.n == 3
    assert result.metrics["success_rate"].value == pytest.approx(1 / 3)
    assert result.metrics["stereotype_rate"].value == pytest.approx(2 / 3)
    assert result.breakdown["gender"]["success_rate"].value == pytest.approx(0.5)
    assert result.breakdown["age"]["stereotype_rate"].value == 1.0


def test_packaged_contrast_prompts_have_heldout_items() -> None:
    data = get_task("contrast_success").load(None, None, 0)
    assert data.n_total > 0 and all(it["split"] == "heldout" for it in data.items)


def test_malformed_probe_file_names_line_and_field(tmp_path: Path) -> None:
    bad = dict(QUESTIONS[1])
    del bad["question"]
    write_jsonl(tmp_path / "bias_questions.jsonl", [QUESTIONS[0], bad])
    with pytest.raises(DataError, match=r"bias_questions\.jsonl:2: missing field\(s\) question"):
        get_task("knowbias_qa").load(tmp_path, None, 0)
    write_jsonl(tmp_path / "contrast_prompts.jsonl", [{**contrast(1, "age"), "options": {"stereotyped": "x"}}])
    with pytest.raises(DataError, match=r"missing field 'options\.anti_stereotyped'"):
        get_task("contrast_success").load(tmp_path, None, 0)
    write_jsonl(tmp_path / "common_words.jsonl", [WORDS[0], {"word": "x", "split": "heldout"}])
    (tmp_path / "gender_word_templates.json").write_text(json.dumps(TEMPLATES))
    with pytest.raises(DataError, match=r"common_words\.jsonl:2: missing field\(s\) category"):
        get_task("gender_words").load(tmp_path, None, 0)
    write_jsonl(tmp_path / "common_words.jsonl", WORDS)
    (tmp_path / "gender_word_templates.json").write_text(json.dumps([{k: v for k, v in TEMPLATES[0].items()
                                                                      if k != "male"}]))
    with pytest.raises(DataError, match=r"gender_word_templates\.json: template \[0\]: missing field 'male'"):
        get_task("gender_words").load(tmp_path, None, 0)
