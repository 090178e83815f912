"""Record site activations over the last tokens of prompts: batched, right-padded, cached per item.

A locate method that compares how neurons respond to sets of prompts (``coco``) needs, per prompt, the activations
of every channel of some sites at the last ``t`` positions. Prompts are rendered with the model's chat template (or
raw), batched by length with right padding (causal attention: padding after a sequence cannot change its
activations, and positions stay exact, unlike left padding), and each item's tensors go to an
:class:`~bakeedit.locate.cache.ItemCache` as soon as its batch is done, so an interrupted run resumes.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from bakeedit import parallel
from bakeedit.errors import DataError
from bakeedit.locate.cache import ItemCache
from bakeedit.models.hookpoints import capture_sites
from bakeedit.models.load import WEIGHT_SUFFIXES, LoadedModel

AnswerFormat = Literal["auto", "chat", "raw"]
#: Appended to a raw (no chat template) prompt so that the last tokens are where the model starts to answer.
RAW_SUFFIX = "\nAnswer:"
Address = tuple[int, str]


def resolve_format(tokenizer: Any, answer_format: AnswerFormat) -> Literal["chat", "raw"]:
    """``auto`` = the chat template when the tokenizer has one, else raw text."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if answer_format == "chat" and not has_template:
        raise DataError("answer_format: 'chat' needs a tokenizer with a chat template", hint="use raw or auto")
    if answer_format == "auto":
        return "chat" if has_template else "raw"
    return answer_format


def render_ids(tokenizer: Any, text: str, fmt: Literal["chat", "raw"]) -> list[int]:
    """Token ids of ``text`` as a user turn awaiting the assistant's answer (chat) or followed by ``Answer:``."""
    if fmt == "chat":
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    return list(tokenizer(text + RAW_SUFFIX, add_special_tokens=True)["input_ids"])


def model_fingerprint(loaded: LoadedModel) -> dict[str, Any]:
    """What identifies the model's activations, cheaply: reference, revision, weight files' sizes and mtimes
    (hashing gigabytes on every run would cost more than the forward passes it saves), dtype and device type."""
    files: dict[str, list[int]] = {}
    path = loaded.source.path
    if path.is_dir():
        for f in sorted(path.iterdir()):
            if f.is_file() and (f.suffix in WEIGHT_SUFFIXES or f.name in ("config.json", "SOURCE_GGUF_SHA256")):
                stat = f.stat()
                files[f.name] = [stat.st_size, stat.st_mtime_ns]
    return {
        "ref": loaded.source.ref, "kind": loaded.source.kind, "path": str(path),
        "revision": loaded.source.revision, "files": files, "dtype": str(loaded.dtype),
        "device": loaded.device.type,
    }


def ids_digest(ids: Sequence[int]) -> str:
    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RecordItem:
    """One cache entry: several named prompts (e.g. ``{"x": ids, "y": ids}``) recorded together."""

    key: str
    prompts: dict[str, list[int]]

    @property
    def cache_id(self) -> str:
        """The key plus the digest of every prompt's ids: edited data or a new tokenizer never hits old entries."""
        return self.key + "|" + "|".join(f"{n}:{ids_digest(ids)}" for n, ids in sorted(self.prompts.items()))


def tensor_name(prompt: str, layer: int, site: str) -> str:
    return f"{prompt}.{layer}.{site}"


def _max_positions(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def _forward(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    """One forward pass whose only purpose is to fire the capture hooks (only the last logit is computed)."""
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1
    model(**kwargs)


def record_last_tokens(
    loaded: LoadedModel,
    items: Sequence[RecordItem],
    addresses: Sequence[Address],
    last_tokens: int,
    batch_size: int,
    cache: ItemCache,
    on_item: Callable[[int], None] | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """Activations ``[last_tokens, site_size]`` of every address for every prompt of every item.

    Returns ``{item.key: {tensor_name(prompt, layer, site): tensor}}``. ``on_item(n)`` is called as ``n`` items
    are done (cached ones first), for progress bars.
    """
    limit = _max_positions(loaded.model)
    for item in items:
        for name, ids in item.prompts.items():
            if len(ids) < last_tokens:
                raise DataError(f"item {item.key}: prompt '{name}' has {len(ids)} tokens, fewer than last_tokens "
                                f"= {last_tokens}")
            if limit is not None and len(ids) > limit:
                raise DataError(f"item {item.key}: prompt '{name}' has {len(ids)} tokens, more than the model's "
                                f"{limit} positions", hint="use shorter prompts or answer_format: raw")
    out: dict[str, dict[str, torch.Tensor]] = {}
    todo: list[RecordItem] = []
    for item in items:
        hit = cache.get(item.cache_id)
        if hit is not None:
            out[item.key] = hit
        else:
            todo.append(item)
    if on_item is not None and out:
        on_item(len(out))
    parallel.barrier()  # torchrun: every rank has read the cache before any writes to it, so all agree on todo
    todo.sort(key=lambda it: max(len(ids) for ids in it.prompts.values()))
    batches = [todo[start : start + batch_size] for start in range(0, len(todo), batch_size)]
    computed: dict[str, dict[str, torch.Tensor]] = {}
    for _, chunk in parallel.deal_batches(batches):  # all of them in a plain run
        for item, tensors in zip(chunk, _record_batch(loaded, chunk, addresses, last_tokens), strict=True):
            cache.put(item.cache_id, tensors)
            computed[item.key] = tensors
        if on_item is not None:
            on_item(len(chunk))
    out.update(parallel.gather_mapping(computed))
    return out


def _record_batch(
    loaded: LoadedModel, chunk: Sequence[RecordItem], addresses: Sequence[Address], last_tokens: int
) -> list[dict[str, torch.Tensor]]:
    rows = [(i, name, ids) for i, item in enumerate(chunk) for name, ids in item.prompts.items()]
    width = max(len(ids) for _, _, ids in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for r, (_, _, ids) in enumerate(rows):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        mask[r, : len(ids)] = 1
    device = loaded.device
    # each row's last ``last_tokens`` positions, gathered as each site is recorded (not the whole activations)
    ends = torch.tensor([len(ids) for _, _, ids in rows])
    positions = (ends[:, None] - last_tokens + torch.arange(last_tokens)[None, :]).to(device)
    row_index = torch.arange(len(rows), device=device)[:, None]
    with torch.no_grad(), capture_sites(loaded.model, loaded.layout, list(addresses),
                                        keep=lambda act: act[row_index, positions]) as store:
        _forward(loaded.model, input_ids.to(device), mask.to(device))
    results: list[dict[str, torch.Tensor]] = [{} for _ in chunk]
    for r, (i, name, _ids) in enumerate(rows):
        for layer, site in addresses:
            results[i][tensor_name(name, layer, site)] = store[(layer, site)][r].float().cpu().clone()
    return results
