"""Baked folders for the publishing tests: ``bakeedit apply`` on a tiny checkpoint, optionally with an evaluation.

The evaluation is written with the evaluation module's own writer (``write_results``) from ``TaskResult`` objects
built here, so the card is tested against a real ``eval/results.json`` without running benchmarks in these tests.
"""

from __future__ import annotations

import math
from pathlib import Path

from click.testing import CliRunner

from bakeedit.cli import main

from tiny_models import save_tiny_checkpoint

NEURONS = """neurons:
  - {layer: 0, site: attn.q, index: 3}
  - {layer: 1, site: attn.v, index: 5, lambda: 0}
  - {layer: 2, site: mlp.act, index: 7}
  - {layer: 2, site: mlp.act, index: 11}
"""
LINEAR = "edit: {lambda: 2.5}\n"
NONLINEAR = "edit: {type: nonlinear, map: tanh_gain, params: {alpha: 1.5, s: 0.5}}\n"


def bake(tmp: Path, name: str = "out", edit: str = LINEAR, arch: str = "llama") -> Path:
    """``bakeedit apply`` of a four-neuron recipe on a tiny ``arch`` checkpoint; returns the output folder."""
    base = tmp / f"base-{arch}"
    if not base.exists():
        save_tiny_checkpoint(arch, base)
    recipe = tmp / f"{name}.yaml"
    recipe.write_text(f"name: tiny-{name}\ndescription: a tiny test edit\nmodel: {base}\n{edit}{NEURONS}")
    out = tmp / name
    result = CliRunner().invoke(main, ["apply", str(recipe), "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out


def add_evaluation(folder: Path):
    """Write ``folder/eval/results.json`` for base / edited / control on two bias tasks and one capability task;
    one metric of the edited model is NaN (the card must leave it out of model-index). Returns the EvalRun."""
    from bakeedit.evaluate.report import write_results
    from bakeedit.evaluate.runner import EvalRun
    from bakeedit.evaluate.tasks.base import MetricValue, TaskResult

    def result(task: str, kind: str, values: dict[str, float], n: int = 40) -> TaskResult:
        metrics = {k: MetricValue(k, v, None if math.isnan(v) else 1.5, n, None if kind == "bias" else True)
                   for k, v in values.items()}
        return TaskResult(task=task, version="1", kind=kind, metrics=metrics, n=n, data_source=f"{task}/data.jsonl",
                          data_sha256="0" * 64, limit=40, seed=0)

    def model(shift: float, nan: bool = False) -> list[TaskResult]:
        return [
            result("crows_pairs", "bias", {"pct_stereotype": 60.0 - shift}),
            result("bbq", "bias", {"bias_ambig": 0.2 - shift / 100, "acc": float("nan") if nan else 0.5}),
            result("arc_easy", "capability", {"acc": 0.4 - shift / 1000}, n=30),
        ]

    run = EvalRun(
        {"base": model(0.0), "edited": model(5.0, nan=True), "control": model(1.0)},
        config={"tasks": ["crows_pairs", "bbq", "arc_easy"], "limit": 40, "seed": 0},
        models={"base": {"description": "the tiny base"}, "edited": {"description": "the baked edit"},
                "control": {"description": "four random neurons"}},
    )
    write_results(folder / "eval", run, plots=False)
    return run
