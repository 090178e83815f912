"""Mutation tests: break the implementation on purpose and show that a real test's assertion then fails.

A test that cannot fail proves nothing; a reference that shares code with what it checks fails together with it.
Each case here patches one plausible bug into the code in-process (``monkeypatch``, undone after the case), calls
the body of an existing test (or, where no such test exists, a check written here) and asserts that it raises
``AssertionError``. Each check is first run unpatched and must pass, so a failure under the mutation is the
mutation's doing, not a broken check.

Mutation -> what catches it:

- the fold skips one slice of a fused tensor (Phi-3 ``gate_up_proj``'s up half, GPT-2 ``c_attn``'s v third) ->
  edit/test_fold.py fold-vs-hooks, models/test_arch.py expected-slice table;
- ``ModelLayout.channels`` shifted by one (hooks and fold both follow it, so fold-vs-hooks agrees) ->
  models/test_arch.py expected-slice table, locate/test_ig.py (its reference has its own site table);
- the fold drops the Qwen2 q/k/v bias scale -> models/test_arch.py Qwen2 bias test, edit/test_fold.py on qwen2;
- the engine scores the padded tail of short continuations -> evaluate/test_engine.py batched vs its reference;
- the bootstrap resamples items, not clusters -> ``check_cluster_bootstrap_widens_for_copies`` here
  (evaluate/stats.py has no test module of its own yet);
- knowbias encodes the answer on its own (a bare ``▁`` with SentencePiece) -> locate/test_knowbias.py;
- the IG target is the mean of the answer tokens' probabilities, not their product -> locate/test_ig.py float64;
- apply scores "edited" on the base model, or the control without its edit -> cli/test_apply_eval.py.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from bakeedit.edit import fold
from bakeedit.evaluate import strategies
from bakeedit.locate.knowbias import ig
from bakeedit.locate.knowbias import method as kb
from bakeedit.models.arch import ModelLayout

TESTS = Path(__file__).resolve().parent
_loaded: dict[str, ModuleType] = {}


def test_module(relative: str) -> ModuleType:
    """A private copy of another test module (by path: the test folders are not packages)."""
    if relative not in _loaded:
        name = "_mutation_" + relative.replace("/", "_").removesuffix(".py")
        spec = importlib.util.spec_from_file_location(name, TESTS / relative)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        _loaded[relative] = module
    return _loaded[relative]


test_module.__test__ = False  # a helper, not a test


def caught(monkeypatch: pytest.MonkeyPatch, mutate: Callable[[pytest.MonkeyPatch], None], check: Callable[[], None]
           ) -> None:
    """``check`` passes on the real code and raises AssertionError once ``mutate`` has patched it."""
    check()
    with monkeypatch.context() as patch:
        mutate(patch)
        with pytest.raises(AssertionError):
            check()


# --- the fold ------------------------------------------------------------------------------------------------


def _skip_site(arch: str, site: str):
    """The fold leaves the ``site`` slice of its fused tensor unscaled (the hooks still scale it)."""
    real = fold.channel_factors

    def channel_factors(layout, group, width, stored=False):
        full = real(layout, group, width, stored)
        return torch.ones_like(full) if layout.model_type == arch and group.site == site else full

    return lambda patch: patch.setattr(fold, "channel_factors", channel_factors)


@pytest.mark.parametrize(("arch", "site", "index", "param", "channel"), [
    ("phi3", "mlp.up", 5, "mlp.gate_up_proj.weight", 48 + 5),
    ("gpt2", "attn.v", 9, "attn.c_attn.weight", 64 + 9),
])
def test_skipping_a_fused_slice_in_the_fold_is_caught(arch, site, index, param, channel, monkeypatch, tmp_path):
    test_fold, test_arch = test_module("edit/test_fold.py"), test_module("models/test_arch.py")
    axis = 1 if arch == "gpt2" else 0  # Conv1D stores [in, out]
    caught(monkeypatch, _skip_site(arch, site),
           lambda: test_fold.test_saved_fold_matches_runtime_hooks(arch, torch.float32, tmp_path))
    caught(monkeypatch, _skip_site(arch, site),
           lambda: test_arch.test_fold_touches_exactly_the_expected_weight_slice(arch, site, index, param, axis,
                                                                                 channel))


def _shift_channels(patch: pytest.MonkeyPatch) -> None:
    """Index i of a site goes to the physical channel of index i + 1 (wrapping): an off-by-one in the site table."""
    real = ModelLayout.channels

    def channels(self, site, indices=None):
        full = real(self, site).roll(-1)
        return full if indices is None else full[torch.as_tensor(indices, dtype=torch.long)]

    patch.setattr(ModelLayout, "channels", channels)


def test_a_channel_shifted_by_one_is_caught(monkeypatch):
    """Hooks and fold both read ``channels``, so fold-vs-hooks agrees under this bug; the hand-written tables do
    not: the expected-slice test and the IG reference (its own site table)."""
    test_arch, test_ig = test_module("models/test_arch.py"), test_module("locate/test_ig.py")
    caught(monkeypatch, _shift_channels, lambda: test_arch.test_fold_touches_exactly_the_expected_weight_slice(
        "llama", "mlp.gate", 40, "mlp.gate_proj.weight", 0, 40))
    caught(monkeypatch, _shift_channels, lambda: test_arch.test_fold_touches_exactly_the_expected_weight_slice(
        "phi3", "attn.v", 3, "self_attn.qkv_proj.weight", 0, 32 + 16 + 3))
    caught(monkeypatch, _shift_channels, lambda: test_ig.test_batched_cached_ig_equals_per_step_loop_float32("llama"))


def _drop_bias(patch: pytest.MonkeyPatch) -> None:
    """The fold scales an output channel's weight row but not its bias entry (IA3's merge in peft)."""
    real = fold.fold_targets

    def fold_targets(layout, group, has_bias, stored=False):
        return [t for t in real(layout, group, has_bias, stored) if not t.name.endswith(".bias")]

    patch.setattr(fold, "fold_targets", fold_targets)


def test_dropping_the_qwen2_bias_scale_is_caught(monkeypatch, tmp_path):
    test_fold, test_arch = test_module("edit/test_fold.py"), test_module("models/test_arch.py")
    caught(monkeypatch, _drop_bias, test_arch.test_qwen2_qkv_bias_is_scaled_with_the_row)
    caught(monkeypatch, _drop_bias,
           lambda: test_fold.test_saved_fold_matches_runtime_hooks("qwen2", torch.float32, tmp_path))


# --- the engine ----------------------------------------------------------------------------------------------


def _score_padding(patch: pytest.MonkeyPatch) -> None:
    """Every target position counts, the right-padded tail of a short continuation included."""
    real = strategies._targets

    def targets(rows, device):
        ids, valid = real(rows, device)
        return ids, torch.ones_like(valid)

    patch.setattr(strategies, "_targets", targets)


def test_scoring_pad_tokens_is_caught(monkeypatch, tokenizer):
    test_engine = test_module("evaluate/test_engine.py")
    caught(monkeypatch, _score_padding, lambda: test_engine.test_batched_equals_per_example_loop("llama", tokenizer))


# --- the bootstrap -------------------------------------------------------------------------------------------


def check_cluster_bootstrap_widens_for_copies() -> None:
    """Every cluster holds two identical items: they are one observation, so the cluster bootstrap's standard error
    of the mean is that of K items, sqrt(2) (~1.41) times the naive item-level one of 2K items. Resampling items
    gives ~1.0. The seed is fixed, so the ratio is one deterministic number; 1.2 sits between the two with a wide
    margin (1000 replicates estimate a standard error within a few percent)."""
    from bakeedit.evaluate import stats

    values = np.random.default_rng(0).normal(size=50).repeat(2)
    clusters = [f"c{i // 2}" for i in range(len(values))]
    ratio = stats.mean_se(values, clusters, seed=1) / stats.analytic_mean_se(values)
    assert ratio > 1.2, ratio


def _resample_items(patch: pytest.MonkeyPatch) -> None:
    from bakeedit.evaluate import stats

    patch.setattr(stats, "cluster_members", lambda clusters, n: [np.array([i]) for i in range(n)])


def test_resampling_items_instead_of_clusters_is_caught(monkeypatch):
    pytest.importorskip("bakeedit.evaluate.stats")
    caught(monkeypatch, _resample_items, check_cluster_bootstrap_widens_for_copies)


# --- locate --------------------------------------------------------------------------------------------------


def _answer_alone(patch: pytest.MonkeyPatch) -> None:
    """The old rule: the answer's ids are ``encode(answer)``, whatever precedes it."""
    patch.setattr(kb, "answer_ids", lambda tokenizer, prompt, answer: tokenizer(answer, add_special_tokens=False)[
        "input_ids"])


