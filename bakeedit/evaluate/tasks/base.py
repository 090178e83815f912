"""The task interface: a task is data + a prompt format + a scoring rule + metrics (lm-evaluation-harness's shape).

A :class:`Task` loads its items from the original local format (or a Hugging Face dataset id when online), asks a
:class:`~bakeedit.evaluate.engine.Scorer` for log-likelihoods or generations, and returns a :class:`TaskResult` that
records the task version, the number of items, the data source and its sha256, the ``--limit`` and the seed, so a
number in a report can always be traced back to exactly what was scored.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from bakeedit.errors import DataError, RecipeError
from bakeedit.evaluate.stats import N_BOOT, ItemScores, bootstrap_se, mean_se
from bakeedit.io.hashing import file_sha256
from bakeedit.io.jsonl import read_jsonl_numbered

if TYPE_CHECKING:
    from bakeedit.evaluate.engine import Scorer

DATA_DIR_ENV = "BAKEEDIT_DATA_DIR"


@dataclass
class MetricValue:
    """One number of a result; ``stderr`` is a bootstrap (or analytic) standard error, None where undefined."""

    name: str
    value: float
    stderr: float | None
    n: int
    higher_is_better: bool | None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": _finite_or_none(self.value),
            "stderr": _finite_or_none(self.stderr),
            "n": self.n,
            "higher_is_better": self.higher_is_better,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> MetricValue:
        value = d.get("value")
        return cls(
            name=d["name"],
            value=float("nan") if value is None else float(value),
            stderr=None if d.get("stderr") is None else float(d["stderr"]),
            n=int(d["n"]),
            higher_is_better=d.get("higher_is_better"),
        )


@dataclass
class TaskResult:
    """Everything a report needs about one task run on one model."""

    task: str
    version: str
    kind: str  # "bias" | "capability"
    metrics: dict[str, MetricValue]
    n: int
    data_source: str
    data_sha256: str
    limit: int | None
    seed: int
    breakdown: dict[str, dict[str, MetricValue]] = field(default_factory=dict)  # e.g. per category / subject
    extra: dict[str, Any] = field(default_factory=dict)  # task options (subjects, num_fewshot, ...), JSON-able
    items: ItemScores | None = None  # per-item scores for paired comparisons (None: results written before them)
    split: str = "all"  # "all" | "dev" | "test": which part of the task's items was scored (see split_of)

    def to_json(self) -> dict[str, Any]:
        out = self._summary_json()
        if self.items is not None:
            out["items"] = self.items.to_json()
        return out

    def _summary_json(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "version": self.version,
            "kind": self.kind,
            "n": self.n,
            "data_source": self.data_source,
            "data_sha256": self.data_sha256,
            "limit": self.limit,
            "seed": self.seed,
            "split": self.split,
            "metrics": {k: m.to_json() for k, m in self.metrics.items()},
            "breakdown": {g: {k: m.to_json() for k, m in ms.items()} for g, ms in self.breakdown.items()},
            "extra": self.extra,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TaskResult:
        return cls(
            task=d["task"],
            version=d["version"],
            kind=d["kind"],
            metrics={k: MetricValue.from_json(m) for k, m in d["metrics"].items()},
            n=int(d["n"]),
            data_source=d["data_source"],
            data_sha256=d["data_sha256"],
            limit=d.get("limit"),
            seed=int(d.get("seed", 0)),
            breakdown={
                g: {k: MetricValue.from_json(m) for k, m in ms.items()} for g, ms in d.get("breakdown", {}).items()
            },
            extra=dict(d.get("extra", {})),
            items=ItemScores.from_json(d["items"]) if d.get("items") else None,
            split=str(d.get("split", "all")),
        )


@dataclass
class TaskData:
    """The items a task will score, with where they came from (``n_total``: items before ``limit`` sampling)."""

    items: list[Any]
    source: str
    sha256: str
    limit: int | None
    seed: int
    n_total: int
    split: str = "all"

    @classmethod
    def sampled(cls, items: Sequence[Any], files: Path | Sequence[Path], limit: int | None, seed: int,
                source: str | Path | None = None) -> TaskData:
        """The one ending of every local loader: ``limit`` of ``items`` drawn with ``seed``, the digest of the
        ``files`` read, and where they came from (``source``, default the first file)."""
        files = [files] if isinstance(files, Path) else list(files)
        shown = str(source if source is not None else files[0])
        return cls(sample_items(items, limit, seed), shown, data_sha256(files), limit, seed, len(items))


class Task(ABC):
    """Base class of every task. Subclasses set the class variables and implement ``load`` and ``evaluate``.

    ``default_source`` is the folder name under the data directory (``$BAKEEDIT_DATA_DIR`` or ``--data-dir``) that
    holds the original files, e.g. ``"arc"``; ``hf_dataset`` optionally names a Hugging Face dataset id used when no
    local copy exists and the machine is online.
    """

    name: ClassVar[str]
    version: ClassVar[str]
    kind: ClassVar[str]
    default_source: ClassVar[str]
    hf_dataset: ClassVar[str | None] = None

    @abstractmethod
    def load(self, source: str | Path | None, limit: int | None, seed: int) -> TaskData:
        """Read the items (original format), sample ``limit`` of them with ``seed``."""

    @abstractmethod
    def evaluate(self, scorer: Scorer, data: TaskData) -> TaskResult:
        """Score ``data`` with ``scorer`` and compute the metrics."""

    def options(self) -> dict[str, Any]:
        """The task's options (recorded in ``TaskResult.extra``); tasks with options override this."""
        return {}

    def cluster_of(self, item: Any, index: int) -> str:
        """The cluster an item belongs to for the bootstrap (items of one cluster are resampled together, see
        :mod:`bakeedit.evaluate.stats`); by default every item is its own cluster. Tasks whose items come in
        near-copies (BBQ templates, StereoSet targets, WinoGender occupations) override this."""
        return str(index)

    def clusters(self, data: TaskData) -> list[str]:
        """:meth:`cluster_of` of every item, in item order."""
        return [self.cluster_of(it, i) for i, it in enumerate(data.items)]

    def item_scores(self, data: TaskData, labels: dict[str, Sequence[Any]] | None = None,
                    **values: Sequence[float] | np.ndarray) -> ItemScores:
        """Per-item scores of ``data`` with their clusters, for :meth:`result`."""
        return ItemScores.build(self.clusters(data), labels, **values)

    def item_metrics(self, scores: ItemScores) -> dict[str, float]:
        """Every task-level metric recomputed from per-item scores (what the paired bootstrap calls on each
        resample). Default: each value array is the per-item score of the metric of the same name, and the metric
        is its mean; tasks with other metrics (ratios, per-target averages, correlations) override this."""
        return {k: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for k, v in scores.values.items()}

    def local_folder(self, source: str | Path | None, wants: str) -> Path:
        """The local data folder (or file) of a task that reads original files only; a Hub id is refused with one
        line saying what to point ``--data-dir`` at (``wants``: the files, e.g. ``crows_pairs/<file>``)."""
        where = resolve_source(source, self.default_source)
        if isinstance(where, str):
            raise DataError(f"{self.name} reads the original files only; {where!r} is not a local folder",
                            hint=f"point --data-dir at a folder holding {wants}")
        return where

    def run(
        self, scorer: Scorer, source: str | Path | None = None, limit: int | None = None, seed: int = 0
    ) -> TaskResult:
        """``load`` then ``evaluate``: the one call a CLI needs."""
        return self.evaluate(scorer, self.load(source, limit, seed))

    def result(
        self,
        data: TaskData,
        metrics: dict[str, MetricValue],
        breakdown: dict[str, dict[str, MetricValue]] | None = None,
        items: ItemScores | None = None,
    ) -> TaskResult:
        """Build a :class:`TaskResult` carrying this task's identity, ``data``'s provenance and the per-item scores
        (``items``, from :meth:`item_scores`) that paired comparisons between models need."""
        return TaskResult(
            task=self.name,
            version=self.version,
            kind=self.kind,
            metrics=metrics,
            n=len(data.items),
            data_source=portable_source(data.source),
            data_sha256=data.sha256,
            limit=data.limit,
            seed=data.seed,
            breakdown=breakdown or {},
            extra=self.options(),
            items=items,
            split=data.split,
        )

    def load_split(self, source: str | Path | None, limit: int | None, seed: int, split: str = "all") -> TaskData:
        """:meth:`load`, restricted to one part of the items: ``all`` is :meth:`load` itself (lm-evaluation-harness's
        items, item for item); ``dev`` or ``test`` keeps the items whose bootstrap cluster :func:`split_of` assigns
        there, then draws ``limit`` of them with ``seed``. ``bakeedit search`` reads ``dev`` only; the report of a
        searched recipe reads ``test``, so the numbers it publishes come from items no choice was made on."""
        if split == "all":
            return self.load(source, limit, seed)
        if split not in SPLITS:
            raise RecipeError(f"evaluate.split: unknown split {split!r}", hint="use one of: " + ", ".join(SPLITS))
        full = self.load(source, None, seed)
        kept = [it for i, it in enumerate(full.items) if split_of(self.name, self.cluster_of(it, i)) == split]
        return TaskData(sample_items(kept, limit, seed), full.source, full.sha256, limit, seed, len(kept), split)


