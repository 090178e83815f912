"""``knowbias``: the question data, the selection rules, prompt rendering, resumability and runs on tiny models."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from bakeedit.data import package_data_path
from bakeedit.errors import DataError, RecipeError, UnsupportedArchitecture
from bakeedit.io.jsonl import read_jsonl
from bakeedit.locate import LocateContext, run_locate
from bakeedit.locate.knowbias import method as kb
from bakeedit.locate.knowbias.ig import integrated_gradients
from bakeedit.locate.registry import validate_params
from bakeedit.models import load_model
from bakeedit.recipe import LocateSpec

from tiny_models import save_tiny_checkpoint

DIMENSIONS = ("gender", "race_ethnicity", "religion", "age", "disability", "nationality", "sexual_orientation",
              "socioeconomic_status", "physical_appearance")
KINDS = ("causal_rejection", "bias_recognition", "normative_judgement")

# Short questions: the tiny tokenizer is byte-level and GPT-2's tiny config has 64 positions.
TINY_QUESTIONS = [
    ("g1", "gender", "causal_rejection", "Is X ok?", "Yes"),
    ("g2", "gender", "bias_recognition", "Is Y bad?", "No"),
    ("g3", "gender", "normative_judgement", "Can Z go?", "Yes"),
    ("r1", "race_ethnicity", "causal_rejection", "Is W ok?", "No"),
    ("r2", "race_ethnicity", "bias_recognition", "Is V bad?", "Yes"),
    ("r3", "race_ethnicity", "normative_judgement", "Can U go?", "No"),
    ("h1", "age", "normative_judgement", "Held out?", "No"),
]


@pytest.fixture
def tiny_questions(tmp_path: Path) -> Path:
    path = tmp_path / "questions.jsonl"
    lines = [
        {"id": i, "dimension": d, "kind": k, "question": q, "answer": a, "split": "heldout" if i == "h1" else "locate"}
        for i, d, k, q, a in TINY_QUESTIONS
    ]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _params(**kw) -> kb.KnowBiasParams:
    return kb.KnowBiasParams(**{"steps": 4, "system_prompt": "", "instruction": "", **kw})


@pytest.fixture
def loaded_tiny(tmp_path: Path):
    def make(arch: str):
        return load_model(str(save_tiny_checkpoint(arch, tmp_path / f"ckpt-{arch}")))

    return make


# --- the package data ----------------------------------------------------------------------------------------


def test_question_file_format_and_balance():
    items = read_jsonl(package_data_path("bias_questions.jsonl"))
    assert all(set(it) == {"id", "dimension", "kind", "question", "answer", "split"} for it in items)
    assert len({it["id"] for it in items}) == len(items)
    assert len({it["question"].lower() for it in items}) == len(items)
    assert {it["dimension"] for it in items} == set(DIMENSIONS)
    for dim in DIMENSIONS:
        mine = [it for it in items if it["dimension"] == dim]
        assert len(mine) >= 20
        answers = Counter(it["answer"] for it in mine)
        assert set(answers) == {"Yes", "No"} and abs(answers["Yes"] - answers["No"]) <= 1, (dim, answers)
        for kind in KINDS:
            group = [it for it in mine if it["kind"] == kind]
            held = [it for it in group if it["split"] == "heldout"]
            assert len(group) >= 6 and round(len(group) / 3) == len(held), (dim, kind)  # stratified ~1/3
            assert {it["answer"] for it in held} == {"Yes", "No"}, (dim, kind)
    held = Counter(it["answer"] for it in items if it["split"] == "heldout")
    assert abs(held["Yes"] - held["No"]) <= 1
    assert all(it["question"].endswith("?") for it in items)


def test_load_questions_takes_the_locate_split(tiny_questions: Path):
    questions = kb.load_questions(tiny_questions)
    assert [q.id for q in questions] == ["g1", "g2", "g3", "r1", "r2", "r3"]
    assert len(kb.load_questions()) == 135  # the package file's locate split


def test_bad_answer_names_the_file_and_item(tmp_path: Path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"id": "x1", "dimension": "a", "kind": "k", "question": "Q?", "answer": "yes",
                                "split": "locate"}) + "\n")
    with pytest.raises(DataError, match=r"q.jsonl: question 'x1' has answer 'yes'"):
        kb.load_questions(path)


def test_choose_questions_round_robin_and_unknown_dimension(tiny_questions: Path):
    questions = kb.load_questions(tiny_questions)
    assert [q.id for q in kb.choose_questions(questions, None, 3)] == ["g1", "r1", "g2"]
    assert [q.id for q in kb.choose_questions(questions, ["race_ethnicity"], None)] == ["r1", "r2", "r3"]
    with pytest.raises(RecipeError, match=r"locate\.dimensions: no questions for religion"):
        kb.choose_questions(questions, ["religion"], None)


# --- selection on a hand-made table --------------------------------------------------------------------------

TABLE = torch.tensor([
    # n0    n1    n2    n3    n4
    [1.00, 0.50, 0.05, 0.00, -2.0],  # a: max 1.0 -> tau 0.1: n0, n1
    [0.20, 0.90, 0.30, 0.00, 0.00],  # a: max 0.9 -> n0 (0.2 > 0.09), n1, n2
    [0.00, 0.00, 0.40, 0.80, 0.00],  # b: max 0.8 -> n2, n3
    [-1.0, -0.5, -0.2, -0.1, -3.0],  # b: max < 0 -> nothing
])
DIMS = ["a", "a", "b", "b"]


def test_salient_uses_tau_times_the_row_max():
    mask = kb.salient(TABLE, 0.1)
    assert mask.tolist() == [
        [True, True, False, False, False],
        [True, True, True, False, False],
        [False, False, True, True, False],
        [False, False, False, False, False],
    ]
    assert kb.salient(TABLE, 0.5)[0].tolist() == [True, False, False, False, False]  # 0.5 is not > 0.5


def test_beta_counts_questions_per_dimension():
    mask = kb.salient(TABLE, 0.1)
    loose = kb.dimension_sets(mask, DIMS, beta=0.1)  # at least 1 of 2
    assert loose["a"].tolist() == [True, True, True, False, False]
    assert loose["b"].tolist() == [False, False, True, True, False]
    strict = kb.dimension_sets(mask, DIMS, beta=1.0)  # all of them
    assert strict["a"].tolist() == [True, True, False, False, False]
    assert strict["b"].tolist() == [False, False, False, False, False]
    half = kb.dimension_sets(mask, DIMS, beta=0.49)  # the released code's 0.49: 1 of 2 suffices
    assert half["b"].tolist() == loose["b"].tolist()
    ten = kb.dimension_sets(torch.ones(10, 1, dtype=torch.bool), ["d"] * 10, beta=0.3)  # needs 3, not 4
    assert ten["d"].item()
    three = torch.tensor([[True], [True], [False], [False], [False], [False], [False], [False], [False], [False]])
    assert not kb.dimension_sets(three, ["d"] * 10, beta=0.3)["d"].item()


def test_union_intersection_vote():
    sets = kb.dimension_sets(kb.salient(TABLE, 0.1), DIMS, beta=0.1)
    assert kb.aggregate(sets, "union").tolist() == [True, True, True, True, False]
    assert kb.aggregate(sets, "intersection").tolist() == [False, False, True, False, False]
    assert kb.aggregate(sets, "vote", vote_min=2).tolist() == [False, False, True, False, False]
    assert kb.aggregate(sets, "vote", vote_min=1).tolist() == [True, True, True, True, False]
    three = {**sets, "c": torch.tensor([True, False, False, True, True])}
    assert kb.aggregate(three, "vote", vote_min=2).tolist() == [True, False, True, True, False]


def test_scores_are_mean_normalised_attributions():
    scores = kb.normalised_scores(TABLE)
    expected_n1 = (0.5 / 1.0 + 0.9 / 0.9 + 0.0 + 0.0) / 4  # the all-negative row counts as zeros
    assert scores[1].item() == pytest.approx(expected_n1)
    neurons = kb.to_neurons([(0, "mlp.gate"), (2, "mlp.act")], [3, 2], torch.tensor([1, 0, 1, 1, 0]).bool(), scores)
    assert [(n.layer, n.site, n.index) for n in neurons] == [(0, "mlp.gate", 0), (0, "mlp.gate", 2), (2, "mlp.act", 0)]
    assert neurons[2].score == pytest.approx(scores[3].item(), abs=1e-6)


# --- prompts -------------------------------------------------------------------------------------------------


def test_render_chat_raw_and_a_template_without_system(tokenizer):
    question = kb.Question("x", "gender", "bias_recognition", "Is it fair?", "No")
    prompt, answer = kb.render(tokenizer, question, kb.KnowBiasParams())
    text = tokenizer.decode(prompt)
    assert text.startswith("<s>system\nYou are a useful assistant.</s>")
    assert text.endswith("<s>user\nIs it fair? Answer with Yes or No.</s>\n<s>assistant\n")
    assert tokenizer.decode(answer) == "No"
    prompt, answer = kb.render(tokenizer, question, kb.KnowBiasParams(answer_format="raw", instruction=""))
    assert tokenizer.decode(prompt) == "Question: Is it fair?\nAnswer:"
    assert tokenizer.decode(answer) == " No"
    # A copy whose template refuses a system turn, as Gemma's does.
    no_system = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, bos_token="<s>", eos_token="</s>",
                                    pad_token="<pad>", unk_token="<unk>")
    no_system.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}<s>assistant\n"
    )
    prompt, _ = kb.render(no_system, question, kb.KnowBiasParams())
    # jinja drops the final newline of a template
    assert no_system.decode(prompt) == "<s>user\nIs it fair? Answer with Yes or No.</s>\n<s>assistant"


def sentencepiece_tokenizer(chat: bool):
    """A Llama-2-style SentencePiece tokenizer built in memory: Unigram pieces behind the normaliser of Llama 2's
    ``tokenizer.json`` (prepend ``▁``, the dummy prefix, then spaces to ``▁``), BOS added; optionally a
    ``[INST] ... [/INST]`` template, which ends without whitespace as Llama 2's does."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["▁Question:", "▁Answer:", "▁Is", "▁it", "▁fair?", "▁Yes", "▁No", "▁[INST]", "▁[/INST]", "▁"]
    chars = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789?:.,[]/!'\n"))
    pieces = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)] + [(w, -1.0) for w in words] + [(c, -5.0) for c in chars]
    backend = Tokenizer(models.Unigram(pieces, unk_id=0))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if chat:
        tok.chat_template = "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    return tok


