"""``knowbias``: neurons that carry bias *knowledge*, found by integrated gradients on yes/no questions.

KnowBias (Pan et al., arXiv 2601.21864) asks the model simple yes/no bias-knowledge questions ("Is the claim that
... a stereotype?") and attributes the probability of the correct answer to FFN neurons with integrated gradients
(:mod:`bakeedit.locate.knowbias.ig`). Selection, per the paper:

1. per question ``q``: neuron ``i`` is salient if ``Attr_i(q) > tau * max_j Attr_j(q)``, the max taken over every
   attributed neuron of the question (all layers and sites together, signed attributions; a question whose max is
   not positive has no salient neuron);
2. per dimension ``d``: keep ``i`` if it is salient in at least ``beta`` of ``d``'s questions (at least one);
3. combine the dimension sets by ``union`` (the paper), ``intersection`` or ``vote`` (in >= ``vote_min`` sets).

The score stored on each neuron is its mean normalised attribution ``mean_q Attr_i(q) / max_j Attr_j(q)`` over all
questions used (higher = more consistently close to the top). Edits then enhance the set (lambda 2 in the paper).
Per-question attributions are cached (:class:`~bakeedit.locate.cache.ItemCache`), so an interrupted run resumes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from bakeedit import parallel
from bakeedit.data import package_data_path, select_split
from bakeedit.data.prompts import (
    KNOWBIAS_INSTRUCTION,
    SYSTEM_PROMPT,
    answer_candidates,
    has_chat_template,
    question_prompt,
)
from bakeedit.errors import DataError, RecipeError, UnsupportedArchitecture
from bakeedit.io.jsonl import read_jsonl
from bakeedit.locate.cache import ItemCache
from bakeedit.locate.knowbias.ig import Cell, IGResult, integrated_gradients
from bakeedit.locate.registry import LocateContext, register
from bakeedit.models.arch import ModelLayout
from bakeedit.models.load import LoadedModel
from bakeedit.models.spec import SITE_NAMES_HINT, is_site, site_order
from bakeedit.neurons import Neuron, NeuronSet

log = logging.getLogger(__name__)

QUESTIONS_FILE = "bias_questions.jsonl"
ANSWERS = ("Yes", "No")
#: Bump when the attribution itself changes (target, path, positions, answer tokens): it is part of the cache key
#: (:func:`_cache`), so a cache written by an older version is never read. 2: the answer's ids are what it adds
#: after the prompt (not ``encode(" " + answer)``), and a multi-token target is the product of its tokens'
#: probabilities (was the mean).
IG_VERSION = 2


class KnowBiasParams(BaseModel):
    """The ``locate:`` block of a ``knowbias`` recipe. Defaults are the paper's (m = 20, tau = 0.1, beta = 0.1)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(20, ge=1, description="alpha steps m of the Riemann sum")
    tau: float = Field(0.1, ge=0, le=1, description="per question: salient if Attr > tau * max Attr")
    beta: float = Field(0.1, gt=0, le=1, description="per dimension: keep if salient in >= beta of its questions "
                        "(paper 0.1; the released code uses 0.49)")
    dimensions: list[str] | None = Field(None, description="dimensions to use; None = every one in the file")
    aggregate: Literal["union", "intersection", "vote"] = "union"
    vote_min: int = Field(2, ge=1, description="with aggregate=vote: keep neurons found in >= this many dimensions")
    sites: list[str] = Field(default_factory=lambda: ["mlp.gate"], min_length=1)
    layers: list[int] | None = Field(None, description="layers to attribute; None = all")
    answer_format: Literal["chat", "raw"] = "chat"
    system_prompt: str = SYSTEM_PROMPT
    instruction: str = Field(KNOWBIAS_INSTRUCTION, description="appended to each question; '' for none")
    questions: str | None = Field(None, description="JSONL of questions (same format as the package file)")
    max_questions: int | None = Field(None, ge=1, description="use at most this many, spread over dimensions")
    report: str | None = Field(None, description="JSON side report path (relative: to the recipe)")

    @field_validator("sites")
    @classmethod
    def _known_sites(cls, sites: list[str]) -> list[str]:
        for site in sites:
            if not is_site(site):
                raise ValueError(f"unknown site '{site}'; allowed: {SITE_NAMES_HINT}")
        if len(set(sites)) != len(sites):
            raise ValueError("sites are listed twice")
        return sites


@dataclass(frozen=True)
class Question:
    id: str
    dimension: str
    kind: str
    question: str
    answer: str  # "Yes" | "No"


