"""``bakeedit sweep RECIPE --lambda 0,1,2,3 -o OUT``."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from bakeedit import parallel
from bakeedit.cli.main import console
from bakeedit.cli.progress import bar_reporter, command_progress
from bakeedit.errors import RecipeError
from bakeedit.recipe import load_recipe
from bakeedit.workflows.pareto import pareto_front
from bakeedit.workflows.sweep import sweep_recipe


def _lambdas(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise RecipeError(f"--lambda: '{text}' is not a comma-separated list of numbers") from exc


@click.command("sweep")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--lambda", "lambdas", required=True, help="Comma-separated strengths, e.g. 0,1,2,3 (1 = unedited).")
@click.option("-o", "--out", "out", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option("--tasks", default=None, help="Override the recipe's evaluate.tasks (names or bias/capability/all).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Items per task [default: the recipe's].")
@click.option("--seed", type=int, default=None)
@click.option("--data-dir", type=click.Path(path_type=Path), envvar="BAKEEDIT_DATA_DIR", default=None)
@click.option("--bias-task", default=None, help="Task of the bias axis [default: the first bias task].")
@click.option("--capability-task", default=None, help="Task of the capability axis [default: the first one].")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def sweep_command(recipe: Path, lambdas: str, out: Path, tasks: str | None, limit: int | None, seed: int | None,
                  data_dir: Path | None, bias_task: str | None, capability_task: str | None, overwrite: bool) -> None:
    """Evaluate the recipe's neurons at several lambdas (runtime hooks, one model load) and plot the trade-off."""
    lr = load_recipe(recipe)
    click.get_current_context().with_resource(parallel.distributed())  # torchrun: split the work, rank 0 writes
    with command_progress() as (progress, report):
        folder, points = sweep_recipe(
            lr, _lambdas(lambdas), out, overwrite=overwrite, tasks=tasks, limit=limit, seed=seed, data_dir=data_dir,
            bias_task=bias_task, capability_task=capability_task, report=report, progress=progress,
            bars=bar_reporter(progress),
        )
    if not parallel.is_main():
        return
    front = {p.lam for p in pareto_front(points)}
    table = Table(title=f"bakeedit sweep: {lr.recipe.name}", title_justify="left")
    for col in ("lambda", "bias (lower better)", "capability", "Pareto"):
        table.add_column(col)
    for p in points:
        table.add_row(f"{p.lam:g}", f"{p.bias:.4g}", f"{p.capability:.4g}", "*" if p.lam in front else "")
    console.print(table)
    click.echo(str(folder / "sweep.md"))