#: The parts a task's items can be restricted to: everything, or one side of the fixed dev/test partition.
SPLITS = ("all", "dev", "test")
#: The share of each task's clusters in the dev part (the rest is test).
DEV_FRACTION = 0.3
_SPLIT_SALT = "bakeedit-split-v1"


def split_of(task: str, cluster: str) -> str:
    """``"dev"`` or ``"test"``: a fixed partition of a task's items, by a hash of the task name and the item's
    bootstrap cluster (:meth:`Task.cluster_of`), so that near-copies (a BBQ template's variants, a WinoGender
    occupation's sentences) never straddle the two parts and the partition does not depend on ``limit``, ``seed``
    or the order of the other items. Documented in docs/data.md; changing it changes every published test number,
    so it is versioned by ``_SPLIT_SALT``."""
    digest = hashlib.sha256(f"{_SPLIT_SALT}:{task}:{cluster}".encode()).digest()
    return "dev" if int.from_bytes(digest[:8], "big") / 2**64 < DEV_FRACTION else "test"


def portable_source(source: str) -> str:
    """What a result records as its data source: a dataset id as given, a local file as its folder and name only
    (``crows_pairs/crows_pairs_anonymized.csv``). Results are published in baked folders and cards, which must not
    hold the machine's paths; the sha256 beside it identifies the exact file."""
    path = Path(source)
    if not path.is_absolute():
        return source
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