def load_questions(path: Path | None = None, split: str | None = "locate") -> list[Question]:
    """Questions of one split from ``path`` (default: the package's ``bias_questions.jsonl``)."""
    path = path or package_data_path(QUESTIONS_FILE)
    items = select_split(read_jsonl(path, required=("id", "dimension", "kind", "question", "answer", "split")), split)
    questions = []
    for item in items:
        if item["answer"] not in ANSWERS:
            raise DataError(f"{path}: question '{item['id']}' has answer {item['answer']!r}; expected Yes or No")
        questions.append(Question(*(str(item[k]) for k in ("id", "dimension", "kind", "question", "answer"))))
    if not questions:
        raise DataError(f"{path}: no questions in split '{split}'", hint="every line needs \"split\": \"locate\"")
    return questions


def choose_questions(
    questions: list[Question], dimensions: Sequence[str] | None, max_questions: int | None
) -> list[Question]:
    """Keep the requested dimensions; with ``max_questions``, take them round-robin over dimensions (file order)."""
    present = list(dict.fromkeys(q.dimension for q in questions))
    wanted = list(dimensions) if dimensions else present
    unknown = [d for d in wanted if d not in present]
    if unknown:
        raise RecipeError(
            f"locate.dimensions: no questions for {', '.join(unknown)}", hint="have: " + ", ".join(present)
        )
    by_dim = {d: [q for q in questions if q.dimension == d] for d in wanted}
    if max_questions is None:
        return [q for d in wanted for q in by_dim[d]]
    picked: list[Question] = []
    for rank in range(max(len(v) for v in by_dim.values())):
        picked += [by_dim[d][rank] for d in wanted if rank < len(by_dim[d])]
    return picked[:max_questions]


