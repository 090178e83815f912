"""The batched scorer equals the straightforward per-example loop, on every tiny architecture and on SmolLM2."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from bakeedit.evaluate.batching import TokenRequest, shared_batches
from bakeedit.evaluate.engine import Scorer
from bakeedit.evaluate.generation import MIN_SHARED_PREFIX, _common_prefix_len

from tiny_models import tiny_model

# Shared contexts (several options), a trailing space to move, an empty context, a one-byte context, and a context
# longer than gemma3_text's 16-token sliding window.
CONTEXTS = ["Question: what is 2+2?\nAnswer:", "The cat sat on the ", "x", "", "A longer context that goes on a bit"]
CONTINUATIONS = [" four", " five hundred", "mat"]
# The lettered options differ only in their last token (" A" is two byte tokens): the flat strategy shares their row.
REQUESTS = [(c, o) for c in CONTEXTS for o in CONTINUATIONS] + [("Other", " thing"), ("Pick:", " A"), ("Pick:", " B")]


@dataclass
class Reference:
    logprob: float
    n_tokens: int
    is_greedy: bool


def loglikelihood_reference(model, tokenizer, requests, max_length: int | None = None) -> list[Reference]:
    """log P(continuation | context), written out independently of the engine: the tokenizer called directly,
    one unpadded sequence per request, a plain ``log_softmax``.

    lm-eval's conventions, spelled out here: trailing whitespace of the context moves to the continuation; the
    continuation's tokens are what ``tokenizer(context + continuation)`` adds after ``tokenizer(context)``; an
    empty context is the BOS token (EOS without one); with ``max_length`` the sequence keeps its newest
    ``max_length + 1`` tokens."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    adds_bos = tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][:1] == [bos]
    out = []
    for context, continuation in requests:
        stripped = context.rstrip()
        continuation = context[len(stripped):] + continuation
        if stripped:
            ctx = tokenizer(stripped, add_special_tokens=False)["input_ids"]
            whole = tokenizer(stripped + continuation, add_special_tokens=False)["input_ids"]
            cont = whole[len(ctx):]
            ctx = [bos, *ctx] if adds_bos else ctx
        else:
            ctx, cont = [bos], tokenizer(continuation, add_special_tokens=False)["input_ids"]
        seq = ctx + cont
        if max_length is not None:
            seq = seq[-(max_length + 1):]
        with torch.no_grad():
            logits = model(torch.tensor([seq[:-1]])).logits[0]
        # float64: torch's float32 log_softmax on CPU is biased by ~8e-6 per token at SmolLM2's logit scale (~30),
        # which over 12 tokens alone exceeds the 1e-4 tolerance; in float64 the reference adds no error of its own
        logp = torch.log_softmax(logits.double(), dim=-1)
        first = len(seq) - 1 - len(cont)  # the position that predicts the first continuation token
        total, greedy = 0.0, True
        for j, token in enumerate(cont):
            total += float(logp[first + j, token])
            greedy &= int(logp[first + j].argmax()) == token
        out.append(Reference(total, len(cont), greedy))
    return out