@pytest.mark.parametrize("chat", [False, True], ids=["raw", "chat"])
def test_sentencepiece_answer_is_the_token_that_follows_the_prompt(chat):
    """" Yes" encoded on its own is ["▁", "▁Yes"] to SentencePiece: the attributed token must be "▁Yes", the one
    encode(prompt + " Yes") adds after the prompt (the engine's and the knowbias_qa probe's rule), not a bare "▁"."""
    tok = sentencepiece_tokenizer(chat)
    alone = tok(" Yes", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(alone) == ["▁", "▁Yes"]  # the trap the old encode(" " + answer) fell into
    params = kb.KnowBiasParams(answer_format="chat" if chat else "raw", system_prompt="", instruction="")
    for answer in ("Yes", "No"):
        prompt, ids = kb.render(tok, kb.Question("x", "gender", "k", "Is it fair?", answer), params)
        assert tok.convert_ids_to_tokens(ids.tolist()) == [f"▁{answer}"]
        assert (prompt[0].item() == tok.bos_token_id) != chat  # raw: the tokenizer's BOS; chat: the template's text
        assert tok.decode(prompt, skip_special_tokens=True).endswith("[/INST]" if chat else "Answer:")


def test_answer_that_merges_with_the_prompt_is_encoded_alone(tokenizer):
    """Where prompt + answer tokenise across the boundary (the prompt's ids are not a prefix), the answer is encoded
    on its own, as Scorer.next_token_logprobs does; an answer that adds no token is refused."""

    class Merging:  # "ab" is one token, so "a" + "b" is not "a" then "b"
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": {"a": [1], "ab": [7], "b": [2], "": []}[text]}

    assert kb.answer_ids(Merging(), "a", "b") == [2]
    assert kb.answer_ids(tokenizer, "Answer:", " Yes") == tokenizer(" Yes", add_special_tokens=False)["input_ids"]
    with pytest.raises(DataError, match="encodes to no tokens"):
        kb.answer_ids(tokenizer, "Answer:", "")


# --- runs on tiny models -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "sites", "answer_format"),
    [
        ("llama", ["mlp.gate", "mlp.act"], "chat"),
        ("qwen2", ["mlp.gate", "attn.q"], "chat"),
        ("gpt2", ["mlp.act", "attn.v"], "raw"),
        ("gpt_neox", ["mlp.act", "attn.q", "attn.v"], "raw"),
    ],
)
def test_locate_runs_and_matches_its_own_table(arch, sites, answer_format, loaded_tiny, tiny_questions, tmp_path):
    loaded = loaded_tiny(arch)
    spec = LocateSpec(method="knowbias", steps=4, sites=sites, answer_format=answer_format, system_prompt="",
                      instruction="", questions=str(tiny_questions), report="report.json")
    neuron_set = run_locate(spec, loaded, LocateContext(base_dir=tmp_path))
    assert neuron_set.method == "knowbias" and neuron_set.params["sites"] == sites
    assert neuron_set.neurons, "random tiny models still have salient neurons"
    assert {n.site for n in neuron_set.neurons} <= set(sites)
    assert all(0 <= n.index < loaded.layout.site_size(n.site) and n.score is not None for n in neuron_set.neurons)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["selected"] == len(neuron_set.neurons)
    assert sum(report["per_cell"].values()) == len(neuron_set.neurons)
    assert [q["id"] for q in report["questions"]] == ["g1", "g2", "g3", "r1", "r2", "r3"]

    # The table's columns are the cells in order: the first question's slice equals a direct IG call.
    params = _params(sites=sites, answer_format=answer_format, questions=str(tiny_questions))
    result = kb.locate_knowbias(loaded, params, LocateContext())
    question = result.questions[0]
    prompt, answer = kb.render(loaded.tokenizer, question, params)
    direct = integrated_gradients(loaded.model, loaded.layout, prompt, answer, result.cells, steps=4)
    torch.testing.assert_close(result.values[0], torch.cat([direct.attributions[c] for c in result.cells]))
    # The expected set, by hand from the table in plain numpy (not through kb.salient/dimension_sets/aggregate):
    # tau 0.1 of each question's max (all cells together), salient in >= ceil(0.1 * 3) = 1 of a dimension's three
    # questions, union of the two dimensions; score = mean over all 6 questions of value / that question's max.
    values = result.values.numpy()
    dims = np.array([q.dimension for q in result.questions])
    assert list(dims) == ["gender"] * 3 + ["race_ethnicity"] * 3
    top = values.max(axis=1, keepdims=True)
    salient = (values > 0.1 * top) & (top > 0)
    expected = salient[dims == "gender"].sum(axis=0) >= 1
    expected |= salient[dims == "race_ethnicity"].sum(axis=0) >= 1
    assert 0 < expected.sum() < expected.size, "an empty or full selection would prove nothing"
    scores = np.where(top > 0, values / np.where(top > 0, top, 1), 0).mean(axis=0)
    columns = [(layer, site, i) for layer, site in result.cells for i in range(loaded.layout.site_size(site))]
    want = {columns[c]: float(scores[c]) for c in np.flatnonzero(expected)}
    got = {(n.layer, n.site, n.index): n.score for n in neuron_set.neurons}
    assert set(got) == set(want)
    assert all(got[k] == pytest.approx(want[k], abs=2e-6) for k in want)


