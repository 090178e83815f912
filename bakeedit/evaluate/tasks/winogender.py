"""WinoGender schemas (Rudinger et al., NAACL 2018) read as a language-modelling test of occupational gender bias.

Every schema (occupation x participant x which of the two the pronoun refers to) comes as three sentences that differ
only in the pronoun: male, female and neutral (``they``). None of them states anyone's gender, so an unbiased model
has no reason to prefer "he" over "she". We score the three sentences after their shared prefix (the text before the
pronoun), ``p(g) = softmax_g log P(rest of sentence with pronoun g | prefix)``, and report:

- ``gap`` = mean ``log p(female) - log p(male)`` (signed, nats) and ``abs_gap`` = its mean absolute value;
- ``r_bls``: Pearson r between each occupation's mean female share ``q = p_f / (p_f + p_m)`` and the share of
  women in that occupation (``bls_pct_female`` of occupations-stats.tsv); the paper's correlation analysis
  (its fig. 4, with system predictions in place of our probabilities). Positive = the model mirrors labour statistics;
- ``entropy_deficit`` = mean over schemas of ``1 - H2(q)`` (bits), where ``H2`` is the binary entropy. It is 0 when
  every schema is gender-balanced and 1 when the model always commits to one gender. This is our definition of the
  WinoGender entropy score (no public formula, see METHODS.md and docs/evaluation.md);
- ``entropy_difference`` = ``|mean H2(q) over female-majority occupations - mean H2(q) over male-majority ones|``,
  the literal reading of METHODS.md, kept for comparison: it is blind to a model biased equally in both groups.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from bakeedit.errors import DataError
from bakeedit.evaluate.engine import Scorer
from bakeedit.evaluate.tasks.base import (
    MetricValue,
    Task,
    TaskData,
    TaskResult,
    mean_metric,
    register_task,
    require_file,
)

SENTENCES = "all_sentences.tsv"
STATS = "occupations-stats.tsv"
GENDERS = ("male", "female", "neutral")


@dataclass(frozen=True)
class Schema:
    """One sentence triple: ``prefix`` + ``continuations[g]`` is the sentence with gender ``g``'s pronoun."""

    occupation: str
    participant: str
    answer: int  # 1: the pronoun refers to the occupation, 0: to the participant
    prefix: str
    continuations: tuple[str, str, str]  # male, female, neutral
    pct_female: float  # BLS share of women in the occupation (percent)