def _max_diff(a, b) -> float:
    return max(abs(x.logprob - y.logprob) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3_text", "gpt_neox"])
def test_batched_equals_per_example_loop(arch, tokenizer):
    """Rotary (llama), learned absolute positions (gpt2: a position-id slip shows at once), a sliding window shorter
    than the longest context (gemma3_text), partial rotary and parallel residual (gpt_neox). The other architectures
    pass too (checked by hand once); they are left out to keep CI fast."""
    tiny = tiny_model(arch)
    # batch_size 2 < 3 options: groups get split, batches mix lengths, padding is exercised
    ref = loglikelihood_reference(tiny, tokenizer, REQUESTS)
    for mode in ("packed", "kv", "flat"):
        got = Scorer(tiny, tokenizer, batch_size=2, mode=mode).loglikelihood(REQUESTS)
        assert _max_diff(ref, got) <= 1e-4, mode
        assert [r.is_greedy for r in got] == [r.is_greedy for r in ref]
        assert [r.n_tokens for r in got] == [r.n_tokens for r in ref]
        assert all(r.logprob < 0 for r in got)


def test_tokenization_moves_context_whitespace(tokenizer):
    scorer = Scorer(tiny_model("llama"), tokenizer)
    (req,) = scorer.tokenize_requests([("The cat sat on the ", "mat")])
    assert req.ctx == scorer.encode("The cat sat on the")
    assert req.cont == scorer.encode(" mat")
    assert req.n_chars == 3  # characters of the continuation as given
    (empty,) = scorer.tokenize_requests([("", "hi")])
    assert empty.ctx == [tokenizer.bos_token_id] and empty.cont == scorer.encode("hi")


def test_shared_contexts_run_once(tokenizer):
    scorer = Scorer(tiny_model("llama"), tokenizer, batch_size=8)
    batches = list(shared_batches(scorer.tokenize_requests(REQUESTS), 8))
    groups = [g for b in batches for g in b]
    assert len(groups) == len(CONTEXTS) + 2  # one group (one prefix pass row) per distinct context
    assert all(sum(len(g) for g in b) <= 8 for b in batches)
    assert sorted(r.index for g in groups for r in g) == list(range(len(REQUESTS)))


def test_sentence_logprob_and_next_token(tokenizer):
    model = tiny_model("qwen2")
    scorer = Scorer(model, tokenizer, batch_size=4)
    texts = ["Hello world.", "a", "Nurses are kind."]
    sent = scorer.sentence_logprob(texts)
    ref = loglikelihood_reference(model, tokenizer, [("", t) for t in texts])
    assert _max_diff(sent, ref) <= 1e-4
    assert [r.n_tokens for r in sent] == [len(scorer.encode(t)) for t in texts]
    # next_token_logprobs of one-token candidates is the log-likelihood of that token
    prompts, cands = ["The nurse said that", "x"], [" ", "!", "h"]
    ntl = scorer.next_token_logprobs(prompts, cands)
    ll = scorer.loglikelihood([(p, c) for p in prompts for c in cands])
    assert ntl.shape == (2, 3)
    assert torch.allclose(ntl.flatten(), torch.tensor([r.logprob for r in ll]), atol=1e-4)



def test_next_token_logprobs_keep_prompt_whitespace_and_one_bos(tokenizer):
    model = tiny_model("llama")
    scorer = Scorer(model, tokenizer, batch_size=2)
    # after a prompt ending in "\n" the two answers are their own first tokens, not the moved "\n" twice
    got = scorer.next_token_logprobs(["Q?\n", "Q?\nA:"], [["Yes", "No"], [" Yes", " No"]])
    with torch.no_grad():
        for i, prompt in enumerate(["Q?\n", "Q?\nA:"]):
            logp = torch.log_softmax(model(torch.tensor([scorer.encode(prompt)])).logits[0, -1].float(), -1)
            for j, cand in enumerate((["Yes", "No"], [" Yes", " No"])[i]):
                assert got[i, j].item() == pytest.approx(logp[scorer.encode(cand)[0]].item(), abs=1e-4)
    assert got[0, 0] != got[0, 1]
    # a model that wants BOS gets exactly one, whether or not the (chat-templated) text already starts with it
    bos_scorer = Scorer(model, tokenizer, add_bos_token=True)
    with_bos, without = bos_scorer.next_token_logprobs([tokenizer.bos_token + "hi", "hi"], [" a", " b"])
    assert torch.equal(with_bos, without)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([[tokenizer.bos_token_id, *scorer.encode("hi")]])).logits[0, -1],
                                 -1)
    assert without[0].item() == pytest.approx(logp[scorer.encode(" a")[0]].item(), abs=1e-4)
    with pytest.raises(ValueError, match="same, non-zero number"):
        scorer.next_token_logprobs(["a", "b"], [["x"], ["y", "z"]])

