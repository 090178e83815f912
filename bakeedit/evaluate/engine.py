"""The batched scorer every evaluation task goes through: log-likelihoods of continuations, sentence log-probabilities,
next-token distributions and greedy generation.

Tokenization follows lm-evaluation-harness (Gao et al. 2023, ``HFLM._encode_pair``): trailing whitespace of the context
moves to the continuation, the context is encoded alone and the continuation is what ``encode(context +
continuation)`` adds after it; an empty context becomes the BOS token (EOS when there is none). Log-probabilities are
``logit[target] - logsumexp(logits)`` in float32 whatever the model's dtype, summed over the continuation tokens.

Requests are sorted by length and padded per batch; the options of a multiple-choice item share their context, which
is computed once. ``mode`` picks the strategy (see :mod:`bakeedit.evaluate.strategies`): ``"packed"`` (default: one
row per context holding all its options, separated by a 4D attention mask), ``"kv"`` (context into the KV cache,
expanded to the options) or ``"flat"`` (lm-evaluation-harness's one row per request). Position ids are always passed
explicitly, so padding never shifts positions.

A model carrying a ``positions: last`` module edit (runtime hooks or a saved custom module; docs/nonlinear.md
"Scoring with position-scoped edits") is scored by ``packed`` (which then gives the one-token options of a context a
copy of its last token) or ``flat``; ``kv`` cannot reproduce the edit and is refused with an
:class:`~bakeedit.errors.EditError`. Edits at all positions (``start`` included) are exact in every mode.

:meth:`Scorer.loglikelihood_reference` is the straightforward per-example loop (batch 1, no sharing), kept as the
ground truth for tests and for ``bench/eval_engine.py``.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

from bakeedit.edit.nonlinear import attached_positions
from bakeedit.errors import EditError
from bakeedit.evaluate import strategies
from bakeedit.evaluate.batching import LLResult, TokenRequest, gather_continuation_logprobs
from bakeedit.evaluate.generation import greedy_generate
from bakeedit.models.lazy import is_lazy

log = logging.getLogger(__name__)
ProgressFn = Callable[[str, int, int], None]  # (description, done, total), called after each batch
DEFAULT_MAX_LENGTH = 2048
MODES = ("packed", "kv", "flat")
#: Why a mode cannot reproduce a ``positions: last`` edit, which reaches the last real token of each scored sequence.
LAST_POSITION_LIMITS = {
    "kv": "the context minus its last token runs into the KV cache in a forward pass of its own, whose last token "
          "would be edited as if the sequence ended there",
}


class Scorer:
    """Batched log-likelihood scoring and greedy generation for a causal LM and its tokenizer.

    ``batch_size`` bounds the requests (options) scored by one forward pass; ``max_length`` the tokens of one
    sequence (longer inputs lose their oldest context tokens, as in lm-eval); ``progress(description, done, total)``
    is called after each batch; ``add_bos_token`` prepends BOS to every context (default: when the tokenizer itself
    adds one). ``mode`` (see the module docstring) defaults to ``packed``.

    A blockwise model (:mod:`bakeedit.models.lazy`) reads every block from disk once per forward pass, so its cost is
    per batch: a larger ``batch_size`` scores more requests per read. Before the rest of each request list runs,
    ``notice`` (default: a logging warning, which the CLI shows on stderr) gets one line with the first batch's time
    and the estimate for the whole list (first batch x batches).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        batch_size: int = 32,
        max_length: int | None = None,
        progress: ProgressFn | None = None,
        mode: Literal["packed", "kv", "flat"] | None = None,
        add_bos_token: bool | None = None,
        notice: Callable[[str], None] | None = None,
    ) -> None:
        if mode is not None and mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = max(1, int(batch_size))
        config = getattr(model, "config", None)
        model_max = getattr(config, "max_position_embeddings", None) or DEFAULT_MAX_LENGTH
        self.max_length = int(max_length or min(model_max, DEFAULT_MAX_LENGTH))
        self.progress = progress
        self.notice: Callable[[str], None] = notice or log.warning
        self.blockwise = is_lazy(model)
        self._started: float | None = None  # when the current request list began (blockwise: for the estimate)
        self.mode: str = mode or "packed"
        self._check_mode()
        self.device = next(model.parameters()).device
        bos = tokenizer.bos_token_id
        self.prefix_token_id: int = bos if bos is not None else tokenizer.eos_token_id
        if self.prefix_token_id is None:
            raise ValueError("the tokenizer has neither a BOS nor an EOS token to start an empty context with")
        pad = tokenizer.pad_token_id
        self.pad_token_id: int = pad if pad is not None else self.prefix_token_id
        if add_bos_token is None:
            probe = tokenizer("a", add_special_tokens=True)["input_ids"]
            add_bos_token = bos is not None and len(probe) > 0 and probe[0] == bos
        self.add_bos_token = bool(add_bos_token)
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._has_logits_to_keep = "logits_to_keep" in params
        window = getattr(config, "sliding_window", None)
        self.sliding_window: int | None = window if window and getattr(config, "use_sliding_window", True) else None
        attn = getattr(config, "_attn_implementation", None)
        self._bool_mask = attn == "sdpa"
        # flash-attention kernels take no arbitrary 4D mask: such models use the KV-cache strategy instead of packing
        self.supports_4d_mask = attn in (None, "sdpa", "eager")

    @classmethod
    def from_loaded(cls, loaded: Any, **kwargs: Any) -> Scorer:
        """A scorer for a :class:`bakeedit.models.LoadedModel`."""
        return cls(loaded.model, loaded.tokenizer, **kwargs)

    # ------------------------------------------------------------------------------------------ tokenization

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        return [list(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    def tokenize_requests(self, requests: Sequence[tuple[str, str]]) -> list[TokenRequest]:
        """lm-eval's ``_encode_pair`` for every (context, continuation), then left truncation to ``max_length``."""
        contexts, wholes, n_chars = [], [], []
        for context, continuation in requests:
            n_chars.append(len(continuation))
            n_spaces = len(context) - len(context.rstrip())
            if n_spaces:
                continuation = context[-n_spaces:] + continuation
                context = context[:-n_spaces]
            contexts.append(context)
            wholes.append(context + continuation)
        unique_ctx = sorted(set(contexts))
        ctx_ids = dict(zip(unique_ctx, self._encode_many(unique_ctx), strict=True))
        whole_ids = self._encode_many(wholes)
        prefix = [self.prefix_token_id]
        out = []
        for i, (context, whole) in enumerate(zip(contexts, whole_ids, strict=True)):
            if context:
                ctx = ctx_ids[context]
                cont = whole[len(ctx):]
                if self.add_bos_token:
                    ctx = prefix + ctx
            else:
                ctx, cont = prefix, whole
            if not cont:
                raise ValueError(f"request {i}: the continuation {requests[i][1]!r} encodes to no tokens")
            out.append(self._truncate(TokenRequest(i, ctx, cont, n_chars[i])))
        return out

    def _truncate(self, req: TokenRequest) -> TokenRequest:
        # The model sees len(ctx) + len(cont) - 1 tokens; keep the newest max_length of them (lm-eval does the same).
        whole = req.ctx + req.cont
        if len(whole) <= self.max_length + 1:
            return req
        whole = whole[-(self.max_length + 1):]
        n_ctx = max(1, len(whole) - len(req.cont))
        return TokenRequest(req.index, whole[:n_ctx], whole[n_ctx:], req.n_chars)

    # ------------------------------------------------------------------------------------------ log-likelihood

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[LLResult]:
        """log P(continuation | context) for each ``(context, continuation)``, in request order."""
        return self.score_tokens(self.tokenize_requests(requests))

    def sentence_logprob(self, texts: Sequence[str]) -> list[LLResult]:
        """log P(text) of each whole text given only the BOS token (EOS when there is no BOS)."""
        return self.loglikelihood([("", t) for t in texts])

    def rolling_loglikelihood(self, texts: Sequence[str]) -> list[LLResult]:
        """log P(text) of texts of any length: disjoint windows of ``max_length`` predicted tokens, each conditioned
        on the token before it (the first on BOS); lm-eval's ``loglikelihood_rolling`` with ``context_len=1``."""
        windows: list[TokenRequest] = []
        owner: list[int] = []
        for t, ids in enumerate(self._encode_many(texts)):
            if not ids:
                raise ValueError(f"text {t} encodes to no tokens")
            for start in range(0, len(ids), self.max_length):
                ctx = [self.prefix_token_id] if start == 0 else [ids[start - 1]]
                windows.append(TokenRequest(len(windows), ctx, ids[start:start + self.max_length], 0))
                owner.append(t)
        parts = self.score_tokens(windows)
        out = [LLResult(0.0, 0, len(t), True) for t in texts]
        for t, r in zip(owner, parts, strict=True):
            o = out[t]
            out[t] = LLResult(o.logprob + r.logprob, o.n_tokens + r.n_tokens, o.n_chars, o.is_greedy and r.is_greedy)
        return out

    def score_tokens(self, requests: Sequence[TokenRequest]) -> list[LLResult]:
        """Score already tokenized requests with the scorer's batched strategy."""
        self._check_mode()  # a runtime edit may have been hooked in after the scorer was made
        self._started = time.perf_counter()
        with torch.inference_mode():
            if self.mode == "packed":
                return strategies.score_packed(self, requests, last_scoped="last" in attached_positions(self.model))
            if self.mode == "kv":
                return strategies.score_kv(self, requests)
            return strategies.score_flat(self, requests)

    def loglikelihood_reference(self, requests: Sequence[tuple[str, str]]) -> list[LLResult]:
        """The straightforward per-example loop: one unpadded forward of ``(context + continuation)[:-1]`` per
        request. Slow; the ground truth the batched strategies are tested and benchmarked against."""
        out: list[LLResult | None] = [None] * len(requests)
        toks = self.tokenize_requests(requests)
        with torch.inference_mode():
            for done, r in enumerate(toks, start=1):
                inp = torch.tensor([r.ctx + r.cont[:-1]], device=self.device)
                logits = self._forward(inp, torch.ones_like(inp), None).logits
                start = len(r.ctx) - 1
                sel = logits[:, start:start + len(r.cont)]
                targets = torch.tensor([r.cont], device=self.device)
                lp, greedy = gather_continuation_logprobs(sel, targets, torch.ones_like(targets, dtype=torch.bool))
                out[r.index] = LLResult(float(lp[0]), len(r.cont), r.n_chars, bool(greedy[0]))
                self._report("loglikelihood (reference loop)", done, len(toks))
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------------------------------ next token

    def next_token_logprobs(
        self, prompts: Sequence[str], candidates: Sequence[str] | Sequence[Sequence[str]]
    ) -> torch.Tensor:
        """``[n_prompts, n_candidates]`` float32 log-probabilities of each candidate's FIRST token right after its
        prompt: how a model's answer is read off its next token (yes/no and lettered questions, pronoun probes).

        ``candidates`` is one list for every prompt or one list per prompt (same length each). Unlike
        :meth:`loglikelihood`, the prompt keeps its trailing whitespace: a chat template's prompt ends in
        ``"assistant\\n"`` and the answer ``"Yes"`` follows it, so moving the ``"\\n"`` into the answers (lm-eval's
        convention) would score every candidate as the same ``"\\n"`` token. The prompt is encoded as written (BOS
        first where the model expects one and the text does not already start with it, e.g. a Llama 3 chat
        template); a candidate's token is the first one ``encode(prompt + candidate)`` adds after the prompt's
        tokens, or, where the two merge across the boundary, the first token of ``encode(candidate)``. Each prompt
        runs once, batched like every other request.
        """
        per_prompt = [list(candidates)] * len(prompts) if candidates and isinstance(candidates[0], str) else [
            list(c) for c in candidates  # type: ignore[arg-type]
        ]
        if len(per_prompt) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(per_prompt)} candidate lists")
        if not prompts:
            return torch.empty(0, 0)
        n_c = len(per_prompt[0])
        if n_c == 0 or any(len(c) != n_c for c in per_prompt):
            raise ValueError("every prompt needs the same, non-zero number of candidates")
        requests = []
        for i, (prompt, cands) in enumerate(zip(prompts, per_prompt, strict=True)):
            ids = self.encode(prompt)
            ctx = ids if ids and (ids[0] == self.prefix_token_id or not self.add_bos_token) else [
                self.prefix_token_id, *ids]
            ctx = ctx[-self.max_length:]
            for j, cand in enumerate(cands):
                whole = self.encode(prompt + cand)
                cont = whole[len(ids):] if whole[:len(ids)] == ids else self.encode(cand)
                if not cont:
                    raise ValueError(f"candidate {cand!r} encodes to no tokens")
                requests.append(TokenRequest(i * n_c + j, ctx, cont[:1], len(cand)))
        results = self.score_tokens(requests)
        return torch.tensor([r.logprob for r in results], dtype=torch.float32).view(len(prompts), n_c)

    # ------------------------------------------------------------------------------------------ generation

    def generate(self, prompts: Sequence[str], max_new_tokens: int, stop: Sequence[str] = ()) -> list[str]:
        """Greedy continuations of ``prompts`` (batched, left padded), cut before the first ``stop`` string."""
        encoded = [([self.prefix_token_id] if self.add_bos_token else []) + ids for ids in self._encode_many(prompts)]
        encoded = [ids[-max(1, self.max_length - max_new_tokens):] or [self.prefix_token_id] for ids in encoded]
        self._started = time.perf_counter()
        return greedy_generate(self, encoded, max_new_tokens, stop)

    # ------------------------------------------------------------------------------------------ internals

    def _forward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor | None,
        cache: Any = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
    ) -> Any:
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "use_cache": use_cache or cache is not None}
        if positions is not None:
            kwargs["position_ids"] = positions
        if cache is not None:
            kwargs[self._cache_kw] = cache
        if logits_to_keep and self._has_logits_to_keep:
            kwargs["logits_to_keep"] = logits_to_keep
        return self.model(**kwargs)

    def attention_mask_4d(self, allowed: torch.Tensor) -> torch.Tensor:
        """A custom ``[batch, 1, q, kv]`` mask from a boolean "may attend" tensor ``[batch, q, kv]``: boolean for SDPA,
        additive (0 / dtype minimum) for eager attention, which adds the mask to the scores."""
        if self._bool_mask:
            return allowed[:, None]
        dtype = next(self.model.parameters()).dtype
        zero = torch.zeros((), dtype=dtype, device=allowed.device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)[:, None]

    def _cache_of(self, output: Any) -> Any:
        cache = getattr(output, self._cache_kw, None)
        if cache is None:
            cache = getattr(output, "past_key_values", None)
        if cache is None or not hasattr(cache, "batch_select_indices"):
            raise RuntimeError("the model returned no expandable KV cache; use Scorer(mode='packed') or mode='flat'")
        return cache

    def _check_mode(self) -> None:
        """Refuse a batching mode that would score a ``positions: last`` edit at the wrong tokens (docs/nonlinear.md):
        an evaluation that silently differs from the per-example computation is worse than none."""
        if self.mode in LAST_POSITION_LIMITS and "last" in attached_positions(self.model):
            raise EditError(
                f"Scorer(mode={self.mode!r}) cannot score a model with a 'positions: last' edit exactly: "
                f"{LAST_POSITION_LIMITS[self.mode]}",
                hint="use Scorer(mode='packed') (the default) or mode='flat' (one row per request, whose last real "
                     "token is the one the edit reaches)",
            )

    def _report(self, description: str, done: int, total: int) -> None:
        if self.blockwise and self._started is not None and 0 < done < total:
            self._estimate(description, done, total, time.perf_counter() - self._started)
        if self.progress is not None:
            self.progress(description, done, total)

    def _estimate(self, description: str, done: int, total: int, elapsed: float) -> None:
        """The one line before a blockwise request list goes on: what its first batch took, and the whole list at
        that rate (blocks are read once per batch, so batches, not tokens, set the time)."""
        self._started = None  # once per request list
        self.notice(f"blockwise {description}: the first batch ({done} of {total} requests) took {elapsed:.1f}s; "
                    f"the whole list will take about {elapsed * total / done:.0f}s (every block is read once per "
                    f"batch; a larger --batch-size reads less)")