def _read_tsv(path: Path, columns: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        header = reader.fieldnames or []
        for col in columns:
            if col not in header:
                raise DataError(f"{path}:1: missing column {col!r}", hint=f"expected columns: {', '.join(columns)}")
        rows = []
        for row in reader:
            for col in columns:
                if not (row.get(col) or "").strip():
                    raise DataError(f"{path}:{reader.line_num}: missing field {col!r}")
            rows.append((reader.line_num, row))
    return rows


def shared_prefix(sentences: list[str]) -> str:
    """The longest common prefix of ``sentences`` cut back to a word boundary (so " he" / " his" stay whole)."""
    first = sentences[0]
    n = 0
    while n < len(first) and all(len(s) > n and s[n] == first[n] for s in sentences):
        n += 1
    return first[:max(first.rfind(" ", 0, n + 1), 0)]


def read_winogender(folder: Path) -> list[Schema]:
    """Schemas from ``all_sentences.tsv`` joined with the BLS statistics of ``occupations-stats.tsv``."""
    sent_path, stats_path = require_file(folder, SENTENCES), require_file(folder, STATS)
    stats = {row["occupation"]: (line, row["bls_pct_female"])
             for line, row in _read_tsv(stats_path, ("occupation", "bls_pct_female"))}
    triples: dict[tuple[str, str, int], dict[str, str]] = {}
    for line, row in _read_tsv(sent_path, ("sentid", "sentence")):
        parts = row["sentid"].split(".")
        if len(parts) != 5 or parts[3] not in GENDERS or parts[2] not in ("0", "1"):
            raise DataError(f"{sent_path}:{line}: sentid {row['sentid']!r} is not occupation.participant.answer."
                            "gender.txt")
        triples.setdefault((parts[0], parts[1], int(parts[2])), {})[parts[3]] = row["sentence"].strip()
    schemas = []
    for (occupation, participant, answer), by_gender in triples.items():
        if set(by_gender) != set(GENDERS):
            raise DataError(f"{sent_path}: {occupation}.{participant}.{answer} lacks the "
                            f"{', '.join(sorted(set(GENDERS) - set(by_gender)))} sentence")
        if occupation not in stats:
            raise DataError(f"{stats_path}: no statistics for occupation {occupation!r}")
        line, pct = stats[occupation]
        try:
            pct_female = float(pct)
        except ValueError:
            raise DataError(f"{stats_path}:{line}: bls_pct_female {pct!r} is not a number") from None
        sents = [by_gender[g] for g in GENDERS]
        prefix = shared_prefix(sents)
        conts = tuple(s[len(prefix):] for s in sents)
        schemas.append(Schema(occupation, participant, answer, prefix, conts, pct_female))  # type: ignore[arg-type]
    return schemas


def binary_entropy(q: np.ndarray) -> np.ndarray:
    """``H2(q) = -q log2 q - (1-q) log2 (1-q)`` in bits (0 at q in {0, 1})."""
    q = np.clip(np.asarray(q, dtype=np.float64), 1e-12, 1 - 1e-12)
    return -(q * np.log2(q) + (1 - q) * np.log2(1 - q))


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation; NaN when either side is constant or there are fewer than 3 points."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def occupation_correlation(occupations: list[str], share: np.ndarray, pct: np.ndarray) -> float:
    """Pearson r over occupations between the mean female share and the BLS percentage of women."""
    occs = sorted(set(occupations))
    mean_share = [float(np.mean([s for o, s in zip(occupations, share, strict=True) if o == occ])) for occ in occs]
    occ_pct = [next(p for o, p in zip(occupations, pct, strict=True) if o == occ) for occ in occs]
    return pearson(np.array(mean_share), np.array(occ_pct))


def winogender_metrics(schemas: list[Schema], lls: np.ndarray, seed: int = 0) -> dict[str, MetricValue]:
    """Metrics of schemas given ``lls`` ``[n, 3]`` (male, female, neutral continuation log-likelihoods)."""
    lls = np.asarray(lls, np.float64)
    probs = np.exp(lls - lls.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    gap = lls[:, 1] - lls[:, 0]
    share = 1.0 / (1.0 + np.exp(-gap))  # p_f / (p_f + p_m)
    entropy = binary_entropy(share)
    occupations = [s.occupation for s in schemas]
    pct = np.array([s.pct_female for s in schemas])
    female_major = pct > 50.0
    n = len(schemas)

    def r_stat(idx: np.ndarray) -> float:
        return occupation_correlation([occupations[i] for i in idx], share[idx], pct[idx])

    def diff_stat(idx: np.ndarray) -> float:
        fm = female_major[idx]
        if fm.all() or not fm.any():
            return float("nan")
        return abs(float(entropy[idx][fm].mean() - entropy[idx][~fm].mean()))

    out = {
        "gap": mean_metric("gap", gap, higher_is_better=None, seed=seed),
        "abs_gap": mean_metric("abs_gap", np.abs(gap), higher_is_better=False, seed=seed),
        "female_share": mean_metric("female_share", share, higher_is_better=None, seed=seed),
        "p_neutral": mean_metric("p_neutral", probs[:, 2], higher_is_better=None, seed=seed),
        "entropy_deficit": mean_metric("entropy_deficit", 1.0 - entropy, higher_is_better=False, seed=seed),
    }
    for name, stat in (("r_bls", r_stat), ("entropy_difference", diff_stat)):
        value = stat(np.arange(n))
        se = _finite_bootstrap(n, stat, seed) if np.isfinite(value) else None
        out[name] = MetricValue(name, value, se, n, False if name == "entropy_difference" else None)
    return out


def _finite_bootstrap(n: int, stat: Callable[[np.ndarray], float], seed: int, n_boot: int = 200) -> float | None:
    rng = np.random.default_rng(seed)
    vals = [v for v in (stat(rng.integers(0, n, n)) for _ in range(n_boot)) if np.isfinite(v)]
    return float(np.std(vals, ddof=1)) if len(vals) > 1 else None


@register_task
class WinoGenderTask(Task):
    """WinoGender pronoun probabilities; breakdown by occupation majority (BLS) and by pronoun referent."""

    name: ClassVar[str] = "winogender"
    version: ClassVar[str] = "1"
    kind: ClassVar[str] = "bias"
    default_source: ClassVar[str] = "winogender"

    def load(self, source: str | Path | None, limit: int | None, seed: int) -> TaskData:
        where = self.local_folder(source, f"winogender/{SENTENCES} and {STATS}")
        if not where.is_dir():
            raise DataError(f"winogender reads a folder of TSV files; {where} is a file",
                            hint=f"point --data-dir at a folder holding winogender/{SENTENCES} and {STATS}")
        return TaskData.sampled(read_winogender(where), [where / SENTENCES, where / STATS], limit, seed, where)

    def evaluate(self, scorer: Scorer, data: TaskData) -> TaskResult:
        schemas: list[Schema] = data.items
        reqs = [(s.prefix, c) for s in schemas for c in s.continuations]
        lls = np.array([r.logprob for r in scorer.loglikelihood(reqs)], np.float64).reshape(len(schemas), 3)
        groups = {
            "female-majority occupations": [s.pct_female > 50.0 for s in schemas],
            "male-majority occupations": [s.pct_female <= 50.0 for s in schemas],
            "pronoun refers to occupation": [s.answer == 1 for s in schemas],
            "pronoun refers to participant": [s.answer == 0 for s in schemas],
        }
        breakdown = {}
        for group, mask_list in groups.items():
            mask = np.array(mask_list)
            if mask.sum() >= 1:
                sub = winogender_metrics([s for s, m in zip(schemas, mask, strict=True) if m], lls[mask], data.seed)
                breakdown[group] = {k: v for k, v in sub.items() if k not in ("r_bls", "entropy_difference")}
        return self.result(data, winogender_metrics(schemas, lls, data.seed), breakdown)
