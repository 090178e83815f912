"""``bakeedit locate RECIPE -o neurons.json``: run the recipe's locate method and write the NeuronSet.

Per-item results are cached under ``<bakeedit cache>/locate`` (keyed by model, method, parameters and data), so an
interrupted run picks up where it stopped. Beside the NeuronSet go its heat map (``neurons.png``) and, for methods
whose parameters have a ``report`` field left unset by the recipe, the method's side report
(``neurons.report.json``).
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from bakeedit import parallel
from bakeedit.cli.main import console
from bakeedit.cli.progress import command_progress
from bakeedit.errors import OutputExistsError, RecipeError
from bakeedit.export.heatmap import rich_heatmap, save_heatmap_png
from bakeedit.export.provenance import portable_neuron_set
from bakeedit.io.ownership import check_output_file, is_neurons_file
from bakeedit.io.staging import staged_file
from bakeedit.locate import LocateContext, run_locate
from bakeedit.locate.registry import validate_params
from bakeedit.models.embedded import cache_root
from bakeedit.models.load import load_model
from bakeedit.recipe import LocateSpec, load_recipe

NEURONS_WHAT = "neurons file"


def _with_report(spec: LocateSpec, out: Path, source: str) -> LocateSpec:
    """Point a method's ``report`` parameter beside the output unless the recipe chose a place."""
    method, _ = validate_params(spec, source)
    if "report" in method.params.model_fields and "report" not in spec.params:
        return LocateSpec(method=spec.method, layer_range=spec.layer_range, execution=spec.execution, **spec.params,
                          report=str(out.with_suffix(".report.json").resolve()))
    return spec


def _check_out(out: Path, overwrite: bool) -> Path:
    """Before the model is loaded: ``-o`` names a file, and replaces only a neurons file bakeedit wrote. The heat
    map goes beside it (``neurons.png``): an existing one is replaced only with --overwrite."""
    out = check_output_file(out, overwrite, is_neurons_file, NEURONS_WHAT)
    png = out.with_suffix(".png")
    if png.exists() and not overwrite:
        raise OutputExistsError(f"output '{png}' (the heat map of -o) already exists",
                                hint="pass --overwrite to replace it, or choose another -o file")
    return out


def _write_atomic(neuron_set, out: Path, overwrite: bool) -> None:
    """Complete or not at all: a temporary beside ``out``, fsync-ed and renamed (removed on any error or signal)."""
    with staged_file(out, overwrite, is_neurons_file, NEURONS_WHAT) as tmp:
        neuron_set.save(tmp)


@click.command("locate")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="Where to write the NeuronSet (JSON).")
@click.option("--cache-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Resumable per-item cache (default: <bakeedit cache>/locate).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--execution", type=click.Choice(["auto", "in-memory", "blockwise"]), default=None,
              help="Run the model whole (in-memory), one block at a time from its shards (blockwise: a model larger "
              "than memory), or blockwise only when it does not fit (auto) [default: the recipe's locate.execution, "
              "else auto].")
def locate_command(recipe: Path, out: Path, cache_dir: Path | None, overwrite: bool, execution: str | None) -> None:
    """Find the neurons named by RECIPE's locate: block and write them to OUT."""
    lr = load_recipe(recipe)
    spec = lr.recipe.locate
    if spec is None:
        raise RecipeError(
            f"{lr.path}: has no 'locate:' block, so there is nothing to locate",
            hint="add e.g. 'locate: {method: coco}' (methods: knowbias, ine, coco, random), or use bakeedit apply "
            "for recipes with neurons or neurons_file",
        )
    _check_out(out, overwrite)
    spec = _with_report(spec, out, str(lr.path))  # also validates the parameters before the model is loaded

    click.get_current_context().with_resource(parallel.distributed())  # torchrun: split the items, rank 0 writes
    start = time.perf_counter()
    ctx_cache = cache_dir if cache_dir is not None else cache_root() / "locate"
    with command_progress() as (progress, report):  # rich on a terminal, plain lines in a log
        report("load model")
        loaded = load_model(lr.recipe.model, execution=execution or spec.execution)
        report(f"execution: {loaded.execution_reason}")  # a progress line: which path, and why
        loaded_s = time.perf_counter() - start
        report(f"locate neurons ({spec.method})")
        ctx = LocateContext(cache_dir=ctx_cache, progress=progress, base_dir=lr.path.parent)
        neuron_set = run_locate(spec, loaded, ctx, source=str(lr.path))
    locate_s = time.perf_counter() - start - loaded_s
    if not parallel.is_main():
        return
    # model and side report recorded relative to the file: a neurons.json travels and is published, machine paths not
    neuron_set = portable_neuron_set(neuron_set, loaded.source.ref, loaded.source.kind, out.parent)
    _write_atomic(neuron_set, out, overwrite)
    layout = loaded.layout
    sites = [s for s in layout.sites if s in {n.site for n in neuron_set.neurons}]
    png = save_heatmap_png(neuron_set, layout.n_layers, sites, out.with_suffix(".png"),
                           title=f"{lr.recipe.name}: {len(neuron_set.neurons)} {neuron_set.method} neurons")
    console.print(rich_heatmap(neuron_set, layout.n_layers, sites,
                               title=f"{len(neuron_set.neurons)} {neuron_set.method} neurons per layer x site"))
    total = sum(layout.site_size(s) * layout.n_layers for s in sites) or 1
    console.print(
        f"{len(neuron_set.neurons)} neurons ({len(neuron_set.neurons) / total:.2%} of the {total} channels of "
        f"{', '.join(sites) or 'no site'}); model loaded in {loaded_s:.1f}s, located in {locate_s:.1f}s"
    )
    console.print(f"heat map: {png}")
    if spec.params.get("report"):
        console.print(f"report: {spec.params['report']}")
    click.echo(str(out))