# ----------------------------------------------------------------------------------------------------- registry

_TASKS: dict[str, type[Task]] = {}


class UnknownTaskError(RecipeError):
    """A task name that no registered task answers to."""


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make ``cls`` available to :func:`get_task` under ``cls.name``."""
    existing = _TASKS.get(cls.name)
    if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
        raise ValueError(f"task name {cls.name!r} is registered twice ({existing.__qualname__}, {cls.__qualname__})")
    _TASKS[cls.name] = cls
    return cls


def _ensure_tasks_imported() -> None:
    import bakeedit.evaluate.tasks  # noqa: F401  (imports every task module, which registers them)


def available_tasks(kind: str | None = None) -> list[str]:
    """Names of the registered tasks, sorted; ``kind`` ("bias" | "capability") filters."""
    _ensure_tasks_imported()
    return sorted(n for n, c in _TASKS.items() if kind is None or c.kind == kind)


def get_task(name: str, **options: Any) -> Task:
    """An instance of the task registered as ``name`` (``options`` go to its constructor, e.g. ``subjects=``)."""
    _ensure_tasks_imported()
    cls = _TASKS.get(name)
    if cls is None:
        raise UnknownTaskError(
            f"unknown evaluation task {name!r}",
            hint="available tasks: " + ", ".join(available_tasks()),
        )
    try:
        return cls(**options)
    except TypeError as e:
        raise RecipeError(f"task {name!r} does not accept options {sorted(options)}: {e}") from None


# ----------------------------------------------------------------------------------------------------- statistics


def bootstrap_stderr(
    values: Sequence[float] | np.ndarray | int,
    statistic: Callable[[Any], float] = np.mean,
    n_boot: int = N_BOOT,
    seed: int = 0,
    clusters: Sequence[Any] | None = None,
) -> float:
    """Bootstrap standard error of ``statistic``, kept for callers of the old API: a thin front of
    :func:`bakeedit.evaluate.stats.bootstrap_se` / :func:`~bakeedit.evaluate.stats.mean_se` (the one bootstrap).

    ``values`` an array of per-item values and ``statistic`` a function of a resampled array (default the mean); or
    ``values`` an int ``n`` and ``statistic`` a function of an index array. ``clusters`` resamples whole clusters.
    NaN when there are fewer than two clusters.
    """
    if isinstance(values, (int, np.integer)):
        se = bootstrap_se(int(values), statistic, clusters, n_boot, seed)
    else:
        arr = np.asarray(values, dtype=np.float64)
        se = mean_se(arr, clusters, n_boot, seed) if statistic is np.mean else bootstrap_se(
            len(arr), lambda idx: float(statistic(arr[idx])), clusters, n_boot, seed)
    return float("nan") if se is None else se


def mean_metric(name: str, values: Sequence[float] | np.ndarray, higher_is_better: bool | None = True,
                seed: int = 0, clusters: Sequence[Any] | None = None) -> MetricValue:
    """A :class:`MetricValue` for the mean of per-item values, with its (cluster) bootstrap stderr."""
    arr = np.asarray(values, dtype=np.float64)
    value = float(arr.mean()) if len(arr) else float("nan")
    stderr = mean_se(arr, clusters, seed=seed) if len(arr) > 1 else None
    return MetricValue(name=name, value=value, stderr=stderr, n=len(arr), higher_is_better=higher_is_better)


def sample_items(items: Sequence[Any], limit: int | None, seed: int) -> list[Any]:
    """``limit`` items drawn without replacement with ``seed`` and kept in their original order; None = all."""
    items = list(items)
    if limit is None or limit >= len(items):
        return items
    if limit < 0:
        raise DataError(f"--limit must be >= 0, got {limit}")
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]


# ----------------------------------------------------------------------------------------------------- data files


def resolve_source(source: str | Path | None, task_default_subdir: str, hf_dataset: str | None = None) -> str | Path:
    """Where a task reads its data from.

    In order: ``source`` as an existing local file or folder (a data root that contains ``task_default_subdir`` is
    descended into, so ``--data-dir`` can point at the root); ``$BAKEEDIT_DATA_DIR/<subdir>``; a Hugging Face dataset
    id (``source`` when it is not a path, else ``hf_dataset``), returned as a string for ``datasets.load_dataset``,
    when the machine is not marked offline. Otherwise a :class:`DataError` saying what was looked for.
    """
    if source is not None:
        path = Path(source).expanduser()
        if path.exists():
            if path.is_dir() and (path / task_default_subdir).is_dir():
                return path / task_default_subdir
            return path
        if _looks_like_hf_id(str(source)) and not _offline():
            return str(source)
        raise DataError(
            f"data source {str(source)!r} is neither a local file/folder nor a reachable Hugging Face dataset id",
            hint=f"point --data-dir at a folder holding {task_default_subdir}/ (see SOURCE.md of each data set)",
        )
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        path = Path(env).expanduser() / task_default_subdir
        if path.exists():
            return path
    if hf_dataset and not _offline():
        return hf_dataset
    where = f"${DATA_DIR_ENV}/{task_default_subdir}" + (f" ({env}/{task_default_subdir} does not exist)" if env else
                                                        f" (${DATA_DIR_ENV} is not set)")
    raise DataError(
        f"no data for {task_default_subdir!r}: looked in {where}",
        hint=f"pass --data-dir DIR (with DIR/{task_default_subdir}/) or set ${DATA_DIR_ENV}",
    )


def _looks_like_hf_id(s: str) -> bool:
    parts = s.split("/")
    return 1 <= len(parts) <= 2 and all(p and not p.startswith(".") for p in parts) and "\\" not in s


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def load_hf_rows(dataset_id: str, config: str | None, split: str) -> list[dict[str, Any]]:
    """Rows of a Hugging Face dataset split as plain dicts (only used when no local copy exists and online)."""
    try:
        import datasets

        ds = datasets.load_dataset(dataset_id, config, split=split)
    except Exception as e:  # network, unknown id, missing config: all mean "no data" to the user
        raise DataError(f"cannot load Hugging Face dataset {dataset_id!r} ({config}, {split}): {e}") from None
    return [dict(r) for r in ds]


def data_sha256(paths: Path | Sequence[Path]) -> str:
    """The digest a result records for the data file(s) it read: for one file its sha256
    (:func:`bakeedit.io.hashing.file_sha256`, the file digest used everywhere in bakeedit); for several, the
    sha256 of their ``"name\\0digest\\n"`` lines in the given order (BBQ's category files, MMLU's subjects)."""
    files = [paths] if isinstance(paths, Path) else list(paths)
    if len(files) == 1:
        return file_sha256(files[0])
    return hashlib.sha256("".join(f"{p.name}\0{file_sha256(p)}\n" for p in files).encode()).hexdigest()


def text_sha256(text: str) -> str:
    """sha256 of a string (for data that does not come from a file, e.g. a Hugging Face dataset's rows)."""
    return hashlib.sha256(text.encode()).hexdigest()


def require_file(folder: Path, name: str) -> Path:
    """``folder/name`` or a DataError naming it (``folder`` may itself be the file)."""
    if folder.is_file():
        return folder
    path = folder / name
    if not path.is_file():
        raise DataError(f"data file not found: {path}", hint="see the data set's SOURCE.md for the expected files")
    return path


def read_jsonl(path: Path, required: Sequence[str] = ()) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, row)`` for each non-blank line of a JSON Lines file; a ``null`` required field counts as
    missing. Tasks use the line numbers to name the line of a bad value (a gold index out of range)."""
    return read_jsonl_numbered(path, required, null_is_missing=True)


def check_fields(row: dict[str, Any], required: Sequence[str], path: Path | str, line_no: int) -> None:
    """DataError ``file:line: missing field 'x'`` for the first of ``required`` absent from ``row``."""
    for name in required:
        if name not in row or row[name] is None:
            raise DataError(
                f"{path}:{line_no}: missing field {name!r}",
                hint=f"expected fields: {', '.join(required)} (see the data set's SOURCE.md)",
            )


def _finite_or_none(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)