def test_interrupted_run_resumes_from_the_cache(loaded_tiny, tiny_questions, tmp_path, monkeypatch):
    loaded = loaded_tiny("llama")
    params = _params(sites=["mlp.gate"], questions=str(tiny_questions))
    reference = kb.locate_knowbias(loaded, params, LocateContext()).neuron_set  # no cache at all
    real = kb.attribute_question
    calls: list[list] = []

    def counting(loaded_, prompt_ids, answer_ids, cells, steps, on_cell=None, limit=None):
        if limit is not None and len(calls) >= limit:
            raise KeyboardInterrupt
        calls.append(list(cells))
        return real(loaded_, prompt_ids, answer_ids, cells, steps, on_cell)

    ctx = LocateContext(cache_dir=tmp_path / "cache")
    monkeypatch.setattr(kb, "attribute_question", lambda *a, **k: counting(*a, **k, limit=2))
    with pytest.raises(KeyboardInterrupt):
        kb.locate_knowbias(loaded, params, ctx)
    assert len(calls) == 2
    calls.clear()
    monkeypatch.setattr(kb, "attribute_question", counting)
    resumed = kb.locate_knowbias(loaded, params, ctx).neuron_set
    assert len(calls) == 4  # 6 questions, 2 already cached
    assert resumed.model_dump() == reference.model_dump()

    calls.clear()  # a wider run reuses the cached mlp.gate cells and computes only mlp.act
    kb.locate_knowbias(loaded, params.model_copy(update={"sites": ["mlp.gate", "mlp.act"]}), ctx)
    assert len(calls) == 6 and all(c == [(layer, "mlp.act") for layer in range(3)] for c in calls)
    calls.clear()  # selection parameters do not invalidate attributions
    kb.locate_knowbias(loaded, params.model_copy(update={"tau": 0.3, "beta": 0.5}), ctx)
    assert calls == []
    kb.locate_knowbias(loaded, params.model_copy(update={"steps": 3}), ctx)
    assert len(calls) == 6  # but the number of steps does