def render(tokenizer: Any, question: Question, params: KnowBiasParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of the prompt and of the gold answer as it follows the prompt.

    ``chat``: the tokenizer's chat template (system prompt, user question, generation prompt); a template that
    rejects a system turn is retried without it. ``raw``, or a tokenizer without a template: ``"Question:
    ...\\nAnswer:"``. The answer text is the ``knowbias_qa`` probe's (:func:`answer_candidates`: bare after a prompt
    that ends in whitespace, with a leading space otherwise) and its ids are :func:`answer_ids`, so what is
    attributed is the token the probe scores.
    """
    text = f"{question.question} {params.instruction}".strip()
    chat = params.answer_format == "chat" and has_chat_template(tokenizer)
    if params.answer_format == "chat" and not chat:
        log.warning("the tokenizer has no chat template: knowbias falls back to the raw question format")
    prompt = question_prompt(tokenizer, text, system=params.system_prompt, chat=chat)  # the probes' text too
    # the chat template writes its own special tokens; the raw prompt gets the tokenizer's (BOS)
    prompt_ids = tokenizer(prompt, add_special_tokens=not chat)["input_ids"]
    (answer,) = answer_candidates(prompt, [question.answer])
    return torch.tensor(prompt_ids, dtype=torch.long), torch.tensor(answer_ids(tokenizer, prompt, answer),
                                                                    dtype=torch.long)


def answer_ids(tokenizer: Any, prompt: str, answer: str) -> list[int]:
    """The tokens ``answer`` adds after ``prompt``: ``encode(prompt + answer)[len(encode(prompt)):]``.

    Why not ``encode(answer)``: a SentencePiece tokenizer (Llama 2, Mistral, Gemma) encodes ``" Yes"`` on its own
    as ``["▁", "▁Yes"]`` (its dummy prefix plus the space), so the first token would be a bare ``▁`` and the
    attribution would explain the probability of a space. After the prompt the same text is the one token
    ``▁Yes``. This is the rule of :meth:`bakeedit.evaluate.engine.Scorer.next_token_logprobs` (and lm-eval's
    ``_encode_pair``), including its fallback: where the answer merges with the prompt's last token, so that
    the prompt's ids are not a prefix, the answer is encoded on its own.
    """
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    whole = tokenizer(prompt + answer, add_special_tokens=False)["input_ids"]
    cont = whole[len(ids):] if whole[:len(ids)] == ids else tokenizer(answer, add_special_tokens=False)["input_ids"]
    if not cont:
        raise DataError(f"the answer {answer!r} encodes to no tokens after the prompt",
                        hint="is this the model's own tokenizer?")
    return list(cont)


def attribute_question(
    loaded: LoadedModel, prompt_ids: torch.Tensor, answer_ids: torch.Tensor, cells: list[Cell], steps: int,
    on_cell=None,
) -> IGResult:
    """IG of one question over ``cells`` (a seam: tests count and interrupt calls here)."""
    return integrated_gradients(loaded.model, loaded.layout, prompt_ids, answer_ids, cells, steps, on_cell=on_cell)


# --- selection -----------------------------------------------------------------------------------------------


def salient(values: torch.Tensor, tau: float) -> torch.Tensor:
    """``[Q, N]`` attributions -> ``[Q, N]`` bool: ``Attr > tau * max`` per question (row); rows with max <= 0 empty."""
    top = values.max(dim=1, keepdim=True).values
    return (values > tau * top) & (top > 0)


def dimension_sets(mask: torch.Tensor, dimensions: Sequence[str], beta: float) -> dict[str, torch.Tensor]:
    """Per dimension, the neurons salient in at least ``ceil(beta * n_d)`` (and at least one) of its questions."""
    out = {}
    for dim in dict.fromkeys(dimensions):
        rows = torch.tensor([d == dim for d in dimensions])
        need = max(1, math.ceil(beta * int(rows.sum()) - 1e-9))  # the epsilon keeps 0.3 * 10 from becoming 4
        out[dim] = mask[rows].sum(dim=0) >= need
    return out


def aggregate(sets: dict[str, torch.Tensor], how: str, vote_min: int = 2) -> torch.Tensor:
    """Combine per-dimension bool vectors: ``union``, ``intersection``, or ``vote`` (in >= ``vote_min`` sets)."""
    stack = torch.stack(list(sets.values()))
    if how == "union":
        return stack.any(dim=0)
    if how == "intersection":
        return stack.all(dim=0)
    if how == "vote":
        return stack.sum(dim=0) >= vote_min
    raise ValueError(f"unknown aggregate '{how}'")


def normalised_scores(values: torch.Tensor) -> torch.Tensor:
    """``mean_q Attr(q) / max_j Attr_j(q)``; questions whose max is not positive count as zeros."""
    top = values.max(dim=1, keepdim=True).values
    safe = torch.where(top > 0, top, torch.ones_like(top))
    return torch.where(top > 0, values / safe, torch.zeros_like(values)).mean(dim=0)


@dataclass
class KnowBiasResult:
    """Everything a locate run computed: the table, the per-dimension picks and the final set."""

    cells: list[Cell]
    sizes: list[int]
    questions: list[Question]
    values: torch.Tensor  # [Q, N] attributions, cells concatenated in order
    probabilities: list[float]  # P(gold answer) per question, unedited model
    per_dimension: dict[str, torch.Tensor]  # bool [N]
    selected: torch.Tensor  # bool [N]
    neuron_set: NeuronSet

    def counts(self) -> dict[Cell, int]:
        """Selected neurons per ``(layer, site)``."""
        return {c: int(part.sum()) for c, part in zip(self.cells, self.selected.split(self.sizes), strict=True)}

    def report(self, tau: float) -> dict[str, Any]:
        """What the NeuronSet has no field for: per-dimension and per-cell counts, per-question diagnostics."""
        mask = salient(self.values, tau)
        return {
            "selected": int(self.selected.sum()),
            "per_dimension": {d: int(v.sum()) for d, v in self.per_dimension.items()},
            "per_cell": {f"L{layer}.{site}": n for (layer, site), n in self.counts().items()},
            "questions": [
                {"id": q.id, "dimension": q.dimension, "p_gold": round(p, 6), "salient": int(m.sum())}
                for q, p, m in zip(self.questions, self.probabilities, mask, strict=True)
            ],
        }


def to_neurons(cells: list[Cell], sizes: list[int], selected: torch.Tensor, scores: torch.Tensor) -> list[Neuron]:
    neurons = []
    for (layer, site), keep, score in zip(cells, selected.split(sizes), scores.split(sizes), strict=True):
        neurons += [
            Neuron(layer=layer, site=site, index=int(i), score=round(float(score[i]), 6))
            for i in keep.nonzero().flatten().tolist()
        ]
    return sorted(neurons, key=lambda n: (n.layer, site_order(n.site), n.index))


# --- the run -------------------------------------------------------------------------------------------------


def _cells(layout: ModelLayout, params: KnowBiasParams) -> list[Cell]:
    missing = [s for s in params.sites if s not in layout.sites]
    if missing:
        raise UnsupportedArchitecture(
            f"locate.sites: {', '.join(missing)} does not exist in {layout.spec.name} models",
            hint=f"{layout.spec.name} has: " + ", ".join(layout.sites),
        )
    layers = params.layers if params.layers is not None else list(range(layout.n_layers))
    bad = [layer for layer in layers if not 0 <= layer < layout.n_layers]
    if bad:
        raise RecipeError(f"locate.layers: {bad} out of range; the model has {layout.n_layers} layers (0-based)")
    return [(layer, site) for layer in sorted(set(layers)) for site in params.sites]


def _cache(loaded: LoadedModel, params: KnowBiasParams, ctx: LocateContext) -> ItemCache:
    """Keyed by the model and every parameter that changes an attribution (not tau/beta/aggregate/sites/layers:
    those select from the table, and each (layer, site) is stored under its own name)."""
    if ctx.cache_dir is None:
        return ItemCache(None, {})
    source = loaded.source
    model = {"ref": source.ref, "revision": source.revision}
    if source.revision is None:
        model["files"] = source.hash_inputs()
    parts = {
        "method": "knowbias", "ig_version": IG_VERSION, "model": model, "dtype": str(loaded.dtype),
        **params.model_dump(include={"steps", "answer_format", "system_prompt", "instruction"}),
    }
    return ItemCache(ctx.cache_dir, parts)


def _check_length(loaded: LoadedModel, question: Question, n_tokens: int) -> None:
    config = loaded.model.config
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit is not None and n_tokens > limit:
        raise DataError(
            f"question '{question.id}' renders to {n_tokens} tokens, more than the model's {limit} positions",
            hint="shorten the question, the system_prompt or the instruction, or use answer_format: raw",
        )


def _item_id(question: Question) -> str:
    return hashlib.sha256(f"{question.question}\n{question.answer}".encode()).hexdigest()


def locate_knowbias(loaded: LoadedModel, params: KnowBiasParams, ctx: LocateContext) -> KnowBiasResult:
    """Attribute every chosen question (cached per question and cell), then select as in the module docstring."""
    if loaded.tokenizer is None:
        raise DataError("knowbias needs the model's tokenizer, and this checkpoint has none")
    cells = _cells(loaded.layout, params)
    sizes = [loaded.layout.site_size(site) for _, site in cells]
    path = None if params.questions is None else Path(params.questions)
    if path is not None and not path.is_absolute():
        path = ctx.base_dir / path
    questions = choose_questions(load_questions(path), params.dimensions, params.max_questions)
    n_dims = len({q.dimension for q in questions})
    if params.aggregate == "vote" and params.vote_min > n_dims:
        raise RecipeError(f"locate.vote_min: {params.vote_min} is more than the {n_dims} dimensions used")
    cache = _cache(loaded, params, ctx)
    progress = ctx.progress
    task = progress.add_task("knowbias: integrated gradients", total=len(questions) * len(cells)) if progress else None

    def attribute(question: Question) -> tuple[torch.Tensor, float]:
        entry = cache.get(_item_id(question)) or {}
        todo = [c for c in cells if f"L{c[0]}.{c[1]}" not in entry]
        if progress is not None:
            progress.update(task, description=f"knowbias: {question.id}", advance=len(cells) - len(todo))
        if todo:
            prompt_ids, answer_ids = render(loaded.tokenizer, question, params)
            _check_length(loaded, question, len(prompt_ids) + len(answer_ids) - 1)
            result = attribute_question(
                loaded, prompt_ids, answer_ids, todo, params.steps,
                on_cell=(lambda _c: progress.advance(task)) if progress is not None else None,
            )
            entry.update({f"L{layer}.{site}": v for (layer, site), v in result.attributions.items()})
            entry["probability"] = torch.tensor([result.probability])
            cache.put(_item_id(question), entry)
        return torch.cat([entry[f"L{layer}.{site}"].float() for layer, site in cells]), float(entry["probability"][0])

    attributed = parallel.map_items(attribute, questions)  # torchrun: each rank its share of the questions
    probabilities = [p for _, p in attributed]
    values = torch.stack([row for row, _ in attributed])
    per_dim = dimension_sets(salient(values, params.tau), [q.dimension for q in questions], params.beta)
    selected = aggregate(per_dim, params.aggregate, params.vote_min)
    neuron_set = NeuronSet(
        method="knowbias", params=params.model_dump(mode="json"),
        neurons=to_neurons(cells, sizes, selected, normalised_scores(values)),
    )
    return KnowBiasResult(cells, sizes, questions, values, probabilities, per_dim, selected, neuron_set)


@register("knowbias", KnowBiasParams, "integrated gradients on yes/no bias-knowledge questions (arXiv 2601.21864)")
def run_knowbias(loaded: LoadedModel, params: KnowBiasParams, ctx: LocateContext) -> NeuronSet:
    result = locate_knowbias(loaded, params, ctx)
    if params.report is not None and parallel.is_main():  # torchrun: every rank has the result, rank 0 writes
        path = Path(params.report).expanduser()
        path = path if path.is_absolute() else ctx.base_dir / path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result.report(params.tau), indent=1) + "\n")
    return result.neuron_set
