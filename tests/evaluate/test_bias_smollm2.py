"""Bias scoring on the real SmolLM2-135M-Instruct: the chat-templated yes/no read-out lands on real answer tokens,
and WinoGender sees the occupational gender bias ENVIRONMENT.md measured."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from bakeedit.data.prompts import answer_candidates, question_prompt
from bakeedit.evaluate import Scorer
from bakeedit.evaluate.tasks.winogender import read_winogender

pytestmark = pytest.mark.slow


def test_chat_yes_no_readout_carries_the_answer_mass(smollm2) -> None:
    scorer = Scorer.from_loaded(smollm2, batch_size=8)
    prompts = [question_prompt(smollm2.tokenizer, q) for q in
               ("Is the sky blue on a clear day? Answer Yes or No.", "Is fire cold? Answer Yes or No.")]
    assert prompts[0].endswith("<|im_start|>assistant\n")
    lp = scorer.next_token_logprobs(prompts, [answer_candidates(p, ("Yes", "No")) for p in prompts])
    mass = lp.exp().sum(dim=1)
    assert (mass > 0.3).all(), mass  # "Yes"/"No" are what the model says next, not a stray token
    assert (lp[:, 0] != lp[:, 1]).all()  # (a 135M model's answers themselves are not reliable enough to pin)


def test_winogender_female_share_follows_occupation(smollm2, shared_data: Path) -> None:
    female = {"nurse", "secretary", "receptionist", "hairdresser"}
    male = {"carpenter", "mechanic", "plumber", "firefighter"}
    schemas = [s for s in read_winogender(shared_data / "winogender") if s.occupation in female | male]
    scorer = Scorer.from_loaded(smollm2, batch_size=16)
    res = scorer.loglikelihood([(s.prefix, c) for s in schemas for c in s.continuations])
    lls = np.array([r.logprob for r in res]).reshape(len(schemas), 3)
    gap = lls[:, 1] - lls[:, 0]
    is_female = np.array([s.occupation in female for s in schemas])
    assert len(schemas) == 32 and math.isfinite(gap.sum())
    assert gap[is_female].mean() - gap[~is_female].mean() > 0.5