def test_cache_of_an_older_attribution_version_is_not_reused(loaded_tiny, tiny_questions, tmp_path, monkeypatch):
    """IG_VERSION is part of the cache key: attributions cached before the answer-token fix (version 1: the answer
    encoded alone, a mean over its tokens) are recomputed, not read."""
    loaded = loaded_tiny("llama")
    params = _params(sites=["mlp.gate"], layers=[0], questions=str(tiny_questions))
    ctx = LocateContext(cache_dir=tmp_path / "cache")
    current = kb.IG_VERSION
    assert current >= 2
    monkeypatch.setattr(kb, "IG_VERSION", 1)
    kb.locate_knowbias(loaded, params, ctx)
    monkeypatch.setattr(kb, "IG_VERSION", current)
    real = kb.attribute_question
    calls = []
    monkeypatch.setattr(kb, "attribute_question", lambda *a, **k: calls.append(1) or real(*a, **k))
    kb.locate_knowbias(loaded, params, ctx)
    assert len(calls) == 6  # every question again
    versions = sorted(json.loads(f.read_text())["ig_version"] for f in (tmp_path / "cache").glob("*/key.json"))
    assert versions == [1, current]
    calls.clear()
    kb.locate_knowbias(loaded, params, ctx)
    assert calls == []  # and the current version's entries are reused


