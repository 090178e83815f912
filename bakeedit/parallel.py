"""Data parallelism for locate and evaluate: split the items over processes, gather the per-item results.

Locate methods and evaluations loop over items (questions, prompt pairs, examples) whose results are independent;
``torchrun --nproc-per-node N`` (or ``accelerate launch``) starts N copies of the same command, each with ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` in its environment. Inside :func:`distributed`, each process computes its share
(:func:`shard` / :func:`map_items` for item-at-a-time work, :func:`deal_batches` for batched work) and :func:`gather` /
:func:`gather_mapping` hand every process all results, in the single-process order, so the reduction that follows
(means, top-k, thresholds) runs on identical inputs everywhere and gives the same NeuronSet as one process. Only
rank 0 writes files (:func:`is_main`, :func:`main_first`). Evaluation shards at the scorer
(:func:`bakeedit.evaluate.sharded.make_scorer`): every log-likelihood or generation request a task makes is split
over the ranks, so tasks need no change and every rank computes the same metrics.

Every rank must take part in every collective, in the same order: a decision that chooses whether a collective
runs (a cache hit, a failed check) is made once, by rank 0, and handed to the others with :func:`from_main`; work
that only rank 0 needs (a bake, a verification) runs there alone and hands over what the others need next (the
staged folder's path), so a run may wait at a collective for as long as rank 0 bakes: the process group's timeout
is :data:`TIMEOUT_ENV` seconds (default 6 hours).

Same result, bit for bit, needs the same computation per item: batch-1 work is, but a batched forward pass is not
(a padded batch of other lengths changes float sums at the 1e-6 level). Batched work therefore forms the batches
exactly as one process would and deals whole batches out (:func:`deal_batches`; :func:`shard_batches` for callers
that re-batch what they are given), so each batch is computed once, somewhere, with the same companions.

For a model that does not fit one device, ``model.device_map: auto`` (accelerate) spreads the layers over the
devices of one process instead (the two are alternatives: every rank would spread over all GPUs). How to launch:
``docs/performance.md``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from bakeedit.errors import BakeeditError

T = TypeVar("T")
R = TypeVar("R")
K = TypeVar("K", bound=Hashable)

#: Seconds a rank may wait at a collective (rank 0 baking and verifying while the others wait to evaluate).
TIMEOUT_ENV = "BAKEEDIT_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 6 * 3600


@dataclass(frozen=True)
class Ranks:
    """This process's place among the data-parallel processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_ranks() -> Ranks:
    """The ranks torchrun / accelerate launch put in the environment (a plain run is rank 0 of 1)."""
    return Ranks(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                 int(os.environ.get("LOCAL_RANK", 0)))


