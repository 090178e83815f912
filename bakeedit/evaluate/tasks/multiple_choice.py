"""Multiple-choice scoring shared by ARC, OpenBookQA, COPA, PIQA, HellaSwag, Winogrande and MMLU.

Each option is scored by the log-likelihood of its continuation given the context, as lm-evaluation-harness does
(``output_type: multiple_choice``):

    acc      = 1[argmax_i  LL_i == gold]
    acc_norm = 1[argmax_i  LL_i / len(choice_i) == gold]     (length in characters of the choice text, without the
                                                               leading space; lm-eval's ``completion_len``)

``np.argmax`` takes the first maximum on ties, as lm-eval does. Standard errors are bootstrap standard errors of the
mean over items.
"""

from __future__ import annotations

from abc import abstractmethod
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from bakeedit.errors import DataError
from bakeedit.evaluate.tasks.base import (
    MetricValue,
    Task,
    TaskData,
    TaskResult,
    mean_metric,
    resolve_source,
    sample_items,
    text_sha256,
)

if TYPE_CHECKING:
    from bakeedit.evaluate.engine import Scorer


@dataclass
class MCItem:
    """One multiple-choice item in scoring form.

    ``context`` is shared by all options unless ``contexts`` gives one per option (Winogrande's partial scoring,
    where the options sit in the context and the continuation is shared). ``continuations`` default to
    ``" " + choice`` (lm-eval's ``target_delimiter``). ``group`` keys the per-group breakdown (e.g. MMLU subject).
    """

    id: str
    context: str
    choices: list[str]
    gold: int
    continuations: list[str] | None = None
    contexts: list[str] | None = None
    group: str | None = None

    def requests(self) -> list[tuple[str, str]]:
        conts = self.continuations or [" " + c for c in self.choices]
        ctxs = self.contexts or [self.context] * len(conts)
        return list(zip(ctxs, conts, strict=True))


def check_gold(gold: Any, n_choices: int, where: str, field: str = "gold") -> int:
    """``gold`` as an int in ``[0, n_choices)`` or a DataError naming ``where`` (``file:line``) and the field."""
    try:
        g = int(gold)
    except (TypeError, ValueError):
        raise DataError(f"{where}: field {field!r} must be an integer, got {gold!r}") from None
    if not 0 <= g < n_choices:
        raise DataError(f"{where}: field {field!r} = {g} is out of range for {n_choices} choices")
    return g


def score_items(scorer: Scorer, items: list[MCItem]) -> list[np.ndarray]:
    """Per item, the array of option log-likelihoods (one batched scorer call for all options of all items)."""
    requests = [r for it in items for r in it.requests()]
    results = scorer.loglikelihood(requests)
    out, k = [], 0
    for it in items:
        n = len(it.requests())
        out.append(np.array([r.logprob for r in results[k:k + n]], dtype=np.float64))
        k += n
    return out


def mc_metrics(items: list[MCItem], lls: list[np.ndarray], norm: bool, seed: int = 0) -> tuple[
    dict[str, MetricValue], dict[str, dict[str, MetricValue]]
]:
    """acc (and acc_norm) over all items, and per ``group`` when items carry one."""
    acc = np.array([float(np.argmax(ll) == it.gold) for it, ll in zip(items, lls, strict=True)])
    lens = [np.array([float(len(c)) for c in it.choices]) for it in items]
    acc_norm = np.array([float(np.argmax(ll / n) == it.gold) for it, ll, n in zip(items, lls, lens, strict=True)])

    def metrics(idx: np.ndarray) -> dict[str, MetricValue]:
        m = {"acc": mean_metric("acc", acc[idx], seed=seed)}
        if norm:
            m["acc_norm"] = mean_metric("acc_norm", acc_norm[idx], seed=seed)
        return m

    breakdown: dict[str, dict[str, MetricValue]] = {}
    groups: dict[str, list[int]] = defaultdict(list)
    for i, it in enumerate(items):
        if it.group is not None:
            groups[it.group].append(i)
    for g in sorted(groups):
        breakdown[g] = metrics(np.array(groups[g]))
    return metrics(np.arange(len(items))), breakdown


def mc_item_values(items: list[MCItem], lls: list[np.ndarray], norm: bool) -> dict[str, np.ndarray]:
    """Per-item ``acc`` (and ``acc_norm``) 0/1 scores, kept for paired comparisons between models."""
    out = {"acc": np.array([float(np.argmax(ll) == it.gold) for it, ll in zip(items, lls, strict=True)])}
    if norm:
        out["acc_norm"] = np.array([float(np.argmax(ll / np.array([float(len(c)) for c in it.choices])) == it.gold)
                                    for it, ll in zip(items, lls, strict=True)])
    return out


class MultipleChoiceTask(Task):
    """A task whose items are :class:`MCItem`; subclasses read their original format into items."""

    kind: ClassVar[str] = "capability"
    # report acc_norm? lm-eval does for ARC, OpenBookQA, PIQA, HellaSwag; not for COPA, Winogrande, MMLU
    norm: ClassVar[bool] = True

    @abstractmethod
    def read_local(self, path: Path) -> tuple[list[MCItem], list[Path]]:
        """Items from the original local files under ``path`` (a folder or a file), and the files read."""

    def read_hf(self, dataset_id: str) -> list[MCItem]:
        """Items from a Hugging Face dataset id; tasks that support it override this."""
        raise DataError(f"task {self.name!r} cannot read the Hugging Face dataset {dataset_id!r}; use a local copy")

    def load(self, source: str | Path | None, limit: int | None, seed: int) -> TaskData:
        where = resolve_source(source, self.default_source, self.hf_dataset)
        if isinstance(where, Path):
            items, files = self.read_local(where)
            if not items:
                raise DataError(f"no items found in {', '.join(map(str, files))} for task {self.name!r}")
            return TaskData.sampled(items, files, limit, seed, files[0] if len(files) == 1 else files[0].parent)
        items = self.read_hf(where)
        if not items:
            raise DataError(f"no items found in hf:{where} for task {self.name!r}")
        sha = text_sha256(repr([(i.id, i.context, i.choices, i.gold) for i in items]))
        return TaskData(sample_items(items, limit, seed), f"hf:{where}", sha, limit, seed, len(items))

    def evaluate(self, scorer: Scorer, data: TaskData) -> TaskResult:
        lls = score_items(scorer, data.items)
        metrics, breakdown = mc_metrics(data.items, lls, self.norm, seed=data.seed)
        return self.result(data, metrics, breakdown, self.item_scores(data, **mc_item_values(data.items, lls,
                                                                                             self.norm)))