def test_is_greedy_marks_the_argmax_continuation(tokenizer):
    model = tiny_model("llama")
    scorer = Scorer(model, tokenizer)
    ctx = scorer.encode("Once upon a time")
    with torch.no_grad():
        greedy = []
        ids = list(ctx)
        for _ in range(3):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            greedy.append(nxt)
            ids.append(nxt)
    other = [greedy[0], (greedy[1] + 1) % 250 + 4, greedy[2]]
    res = scorer.score_tokens([TokenRequest(0, ctx, greedy, 3), TokenRequest(1, ctx, other, 3)])
    assert res[0].is_greedy and not res[1].is_greedy


def test_truncation_and_rolling_windows(tokenizer):
    model = tiny_model("llama")
    scorer = Scorer(model, tokenizer, batch_size=4, max_length=16)
    long_ctx = "abcdefghijklmnopqrstuvwxyz" * 2
    got = scorer.loglikelihood([(long_ctx, " end"), ("short", " end")])
    ref = loglikelihood_reference(model, tokenizer, [(long_ctx, " end"), ("short", " end")], max_length=16)
    assert _max_diff(got, ref) <= 1e-4
    (req,) = scorer.tokenize_requests([(long_ctx, " end")])
    assert len(req.ctx) + len(req.cont) - 1 == 16 and req.cont == scorer.encode(" end")
    # rolling: 40 tokens = windows of 16, 16, 8, each conditioned on the token before it
    text = "The quick brown fox jumps over the lazy dog"[:40]
    ids = scorer.encode(text)
    (rolled,) = scorer.rolling_loglikelihood([text])
    windows = [TokenRequest(0, [tokenizer.bos_token_id], ids[:16], 0), TokenRequest(1, [ids[15]], ids[16:32], 0),
               TokenRequest(2, [ids[31]], ids[32:], 0)]
    assert rolled.n_tokens == len(ids) == 40
    assert rolled.logprob == pytest.approx(sum(r.logprob for r in scorer.score_tokens(windows)), abs=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_batched_equals_single_and_stops(arch, tokenizer):
    model = tiny_model(arch)
    shots = "Question: 1+1?\nAnswer: 2\n\n"  # a few-shot prefix common to all prompts: computed once per batch
    prompts = [shots + "Question: 7+1?\nAnswer:", shots + "Q: 10?\nA:", "Hello"]
    scorer = Scorer(model, tokenizer, batch_size=2)
    assert _common_prefix_len([scorer.encode(p) for p in prompts[:2]]) >= MIN_SHARED_PREFIX
    batched = scorer.generate(prompts, 6)
    single = [Scorer(model, tokenizer, batch_size=1).generate([p], 6)[0] for p in prompts]
    assert batched == single
    # a stop string cuts the text before it
    text = batched[0]
    if len(text) >= 3:
        cut = Scorer(model, tokenizer).generate(prompts[:1], 6, stop=[text[2]])[0]
        assert cut == text[: text.index(text[2])]


def test_progress_callback_reaches_total(tokenizer):
    calls = []
    scorer = Scorer(tiny_model("llama"), tokenizer, batch_size=4, progress=lambda d, n, t: calls.append((n, t)))
    scorer.loglikelihood(REQUESTS)
    assert calls[-1] == (len(REQUESTS), len(REQUESTS))
    assert [n for n, _ in calls] == sorted(n for n, _ in calls)


@pytest.mark.slow
def test_smollm2_batched_equals_loop(smollm2, shared_data):
    lines = (shared_data / "arc" / "arc_easy_test.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines[:4]]
    requests = [(r["query"] + "\nAnswer:", " " + c) for r in rows for c in r["choices"]]
    requests += [("", "The doctor said that she would be late.")]
    scorer = Scorer(smollm2.model, smollm2.tokenizer, batch_size=8)
    ref = loglikelihood_reference(smollm2.model, smollm2.tokenizer, requests)
    assert _max_diff(scorer.loglikelihood(requests), ref) <= 1e-4
    assert _max_diff(Scorer(smollm2.model, smollm2.tokenizer, batch_size=8, mode="flat").loglikelihood(requests),
                     ref) <= 1e-4