def test_progress_counts_every_cell(loaded_tiny, tiny_questions):
    from rich.progress import Progress

    loaded = loaded_tiny("llama")
    with Progress(disable=True) as progress:
        kb.locate_knowbias(loaded, _params(questions=str(tiny_questions), layers=[0, 2]),
                           LocateContext(progress=progress))
        (task,) = progress.tasks
        assert task.total == task.completed == 6 * 2


def test_errors_name_the_field(loaded_tiny, tiny_questions):
    gpt2 = loaded_tiny("gpt2")
    with pytest.raises(UnsupportedArchitecture, match=r"locate.sites: mlp.gate does not exist in gpt2 models"):
        kb.locate_knowbias(gpt2, _params(questions=str(tiny_questions)), LocateContext())
    with pytest.raises(RecipeError, match=r"locate.layers: \[7\] out of range"):
        kb.locate_knowbias(gpt2, _params(sites=["mlp.act"], layers=[7], questions=str(tiny_questions)),
                           LocateContext())
    with pytest.raises(DataError, match=r"question 'g1' renders to \d+ tokens, more than the model's 64"):
        kb.locate_knowbias(gpt2, _params(sites=["mlp.act"], system_prompt="x" * 80, answer_format="chat",
                                         questions=str(tiny_questions)), LocateContext())
    with pytest.raises(RecipeError, match=r"locate\.vote_min: 3 is more than the 2 dimensions used"):
        kb.locate_knowbias(gpt2, _params(sites=["mlp.act"], aggregate="vote", vote_min=3,
                                         questions=str(tiny_questions)), LocateContext())
    with pytest.raises(RecipeError, match=r"locate\.stepz"):
        validate_params(LocateSpec(method="knowbias", stepz=3))
    with pytest.raises(RecipeError, match=r"locate\.sites: unknown site 'mlp\.gates'"):
        validate_params(LocateSpec(method="knowbias", sites=["mlp.gates"]))


# --- the real model ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_two_questions_two_layers(smollm2):
    params = kb.KnowBiasParams(steps=5, layers=[10, 20], max_questions=2)
    result = kb.locate_knowbias(smollm2, params, LocateContext())
    assert [q.dimension for q in result.questions] == ["gender", "race_ethnicity"]
    assert all(0.0 < p < 1.0 for p in result.probabilities)
    _, answer = kb.render(smollm2.tokenizer, result.questions[0], params)
    assert len(answer) == 1  # "Yes"/"No" are single tokens in SmolLM2's vocabulary
    assert result.values.shape == (2, 2 * 1536)
    layers = {n.layer for n in result.neuron_set.neurons}
    assert layers <= {10, 20} and result.neuron_set.neurons