def test_encoding_the_answer_alone_is_caught(monkeypatch):
    test_knowbias = test_module("locate/test_knowbias.py")
    caught(monkeypatch, _answer_alone,
           lambda: test_knowbias.test_sentencepiece_answer_is_the_token_that_follows_the_prompt(chat=False))


def _mean_target(patch: pytest.MonkeyPatch) -> None:
    def mean(logits, answer_ids):
        probs = logits.float().softmax(dim=-1)
        index = answer_ids.to(logits.device).view(1, -1, 1).expand(logits.shape[0], -1, 1)
        return probs.gather(-1, index).squeeze(-1).mean(dim=-1)

    patch.setattr(ig, "answer_probability", mean)


def test_a_mean_target_for_multi_token_answers_is_caught(monkeypatch):
    test_ig = test_module("locate/test_ig.py")
    caught(monkeypatch, _mean_target, lambda: test_ig.test_batched_cached_ig_equals_per_step_loop_float64("llama"))


# --- apply's evaluation --------------------------------------------------------------------------------------


def test_scoring_edited_or_control_on_the_base_is_caught(monkeypatch, tmp_path, tiny_checkpoint, shared_data):
    from transformers import AutoModelForCausalLM

    from bakeedit.workflows import apply, apply_eval

    test_apply_eval = test_module("cli/test_apply_eval.py")
    runs = iter(range(100))

    def check() -> None:
        folder = tmp_path / f"run{next(runs)}"  # each call its own output and base folders
        folder.mkdir()
        test_apply_eval.test_apply_scores_base_edited_and_control_and_writes_the_card(folder, tiny_checkpoint,
                                                                                     shared_data)

    real_edited = apply_eval.evaluate_edited

    def edited_on_base(patch: pytest.MonkeyPatch) -> None:
        def evaluate_edited(model, tokenizer, *args, **kwargs):
            base = AutoModelForCausalLM.from_pretrained(tmp_path / "base-llama").eval()
            return real_edited(base, tokenizer, *args, **kwargs)

        patch.setattr(apply, "evaluate_edited", evaluate_edited)

    def control_unedited(patch: pytest.MonkeyPatch) -> None:
        real = apply_eval.control_model
        patch.setattr(apply_eval, "control_model", lambda loaded, *a, **k: (loaded, *real(loaded, *a, **k)[1:]))

    caught(monkeypatch, edited_on_base, check)
    caught(monkeypatch, control_unedited, check)
