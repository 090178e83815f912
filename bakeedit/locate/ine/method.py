"""``ine``: interpretable neuron editing for gender bias (Yu & Ananiadou, arXiv 2501.14457, Sec. 5.1).

Three steps, each in its own module:

1. **Logit-based importance** (:mod:`~bakeedit.locate.ine.scores`): on prompts built from everyday words in templates
   that end where a gendered token comes next (:mod:`~bakeedit.locate.ine.data`), score every FFN value neuron
   (``mlp.act``) and attention value neuron (``attn.o_in``) by how much its contribution raises the log-prob gap
   towards the side the model already leans to, and every lower FFN neuron by how much it raises the top value
   neurons' activations (query neurons). Mean over prompts; the top ``candidates`` of each kind form the pool (the
   paper: 50 FFN value + 50 attention value + 50 query neurons).
2. **General neurons**: a neuron whose important position (largest contribution) is the start position in at least
   ``general_fraction`` of the prompts is dropped (the paper's ``<start>`` neurons, whose masking ruins arithmetic
   and reading comprehension).
3. **Causal masking** (:mod:`~bakeedit.locate.ine.causal`): keep the ``k`` (50) pool neurons whose masking lowers the
   bias gap most while a capability probe's loss rises by at most ``loss_tolerance``.

The edit is masking: recipes use ``edit: {lambda: 0.0}``. Scores on the NeuronSet are the logit-based importance in
nats of gap (mean over prompts); the side report has the causal numbers. Per-prompt scores and each masking trial
are cached, so an interrupted run resumes.

Under torchrun every step splits its prompts over the ranks and gathers them (``bakeedit/parallel.py``): the value
and query scores deal out whole prompt batches, and each masking trial deals out its bias and probe batches
(:class:`~bakeedit.locate.ine.causal.MaskProbe`); the batches are those one process forms and the sums run in its
order, so every rank gets the single-process NeuronSet bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from bakeedit import parallel
from bakeedit.errors import DataError
from bakeedit.locate.cache import ItemCache
from bakeedit.locate.ine.causal import Address, CausalResult, MaskProbe, Measurement, select_by_masking
from bakeedit.locate.ine.data import (
    EncodedPrompt,
    encode_probe,
    encode_prompts,
    load_gender_prompts,
    load_probe_sentences,
    spread,
)
from bakeedit.locate.ine.parts import ModelParts, discover_parts
from bakeedit.locate.ine.scores import Targets, make_batch, query_scores, value_scores
from bakeedit.locate.registry import LocateContext, register
from bakeedit.models.load import LoadedModel
from bakeedit.models.spec import site_order
from bakeedit.neurons import Neuron, NeuronSet

log = logging.getLogger(__name__)

#: Bump when a score's definition changes: invalidates cached per-prompt scores and masking trials.
INE_VERSION = 1
KINDS = ("ffn_value", "attn_value", "ffn_query")


class IneParams(BaseModel):
    """The ``locate:`` block of an ``ine`` recipe. Defaults follow the paper (150 candidates, k = 50, masking)."""

    model_config = ConfigDict(extra="forbid")

    k: int = Field(50, ge=1, description="neurons kept by the causal step")
    candidates: int = Field(50, ge=1, description="pool per kind (FFN value, attention value, FFN query) before "
                            "general-neuron exclusion")
    sites: list[Literal["mlp.act", "attn.o_in"]] = Field(default_factory=lambda: ["mlp.act", "attn.o_in"],
                                                         min_length=1)
    include_query_neurons: bool = True
    exclude_general: bool = True
    general_fraction: float = Field(0.5, gt=0, le=1, description="general if the start position is the important "
                                    "position in at least this share of the prompts")
    loss_tolerance: float = Field(0.05, ge=0, description="largest rise of the probe's mean token loss (nats)")
    group_size: int = Field(5, ge=1, description="neurons added per masking trial (1 = plain greedy)")
    words: str | None = Field(None, description="word list JSONL (default: the package's common_words.jsonl)")
    templates: str | None = Field(None, description="templates JSON (default: gender_word_templates.json)")
    probe_sentences: str | None = Field(None, description="neutral sentences, one a line (default: the package's)")
    max_prompts: int | None = Field(256, ge=1, description="prompts scored, spread over categories; None = all")
    causal_prompts: int = Field(64, ge=1, description="of those, how many the masking trials measure the bias on")
    seed: int = 0
    batch_size: int = Field(16, ge=1)
    report: str | None = Field(None, description="JSON side report path (relative: to the recipe)")


@dataclass
class Candidate:
    """A pool neuron with the scores that put it there."""

    address: Address
    kind: str
    score: float  # mean logit-based importance (nats of gap)
    start_share: float  # share of prompts whose important position is the start position


@dataclass
class IneResult:
    prompts: list[EncodedPrompt]
    pool: list[Candidate]  # before general-neuron exclusion
    general: list[Candidate]  # excluded (or, with exclude_general false, only flagged)
    causal: CausalResult | None
    neuron_set: NeuronSet

    def report(self) -> dict[str, Any]:
        """Counts per kind, the excluded general neurons and the masking search, for the side report."""
        causal = self.causal
        kept = set(causal.kept) if causal else set()
        return {
            "prompts": len(self.prompts),
            "mean_abs_gap_base": causal.base.bias if causal else None,
            "pool": {kind: sum(c.kind == kind for c in self.pool) for kind in KINDS},
            "general": [{"neuron": list(c.address), "kind": c.kind, "start_share": round(c.start_share, 4)}
                        for c in self.general],
            "causal": None if causal is None else {
                "base": vars(causal.base), "final": vars(causal.final), "accumulation": causal.trials,
                "screening": [{"neurons": [list(a) for a in members], **vars(m)} for members, m in causal.screened],
            },
            # one entry per kept neuron: one that is both a value and a query candidate lists both kinds
            "kept": [{"neuron": list(address), "kinds": [c.kind for c in self.pool if c.address == address],
                      "score": round(max(c.score for c in self.pool if c.address == address), 6)}
                     for address in dict.fromkeys(c.address for c in self.pool) if address in kept],
            "per_layer": {f"L{layer}.{site}": n for (layer, site), n in sorted(self.neuron_set.histogram().items())},
        }


def _path(value: str | None, ctx: LocateContext) -> Path | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    return path if path.is_absolute() else ctx.base_dir / path


def _model_key(loaded: LoadedModel) -> dict[str, Any]:
    source = loaded.source
    key: dict[str, Any] = {"ref": source.ref, "revision": source.revision, "dtype": str(loaded.dtype)}
    if source.revision is None and source.path.is_dir():
        key["files"] = source.hash_inputs()
    return key


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]


def _item_id(p: EncodedPrompt) -> str:
    return _digest([p.ids, p.female_id, p.male_id])


def _cached_batches(prompts: list[EncodedPrompt], cache: ItemCache, batch_size: int, compute, progress, task):
    """Per prompt ``dict[str, Tensor]`` from the cache, computing the missing ones ``batch_size`` at a time.

    Under torchrun the missing prompts are those missing on any rank (each rank reads its own cache folder, which
    need not be shared); they are cut into the batches one process would cut and whole batches are dealt out
    (:func:`bakeedit.parallel.deal_batches`), so every prompt is scored once, with the same batch companions as in
    one process, and :func:`~bakeedit.parallel.gather_mapping` hands every rank all of them.
    """
    entries = {i: cache.get(_item_id(p)) for i, p in enumerate(prompts)}
    if progress is not None:
        progress.update(task, advance=sum(e is not None for e in entries.values()))
    missing = [i for i, e in entries.items() if e is None]
    todo = sorted(set().union(*parallel.gather_objects(missing)))  # also: every rank has read before any writes
    batches = [todo[start: start + batch_size] for start in range(0, len(todo), batch_size)]
    computed: dict[int, dict[str, torch.Tensor]] = {}
    for _, chunk in parallel.deal_batches(batches):  # all of them in a plain run
        for i, entry in zip(chunk, compute(chunk), strict=True):
            cache.put(_item_id(prompts[i]), entry)
            computed[i] = entry
        if progress is not None:
            progress.update(task, advance=len(chunk))
    entries.update(parallel.gather_mapping(computed))
    return [entries[i] for i in range(len(prompts))]


def _top(mean: torch.Tensor, start_share: torch.Tensor, site: str, kind: str, n: int) -> list[Candidate]:
    """The ``n`` neurons of ``[n_layers, width]`` with the highest positive mean score."""
    flat = mean.flatten()
    order = flat.argsort(descending=True)[:n]
    width = mean.shape[1]
    return [Candidate((int(i) // width, site, int(i) % width), kind, float(flat[i]), float(start_share.flatten()[i]))
            for i in order.tolist() if flat[i] > 0]


def _split_general(pool: list[Candidate], params: IneParams) -> tuple[list[Candidate], list[Candidate]]:
    general = [c for c in pool if c.start_share >= params.general_fraction]
    kept = [c for c in pool if c.start_share < params.general_fraction] if params.exclude_general else pool
    return kept, general


def locate_ine(loaded: LoadedModel, params: IneParams, ctx: LocateContext) -> IneResult:
    """Score, exclude general neurons, mask (see the module docstring)."""
    model, layout, tokenizer = loaded.model, loaded.layout, loaded.tokenizer
    if tokenizer is None:
        raise DataError("ine needs the model's tokenizer, and this checkpoint has none")
    prompts = spread(load_gender_prompts(_path(params.words, ctx), _path(params.templates, ctx), "locate"),
                     params.max_prompts, params.seed)
    config = getattr(model.config, "text_config", None) or model.config
    max_length = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    encoded = encode_prompts(tokenizer, prompts, max_length)
    probe = encode_probe(tokenizer, load_probe_sentences(_path(params.probe_sentences, ctx)), max_length)
    device = loaded.device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    parts = discover_parts(model, layout, torch.tensor(encoded[0].ids, device=device))
    progress = ctx.progress
    model_key = _model_key(loaded)

    # 1. value neurons
    cache = ItemCache(ctx.cache_dir, {"method": "ine-value", "version": INE_VERSION, "model": model_key})
    task = progress.add_task("ine: value neurons", total=len(encoded)) if progress else None

    def compute_values(chunk: list[int]) -> list[dict[str, torch.Tensor]]:
        vs = value_scores(model, layout, parts, make_batch([encoded[i] for i in chunk], pad_id, device))
        return [{"gap": vs.gap[b: b + 1], "direction": vs.direction[b], "ffn": vs.ffn[b], "attn": vs.attn[b],
                 "attn_start": vs.attn_start[b].to(torch.uint8)} for b in range(len(chunk))]

    values = _cached_batches(encoded, cache, params.batch_size, compute_values, progress, task)
    n = len(values)
    pool: list[Candidate] = []
    if "mlp.act" in params.sites:
        ffn_mean = sum(v["ffn"].float() for v in values) / n
        pool += _top(ffn_mean, torch.zeros_like(ffn_mean), "mlp.act", "ffn_value", params.candidates)
    if "attn.o_in" in params.sites:
        attn_mean = sum(v["attn"].float() for v in values) / n
        attn_start = sum(v["attn_start"].float() for v in values) / n
        pool += _top(attn_mean, attn_start, "attn.o_in", "attn_value", params.candidates)
    value_pool, general = _split_general(pool, params)

    # 2. query neurons: lower FFN neurons that activate the value neurons kept so far
    if params.include_query_neurons and value_pool:
        query = _query_candidates(loaded, parts, params, ctx, encoded, values, value_pool, pad_id, model_key)
        pool += query
        query_kept, query_general = _split_general(query, params)
        general += query_general
    else:
        query_kept = []
    merged: dict[Address, Candidate] = {}
    for c in sorted(value_pool + query_kept, key=lambda c: -c.score):
        merged.setdefault(c.address, c)  # a neuron that is both value and query keeps its higher score
    candidates = list(merged.values())

    # 3. causal masking
    causal = _causal(loaded, params, ctx, encoded[: params.causal_prompts], probe, candidates, pad_id, model_key)
    kept = set(causal.kept)
    neurons = [Neuron(layer=c.address[0], site=c.address[1], index=c.address[2], score=round(c.score, 6))
               for c in candidates if c.address in kept]
    neurons.sort(key=lambda nr: (nr.layer, site_order(nr.site), nr.index))
    if len(neurons) < params.k:
        log.warning("ine kept %d neurons, fewer than k = %d: the rest did not lower the bias within the loss "
                    "tolerance", len(neurons), params.k)
    neuron_set = NeuronSet(method="ine", params=params.model_dump(mode="json"), neurons=neurons)
    return IneResult(encoded, pool, general, causal, neuron_set)


def _query_candidates(loaded: LoadedModel, parts: ModelParts, params: IneParams, ctx: LocateContext,
                      encoded: list[EncodedPrompt], values: list[dict[str, torch.Tensor]],
                      targets_pool: list[Candidate], pad_id: int, model_key: dict) -> list[Candidate]:
    ffn: dict[int, list[int]] = {}
    attn: dict[int, list[int]] = {}
    for c in targets_pool:
        (ffn if c.address[1] == "mlp.act" else attn).setdefault(c.address[0], []).append(c.address[2])
    targets = Targets({k: torch.tensor(sorted(v)) for k, v in ffn.items()},
                      {k: torch.tensor(sorted(v)) for k, v in attn.items()})
    target_key = _digest(sorted(list(c.address) for c in targets_pool))
    cache = ItemCache(ctx.cache_dir, {"method": "ine-query", "version": INE_VERSION, "model": model_key,
                                      "targets": target_key})
    progress = ctx.progress
    task = progress.add_task("ine: query neurons", total=len(encoded)) if progress else None
    model, layout, device = loaded.model, loaded.layout, loaded.device

    def compute(chunk: list[int]) -> list[dict[str, torch.Tensor]]:
        batch = make_batch([encoded[i] for i in chunk], pad_id, device)
        direction = torch.stack([values[i]["direction"] for i in chunk])
        score, start = query_scores(model, layout, parts, batch, direction, targets)
        return [{"score": score[b], "start": start[b].to(torch.uint8)} for b in range(len(chunk))]

    rows = _cached_batches(encoded, cache, params.batch_size, compute, progress, task)
    mean = sum(r["score"].float() for r in rows) / len(rows)
    start_share = sum(r["start"].float() for r in rows) / len(rows)
    return _top(mean, start_share, "mlp.act", "ffn_query", params.candidates)


def _causal(loaded: LoadedModel, params: IneParams, ctx: LocateContext, prompts: list[EncodedPrompt],
            probe: list[list[int]], candidates: list[Candidate], pad_id: int, model_key: dict) -> CausalResult:
    mask_probe = MaskProbe(loaded.model, loaded.layout, prompts, probe, pad_id, params.batch_size)
    data_key = _digest([[p.ids, p.female_id, p.male_id] for p in prompts] + [probe])
    cache = ItemCache(ctx.cache_dir, {"method": "ine-causal", "version": INE_VERSION, "model": model_key,
                                      "data": data_key})

    def measure(addresses: list[Address]) -> Measurement:
        key = json.dumps(sorted(list(a) for a in addresses))
        # torchrun: rank 0's cache decides, so that every rank runs the same trials (each one a collective);
        # only rank 0 writes the entry, and the measurement is the same on every rank
        hit = parallel.from_main(cache.get(key) if parallel.is_main() else None)
        if hit is not None:
            return Measurement(float(hit["m"][0]), float(hit["m"][1]))
        m = mask_probe(addresses)
        if parallel.is_main():
            cache.put(key, {"m": torch.tensor([m.bias, m.loss], dtype=torch.float64)})
        return m

    progress = ctx.progress
    groups = math.ceil(len(candidates) / params.group_size)
    expected = 1 + groups + math.ceil(min(params.k, len(candidates)) / params.group_size)
    task = progress.add_task("ine: causal masking", total=expected) if progress else None
    done = [0]

    def tick() -> None:
        done[0] += 1
        if progress is not None:
            progress.update(task, completed=done[0], total=max(expected, done[0]))

    result = select_by_masking([c.address for c in candidates], measure, params.k, params.loss_tolerance,
                               params.group_size, on_trial=tick)
    if progress is not None:
        progress.update(task, completed=done[0], total=done[0])
    return result


@register("ine", IneParams, "logit-based value/query neuron scores, general-neuron exclusion and causal masking for "
          "gender bias (arXiv 2501.14457)")
def run_ine(loaded: LoadedModel, params: IneParams, ctx: LocateContext) -> NeuronSet:
    result = locate_ine(loaded, params, ctx)
    if params.report is not None and parallel.is_main():  # torchrun: every rank has the result, rank 0 writes
        path = _path(params.report, ctx)
        assert path is not None
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result.report(), indent=1) + "\n")
    return result.neuron_set
