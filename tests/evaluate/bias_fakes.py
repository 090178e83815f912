"""A scorer with hand-set log-likelihoods, so bias metrics can be checked against values computed by hand.

``fn(context, continuation) -> (logprob, n_tokens)`` decides every score. Tokens are words with their leading
whitespace (like a BPE's " Yes"), so the real :meth:`Scorer.next_token_logprobs` (borrowed, running on this fake's
``encode`` and ``score_tokens``) hands ``fn`` the whole prompt text and the candidate's first word.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from bakeedit.evaluate.batching import TokenRequest
from bakeedit.evaluate.engine import LLResult, Scorer

ScoreFn = Callable[[str, str], tuple[float, int]]


class PlainTokenizer:
    """Just enough of a tokenizer for the prompt helpers: no chat template."""

    chat_template = None


class FakeScorer:
    next_token_logprobs = Scorer.next_token_logprobs  # the real prompt/candidate tokenization, on the fake below

    def __init__(self, fn: ScoreFn, tokenizer: Any = None) -> None:
        self.fn = fn
        self.tokenizer = tokenizer or PlainTokenizer()
        self.requests: list[tuple[str, str]] = []
        self.prefix_token_id = 0
        self.add_bos_token = False
        self.max_length = 10**6
        self.progress = None
        self.vocab: dict[str, int] = {}
        self.words: dict[int, str] = {}

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[LLResult]:
        out = []
        for ctx, cont in requests:
            self.requests.append((ctx, cont))
            lp, n = self.fn(ctx, cont)
            out.append(LLResult(lp, n, len(cont), False))
        return out

    def sentence_logprob(self, texts: Sequence[str]) -> list[LLResult]:
        return self.loglikelihood([("", t) for t in texts])

    def encode(self, text: str) -> list[int]:
        ids = []
        for tok in re.findall(r"\s*\S+|\s+", text):
            if tok not in self.vocab:
                self.vocab[tok] = len(self.vocab) + 1
                self.words[self.vocab[tok]] = tok
            ids.append(self.vocab[tok])
        return ids

    def score_tokens(self, requests: Sequence[TokenRequest]) -> list[LLResult]:
        out = []
        for r in requests:
            ctx = "".join(self.words.get(i, "") for i in r.ctx)
            cont = "".join(self.words[i] for i in r.cont)
            self.requests.append((ctx, cont))
            lp, n = self.fn(ctx, cont)
            out.append(LLResult(lp, n, r.n_chars, False))
        return out


def table_scorer(table: dict[Any, float], default: float = -50.0, key: Callable[[str, str], Any] | None = None,
                 tokenizer: Any = None) -> FakeScorer:
    """Scores looked up in ``table`` by ``key(context, continuation)`` (default: the continuation), one token each."""
    key = key or (lambda _ctx, cont: cont)
    return FakeScorer(lambda ctx, cont: (table.get(key(ctx, cont), default), 1), tokenizer)
