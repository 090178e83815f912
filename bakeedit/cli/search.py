"""``bakeedit search RECIPE --trials N -o OUT``."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from bakeedit.cli.main import console
from bakeedit.cli.progress import bar_reporter, command_progress
from bakeedit.recipe import load_recipe
from bakeedit.workflows.search import search_recipe


@click.command("search")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out", type=click.Path(path_type=Path), required=True,
              help="Output folder: front, trials, the chosen recipe.yaml.")
@click.option("--trials", type=click.IntRange(min=1), default=None,
              help="Finished trials the study should have in total [default: the recipe's search.trials]; a rerun "
                   "continues the study.")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Dev items per task and trial [default: the recipe's search.limit].")
@click.option("--data-dir", type=click.Path(path_type=Path), envvar="BAKEEDIT_DATA_DIR", default=None)
@click.option("--storage", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="The study's SQLite file [default: in bakeedit's cache, keyed by the recipe].")
@click.option("--fresh", is_flag=True, help="Discard the stored study and start again.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it is a bakeedit search folder.")
def search_command(recipe: Path, out: Path, trials: int | None, limit: int | None, data_dir: Path | None,
                   storage: Path | None, fresh: bool, overwrite: bool) -> None:
    """Choose the recipe's locate parameters and lambda on the dev split (Optuna TPE), against a KL-matched random
    control, within a KL and capability budget; write the Pareto front and the chosen recipe."""
    lr = load_recipe(recipe)
    with command_progress() as (progress, report):
        result = search_recipe(lr, out, trials=trials, overwrite=overwrite, fresh=fresh, storage=storage,
                               limit=limit, data_dir=None if data_dir is None else str(data_dir), report=report,
                               progress=progress, bars=bar_reporter(progress))
    table = Table(title=f"bakeedit search: {lr.recipe.name} ({len(result.rows)} trials, dev split)",
                  title_justify="left")
    for col in ("trial", "values", "neurons", "KL", "advantage", "feasible"):
        table.add_column(col)
    for r in sorted(result.rows, key=lambda r: -(r.advantage if r.advantage is not None else -1e9))[:10]:
        values = ", ".join(f"{k.removeprefix('locate.')}={v:.3g}" if isinstance(v, float)
                           else f"{k.removeprefix('locate.')}={v}" for k, v in r.values.items())
        mark = " (chosen)" if result.chosen is not None and r.number == result.chosen.number else ""
        table.add_row(f"{r.number}{mark}", values, str(r.attrs.get("n_neurons", "")),
                      "" if r.kl is None else f"{r.kl:.3g}",
                      "" if r.advantage is None else f"{r.advantage:+.3f}", "yes" if r.feasible else "no")
    console.print(table)
    if result.chosen is None:
        console.print("no trial met the budget: no recipe written (see front.md)")
    else:
        console.print(f"chosen recipe: {result.out / 'recipe.yaml'} (bake it with bakeedit apply)")
    console.print(f"study: {result.storage} (run the same command again to continue it)")
    click.echo(str(result.out / "front.md"))