def ranks() -> Ranks:
    """The ranks of the initialised process group; rank 0 of 1 without one (items are then never split)."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size(), env_ranks().local_rank)
    return Ranks()


def rank_device() -> str:
    """The device this rank should load the model on: its own GPU (``LOCAL_RANK``) when there are GPUs."""
    return f"cuda:{env_ranks().local_rank}" if torch.cuda.is_available() else "cpu"


@contextmanager
def distributed(backend: str | None = None) -> Iterator[Ranks]:
    """Join the process group the launcher describes (a no-op in a plain run) and leave it at the end.

    ``backend`` defaults to ``nccl`` with GPUs, else ``gloo``; the timeout of a collective is ``$BAKEEDIT_DIST_TIMEOUT``
    seconds (default 6 hours: torch's 30 minutes is shorter than a large bake, which the other ranks wait for).
    """
    env = env_ranks()
    created = False
    if env.world_size > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(env.local_rank)
        dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"), timeout=_timeout())
        created = True
    try:
        yield ranks()
        if created:  # every rank is done before any leaves: gloo aborts a process whose peer tore the group down
            dist.barrier()  # (only on a normal exit: after an error on one rank a barrier would wait forever)
    finally:
        if created:
            dist.destroy_process_group()


def _timeout() -> timedelta:
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return timedelta(seconds=DEFAULT_TIMEOUT_S)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise BakeeditError(f"${TIMEOUT_ENV}: '{raw}' is not a number of seconds above 0",
                            hint=f"e.g. {TIMEOUT_ENV}={DEFAULT_TIMEOUT_S} (the default, 6 hours), or unset it")
    return timedelta(seconds=seconds)


def shard(items: Sequence[T], where: Ranks | None = None) -> list[T]:
    """This rank's items: every ``world_size``-th, starting at ``rank`` (balanced when costs vary smoothly)."""
    where = where or ranks()
    return list(items[where.rank :: where.world_size])


def shard_batches(
    items: Sequence[T], batch_size: int, key: Callable[[T], Any] | None = None, where: Ranks | None = None
) -> list[T]:
    """This rank's share of whole batches, the batches being those one process would form.

    One process sorts ``items`` stably by ``key`` (e.g. token length) and cuts a batch every ``batch_size``; batch
    ``i`` goes to rank ``i % world_size``. The returned items keep the sorted order, so a function that re-sorts
    by the same key and cuts every ``batch_size`` (as ``locate/responses.record_last_tokens`` does) rebuilds
    exactly these batches: every batch but the globally last is full, and that one ends the last rank's list.
    """
    where = where or ranks()
    ordered = sorted(items, key=key) if key is not None else list(items)
    batches = [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
    return [item for batch in batches[where.rank :: where.world_size] for item in batch]


def gather_objects(obj: T) -> list[T]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` in a plain run."""
    if ranks().world_size == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def from_main(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (what the others pass is ignored; ``None`` will do): one decision, taken
    once, for choices that decide which collectives follow, and results only rank 0 computes."""
    if ranks().world_size == 1:
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(local: Sequence[R], n_items: int, where: Ranks | None = None) -> list[R]:
    """Every rank's :func:`shard` results, back in the order of the ``n_items`` items (on every rank)."""
    where = where or ranks()
    parts = gather_objects(list(local))
    merged: list[Any] = [None] * n_items
    for rank, part in enumerate(parts):
        merged[rank :: where.world_size] = part
    return merged


def gather_mapping(local: dict[K, R]) -> dict[K, R]:
    """The union of every rank's ``{item key: result}`` (on every rank); a key computed twice is an error."""
    merged: dict[K, R] = {}
    for part in gather_objects(local):
        overlap = merged.keys() & part.keys()
        if overlap:
            raise RuntimeError(f"items computed on two ranks: {sorted(map(str, overlap))[:3]}")
        merged.update(part)
    return merged


def map_items(fn: Callable[[T], R], items: Sequence[T], on_item: Callable[[], None] | None = None) -> list[R]:
    """``[fn(x) for x in items]``, each rank doing its :func:`shard`; every rank gets all results in order."""
    local = []
    for item in shard(items):
        local.append(fn(item))
        if on_item is not None:
            on_item()
    return gather(local, len(items))


def is_main() -> bool:
    return ranks().is_main


def barrier() -> None:
    if ranks().world_size > 1:
        dist.barrier()


@contextmanager
def main_first() -> Iterator[bool]:
    """Rank 0 runs the block first (writing a file, filling a cache), the others wait, then run it; yields
    whether this is rank 0, for blocks that only rank 0 should act in."""
    main = is_main()
    if not main:
        barrier()
    try:
        yield main
    finally:
        if main:
            barrier()


def deal_batches(batches: Sequence[Sequence[T]], where: Ranks | None = None) -> list[tuple[int, Sequence[T]]]:
    """``(position, batch)`` of this rank's batches: batch ``i`` of the single-process order goes to rank
    ``i % world_size`` (the batches are longest first, so the work stays balanced)."""
    where = where or ranks()
    return [(i, b) for i, b in enumerate(batches) if i % where.world_size == where.rank]
