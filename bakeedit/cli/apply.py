"""``bakeedit apply RECIPE -o OUT``."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from bakeedit.cli.main import console
from bakeedit.cli.progress import command_progress
from bakeedit.pipeline import apply_recipe
from bakeedit.recipe import load_recipe


@click.command("apply")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def apply_command(recipe: Path, out: Path, overwrite: bool) -> None:
    """Locate (or read) neurons, fold the edit, save, verify, and write the evidence to OUT."""
    lr = load_recipe(recipe)
    with command_progress() as (progress, report):
        result = apply_recipe(lr, out, overwrite=overwrite, report=report, progress=progress)
    prov = result.provenance
    ver = prov.verification
    table = Table(title=f"bakeedit apply: {lr.recipe.name}", show_header=False, title_justify="left")
    table.add_row("base model", f"{prov.base_model.hub_id or prov.base_model.ref} ({prov.base_model.kind})")
    table.add_row("neurons", f"{prov.plan.n_neurons} ({prov.neurons.method}); lambdas {prov.plan.lambdas_used()}")
    table.add_row("verification", f"{'passed' if ver.passed else 'FAILED'}: max |delta logit| "
                  f"{ver.max_abs_logit_delta:.2e} <= {ver.tolerance:.1e} ({ver.dtype}, {ver.n_tokens} tokens)")
    table.add_row("time", ", ".join(f"{k} {v:.1f}s" for k, v in result.timings_s.items()))
    table.add_row("checkpoint", str(result.out))
    console.print(table)
    console.print(
        "load it with:\n"
        "  from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"  model = AutoModelForCausalLM.from_pretrained({str(result.out)!r})\n"
        f"  tokenizer = AutoTokenizer.from_pretrained({str(result.out)!r})",
        highlight=False,
    )
    click.echo(str(result.out))
