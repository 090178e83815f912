"""``coco``: neurons whose responses are consistent within a social context and contrast between contexts.

COCO ("Uncovering Neuronal Mechanisms of Intrinsic Self-Debiasing in LLMs via Contrastive Learning", ICLR 2026
submission; follow-up arXiv 2605.09647) records the responses of the Query and Value channels on prompt sets in
contrasting social contexts and keeps the ~1% of neurons with intra-consistency and inter-contrast. Our
reconstruction (``../shared/METHODS.md``, docs/methods/coco.md):

1. for each category of ``contrast_prompts.jsonl``: X = context + stereotype-inviting question, Y = the same
   context + a neutral question, each rendered as a user turn awaiting the answer;
2. a neuron's response to a prompt = its activations over the last ``last_tokens`` tokens (where the model starts
   to answer), recorded for every channel of ``sites`` in every layer;
3. per category and neuron, the InfoNCE loss of :mod:`bakeedit.locate.coco.score` (positives: pairs in the same
   set; negatives: pairs across sets), and the score ``1 - loss / chance_loss`` (monotone in the loss, higher = more
   COCO-like; 1 = perfect separation, 0 = all similarities equal; a neuron with no X/Y structure scores a little
   below 0, since noisy similarities raise the loss above ``chance_loss``);
4. selection with ``k = round(top_fraction * neurons scored)``: ``selection: per_category`` (default, METHODS.md)
   keeps each category's ``k`` lowest-loss neurons (its threshold epsilon is the ``k``-th loss) and unites them;
   ``selection: overall`` keeps the ``k`` neurons with the best score in any category, so the set is exactly
   ``top_fraction`` of the scored neurons. ``Neuron.score`` is the score of the neuron's best category;
5. a permutation null (:mod:`bakeedit.locate.coco.select`): the same scores with X/Y relabelled at random within
   items, so the report can say how many selected neurons beat anything chance produced.

The per-neuron InfoNCE loss, Cohen's d and categories, the per-category thresholds and counts, and the per-layer and
per-site distributions go to a JSON side report (``report``): the NeuronSet schema has no field for them.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from bakeedit import parallel
from bakeedit.data import package_data_path
from bakeedit.data.contrast import CONTRAST_FILE, ContrastItem, by_category, load_contrast_items
from bakeedit.errors import DataError
from bakeedit.locate.cache import ItemCache
from bakeedit.locate.coco.responses import (
    AnswerFormat,
    RecordItem,
    model_fingerprint,
    record_last_tokens,
    render_ids,
    resolve_format,
)
from bakeedit.locate.coco.select import Selection, score_categories
from bakeedit.locate.registry import LocateContext, register
from bakeedit.models.arch import Site
from bakeedit.models.load import LoadedModel
from bakeedit.models.spec import site_order
from bakeedit.neurons import NeuronSet

#: Bumped when the recorded responses change meaning, so old cache entries are never reused.
RESPONSES_VERSION = 1


class CocoParams(BaseModel):
    """The ``locate:`` block of a ``coco`` recipe."""

    model_config = ConfigDict(extra="forbid")

    sites: list[Site] = Field(default_factory=lambda: ["attn.q", "attn.v"], min_length=1)
    last_tokens: int = Field(default=4, ge=1, description="response = activations over the last t tokens")
    temperature: float = Field(default=1.0, gt=0, description="tau of the InfoNCE similarity")
    top_fraction: float = Field(default=0.01, gt=0, le=1, description="share of the scored neurons kept (per "
                                "category or overall, see selection)")
    selection: Selection = Field(default="per_category", description="per_category: each category's top_fraction, "
                                 "united; overall: top_fraction of all scored neurons by their best category")
    categories: list[str] | None = Field(default=None, description="default: every category of the file")
    prompts: str | None = Field(default=None, description="contrast prompts JSONL; default: the package's own")
    split: Literal["locate", "all"] = "locate"
    max_items: int | None = Field(default=None, ge=2, description="at most this many items per category")
    answer_format: AnswerFormat = "auto"
    batch_size: int = Field(default=8, ge=1, description="items per forward pass (two prompts each)")
    null_permutations: int = Field(default=1, ge=0, description="X/Y relabellings scored as a chance baseline")
    seed: int = Field(default=0, description="seed of the null's relabelling")
    report: str | None = Field(default=None, description="JSON side report path (relative: to the recipe)")

    @field_validator("sites")
    @classmethod
    def _unique(cls, sites: list[str]) -> list[str]:
        if len(set(sites)) != len(sites):
            raise ValueError("sites must not repeat")
        return sorted(sites, key=site_order)


def _prompts_path(params: CocoParams, ctx: LocateContext) -> Path:
    if params.prompts is None:
        return package_data_path(CONTRAST_FILE)
    path = Path(params.prompts).expanduser()
    return path if path.is_absolute() else ctx.base_dir / path


def _record(loaded: LoadedModel, items: list[ContrastItem], params: CocoParams, fmt: str, prompts_path: Path,
            ctx: LocateContext) -> dict[str, dict[str, torch.Tensor]]:
    if loaded.tokenizer is None:
        raise DataError("coco needs the model's tokenizer, and the checkpoint folder has none")
    record_items = [
        RecordItem(key=it.id, prompts={"x": render_ids(loaded.tokenizer, it.x_text, fmt),
                                       "y": render_ids(loaded.tokenizer, it.y_text, fmt)})
        for it in items
    ]
    addresses = [(layer, site) for layer in range(loaded.layout.n_layers) for site in params.sites]
    parts = {
        "method": "coco", "version": RESPONSES_VERSION, "model": model_fingerprint(loaded), "sites": params.sites,
        "last_tokens": params.last_tokens, "answer_format": fmt,
        "data_sha256": hashlib.sha256(prompts_path.read_bytes()).hexdigest(),
    }
    cache = ItemCache(ctx.cache_dir, parts)
    progress, task = ctx.progress, None
    if progress is not None:
        task = progress.add_task("coco: recording responses", total=len(record_items))

    def advance(n: int) -> None:
        if progress is not None:
            progress.advance(task, n)

    return record_last_tokens(loaded, record_items, addresses, params.last_tokens, params.batch_size, cache, advance)


def _write_report(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, path)


@register("coco", CocoParams, "neurons with intra-consistent, inter-contrasting responses to X/Y prompt sets (InfoNCE)")
def run_coco(loaded: LoadedModel, params: CocoParams, ctx: LocateContext) -> NeuronSet:
    for site in params.sites:
        loaded.layout.site_map(site)  # an UnsupportedArchitecture naming the site before any forward pass
    prompts_path = _prompts_path(params, ctx)
    items = load_contrast_items(prompts_path, split=None if params.split == "all" else params.split,
                                categories=params.categories, max_items=params.max_items)
    fmt = resolve_format(loaded.tokenizer, params.answer_format)
    responses = _record(loaded, items, params, fmt, prompts_path, ctx)
    groups = by_category(items)
    progress = ctx.progress
    task = None if progress is None else progress.add_task("coco: scoring categories", total=len(groups))
    result = score_categories(
        responses, groups, loaded.layout.n_layers, params.sites, params.temperature, params.top_fraction, fmt,
        params.null_permutations, params.seed,
        on_category=None if progress is None else lambda _category: progress.advance(task, 1),
        selection=params.selection,
    )
    if params.report is not None and parallel.is_main():  # torchrun: every rank has the result, rank 0 writes
        path = Path(params.report).expanduser()
        _write_report(result.report(), path if path.is_absolute() else ctx.base_dir / path)
    return result.neuron_set()
