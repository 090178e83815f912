"""``bakeedit apply RECIPE -o OUT``."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from bakeedit import parallel
from bakeedit.cli.export import result_lines
from bakeedit.cli.main import console
from bakeedit.cli.progress import bar_reporter, command_progress
from bakeedit.evaluate.report import headline_markdown, read_results
from bakeedit.export.hub import check_repo_id, push_folder
from bakeedit.recipe import load_recipe
from bakeedit.workflows.apply import apply_recipe


def headline_lines(results: Path, split: str) -> list[str]:
    """The evaluation's headline metrics: every model, the paired differences and the verdict (report.md's
    first table), as markdown lines: the end of a run says what the edit did, readable in a log and pasteable."""
    where = f", {split} split" if split != "all" else ""
    return [f"evaluation (value ± SE; paired differences ± SE{where}):",
            *headline_markdown(read_results(results), short=True)]


@click.command("apply")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--no-eval", "no_eval", is_flag=True, help="Skip the recipe's evaluate: block (`bakeedit eval` later).")
@click.option("--eval-limit", type=click.IntRange(min=1), default=None, metavar="N",
              help="Score a seeded sample of N items per task instead of the recipe's evaluate.limit.")
@click.option("--in-memory", "in_memory", is_flag=True,
              help="Fold the loaded model and save it, instead of streaming the edit through the base shards.")
@click.option("--low-memory", "low_memory", is_flag=True,
              help="Never build the whole model: stream the bake and verify it block by block (taken by itself when "
                   "the checkpoint does not fit in memory).")
@click.option("--push", "push_repo", default=None, metavar="REPO_ID",
              help="After a successful apply, push OUT to this Hub repository (as `bakeedit push OUT REPO_ID`).")
@click.option("--private", is_flag=True, help="With --push: create the repository as private.")
def apply_command(recipe: Path, out: Path, overwrite: bool, no_eval: bool, eval_limit: int | None, in_memory: bool,
                  low_memory: bool, push_repo: str | None, private: bool) -> None:
    """Locate (or read) neurons, fold the edit, save, verify, evaluate, and write the evidence and card to OUT.

    Nothing is pushed unless every step, verification included, succeeded.
    """
    if in_memory and low_memory:
        raise click.UsageError("--in-memory and --low-memory exclude each other: one folds the loaded model, the "
                               "other never loads it")
    if private and not push_repo:
        raise click.UsageError("--private only applies with --push REPO_ID")
    if push_repo:
        check_repo_id(push_repo, "--push: ")  # before minutes of work, not after
    lr = load_recipe(recipe)
    if eval_limit is not None and lr.recipe.evaluate is not None:  # recorded in bakeedit.json as what was run
        lr.recipe.evaluate = lr.recipe.evaluate.model_copy(update={"limit": eval_limit})
    click.get_current_context().with_resource(parallel.distributed())  # torchrun: split the work, rank 0 writes
    with command_progress() as (progress, report):
        result = apply_recipe(lr, out, overwrite=overwrite, report=report, progress=progress,
                              bars=bar_reporter(progress), evaluate=not no_eval, in_memory=in_memory,
                              low_memory=low_memory)
    if result is None:  # a torchrun rank other than 0: it took its share, rank 0 wrote and reports
        return
    prov = result.provenance
    ver = prov.verification
    table = Table(title=f"bakeedit apply: {lr.recipe.name}", show_header=False, title_justify="left")
    table.add_row("base model", f"{prov.base_model.hub_id or prov.base_model.ref} ({prov.base_model.kind})")
    table.add_row("neurons", f"{prov.plan.n_neurons} ({prov.neurons.method})")
    table.add_row("edit", "; ".join(prov.plan.describe()))
    if prov.execution is not None:
        table.add_row("path", f"{prov.execution.path} ({prov.execution.reason}); baked by {prov.baked_by}")
    blockwise = prov.execution is not None and prov.execution.path == "low-memory"  # verify_blocks: block outputs
    table.add_row("verification", f"{'passed' if ver.passed else 'FAILED'}: max |delta "
                  f"{'block output' if blockwise else 'logit'}| "
                  f"{ver.max_abs_logit_delta:.2e} <= {ver.tolerance:.1e} ({ver.dtype}, {ver.n_tokens} tokens); "
                  f"edit effect {ver.edit_effect or 0:.2e} (power: {ver.power}); exact leg: {ver.exact}")
    for note in ver.notes:
        table.add_row("", note)
    table.add_row("time", ", ".join(f"{k} {v:.1f}s" for k, v in result.timings_s.items()))
    if prov.evaluation:
        table.add_row("evaluation", f"{', '.join(prov.evaluation['labels'])} on {', '.join(prov.evaluation['tasks'])}"
                      f": {result.out / prov.evaluation['report']}")
    table.add_row("checkpoint", str(result.out))
    trust = ", trust_remote_code=True" if prov.custom_module else ""  # a custom module: docs/nonlinear.md
    if prov.custom_module:
        table.add_row("custom module", f"{prov.custom_module.module_file} ({prov.custom_module.module_lines} lines, "
                      f"sha256 {prov.custom_module.module_sha256[:16]}…): read it before trusting it")
    console.print(table)
    for export in result.exports:  # export.formats: the artefacts beside the checkpoint, paths never cut short
        console.print("\n".join(result_lines(export)), highlight=False, soft_wrap=True)
    if prov.evaluation:
        for line in headline_lines(result.out / prov.evaluation["results"], prov.evaluation.get("split", "all")):
            console.print(line, markup=False, highlight=False, soft_wrap=True)  # stderr: stdout is the folder only
    console.print(
        "load it with:\n"
        "  from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"  model = AutoModelForCausalLM.from_pretrained({str(result.out)!r}{trust})\n"
        f"  tokenizer = AutoTokenizer.from_pretrained({str(result.out)!r}{trust})",
        highlight=False,
    )
    click.echo(str(result.out))
    if push_repo:
        pushed = push_folder(result.out, push_repo, private=private,
                             report=lambda step: console.print(f"[dim]{step}…[/]"))
        console.print(f"[green]pushed[/] {len(pushed.plan.files)} files to {pushed.repo_id} ({pushed.revision})")
        click.echo(pushed.commit_url)

