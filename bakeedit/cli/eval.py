"""``bakeedit eval MODEL --tasks ... [--baseline BASE] [--control neurons-random.json] -o OUT``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.table import Table

from bakeedit import parallel
from bakeedit.cli.main import console
from bakeedit.cli.progress import bar_reporter, command_progress
from bakeedit.errors import BakeeditError, OutputExistsError, RecipeError
from bakeedit.evaluate.report import RESULTS_FILE, fmt, ordered_labels, primary_metric, write_results
from bakeedit.evaluate.runner import EvalRun, ModelRef, evaluate_models
from bakeedit.evaluate.tasks.base import DATA_DIR_ENV
from bakeedit.export.provenance import PROVENANCE_FILE, base_location, read_provenance
from bakeedit.io.ownership import check_output_file, is_results_file
from bakeedit.io.staging import staged_into
from bakeedit.models import load_model
from bakeedit.models.reference import ModelSpec
from bakeedit.neurons import NeuronSet
from bakeedit.recipe import EditSpec
from bakeedit.workflows.apply_eval import check_before_eval, control_model, record_evaluation

RESULTS_WHAT = "results file"


def _load(ref: str, device_map: str | None = None, trust_remote_code: bool = False, execution: str = "auto",
          label: str = "model", report: Any = None) -> Any:
    """Load one model with the chosen execution and say, in one progress line, which path it took and why."""
    loaded = load_model(ModelSpec(id=ref, device_map=device_map, trust_remote_code=trust_remote_code),
                        execution=execution)
    if report is not None:
        report(f"{label}: execution {loaded.execution_reason}")
    return loaded


def _control(neurons_file: Path, base: Any, model_ref: str, control_lambda: float | None) -> tuple[Any, str]:
    """The control model on ``base`` and a description; the lambda comes from ``--control-lambda`` or from the
    recipe recorded in MODEL's bakeedit.json, so the control gets the same edit as the edited model."""
    neuron_set = NeuronSet.load(neurons_file)
    if control_lambda is not None:
        edit = EditSpec.model_validate({"lambda": control_lambda})
    else:
        prov = _provenance(model_ref)
        if prov is None or "edit" not in prov.recipe.data:
            raise RecipeError(
                "--control: no lambda for the control edit",
                hint="pass --control-lambda, or point MODEL at a bakeedit apply folder (its recipe gives the edit)",
            )
        edit = EditSpec.model_validate(prov.recipe.data["edit"])
    model, plan, _ = control_model(base, neuron_set, edit, str(neurons_file))
    return model, (f"baseline + runtime edit of {plan.n_neurons} {neuron_set.method} neurons from {neurons_file} "
                  f"({'; '.join(plan.describe())})")


def _provenance(model_ref: str) -> Any:
    folder = Path(model_ref)
    return read_provenance(folder) if (folder / PROVENANCE_FILE).is_file() else None


def _recorded_base(prov: Any, folder: Path) -> str:
    """MODEL's base model from its bakeedit.json (a local path there is relative to the folder)."""
    found = base_location(prov, folder)
    if found is None:
        raise RecipeError(f"{folder}/bakeedit.json: base_model.ref '{prov.base_model.ref}': no such model relative "
                          "to the folder (it moved)", hint="pass --baseline with the base model's location")
    return found


def _output_folder(out: Path | None, model: str, overwrite: bool) -> Path:
    """Before any model is loaded: OUT is a folder, and an existing results.json in it is replaced only with
    --overwrite and only if bakeedit wrote it (OUT may hold other files: they are never touched)."""
    if out is None:
        if not Path(model).is_dir():
            raise RecipeError("-o/--out is required when MODEL is not a local folder")
        out = Path(model) / "eval"
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output '{out}' exists and is not a folder", hint="-o names the folder of the report")
    if (out / RESULTS_FILE).exists() and not overwrite:
        raise OutputExistsError(f"{out} already holds {RESULTS_FILE}")
    check_output_file(out / RESULTS_FILE, overwrite, is_results_file, RESULTS_WHAT)
    return out


def _write(out: Path, run: EvalRun, overwrite: bool) -> Path:
    """results.json, report.md and plots/ appear complete or not at all (staged inside OUT, moved in file by file,
    results.json last); an interrupt removes the staged files."""
    with staged_into(out, RESULTS_FILE, overwrite, is_results_file, RESULTS_WHAT) as tmp:
        report = write_results(tmp, run)
    return out / report.relative_to(tmp)


def _portable(info: dict[str, Any]) -> dict[str, Any]:
    """A model's description with every existing local path it names (MODEL, --baseline, --control) cut to the
    file or folder name, for results written into a folder that is published."""
    out = dict(info)
    paths = {v for v in info.values() if isinstance(v, str) and Path(v).is_absolute() and Path(v).exists()}
    for key, value in info.items():
        if isinstance(value, str):
            for path in sorted(paths, key=len, reverse=True):
                value = value.replace(path, Path(path).name)
            out[key] = value
    return out


def _summary(run: EvalRun) -> Table:
    labels = ordered_labels(run.results)
    table = Table(title="bakeedit eval (headline metric per task)", title_justify="left")
    for col in ("task", "metric", *labels):
        table.add_column(col)
    by_task: dict[str, dict[str, Any]] = {}
    for label in labels:
        for r in run.results[label]:
            by_task.setdefault(r.task, {})[label] = r
    for task, by_label in by_task.items():
        metric = primary_metric(next(iter(by_label.values())))
        cells = []
        for label in labels:
            m = by_label[label].metrics.get(metric) if label in by_label else None
            cells.append(fmt(m.value, m.stderr) if m else "—")
        table.add_row(task, metric, *cells)
    return table


@click.command("eval")
@click.argument("model")
@click.option("--tasks", default="bias", show_default=True,
              help="Comma-separated task names, or a group: bias, capability, all.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Score a seeded sample of N items per task.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the --limit sample.")
@click.option("--split", type=click.Choice(["all", "dev", "test"]), default="all", show_default=True,
              help="Score every item (lm-eval's), or one side of the fixed dev/test partition (docs/data.md).")
@click.option("--data-dir", type=click.Path(path_type=Path), envvar=DATA_DIR_ENV, default=None,
              help=f"Folder of the benchmark data sets [default: ${DATA_DIR_ENV}].")
@click.option("--baseline", default=None, help="Base model to compare with (labelled 'base').")
@click.option("--control", "control", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="neurons.json of a control set (e.g. random), applied to the baseline with runtime hooks.")
@click.option("--control-lambda", type=float, default=None,
              help="Lambda of the control edit [default: the edit of MODEL's bakeedit.json recipe].")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("-o", "--out", "out", type=click.Path(path_type=Path), default=None,
              help="Output folder for results.json, report.md, plots/ [default: MODEL/eval for a folder].")
@click.option("--overwrite", is_flag=True, help="Replace an existing results.json in OUT.")
@click.option("--device-map", default=None, help="accelerate device map, e.g. 'auto': spread a model too large for "
              "one device over the GPUs (and CPU).")
@click.option("--trust-remote-code", is_flag=True,
              help="Allow MODEL's own modeling code to run (a nonlinear-edit checkpoint; read its .py file first).")
@click.option("--execution", type=click.Choice(["auto", "in-memory", "blockwise"]), default="auto", show_default=True,
              help="Run each model whole (in-memory), one block at a time from its shards (blockwise: a model larger "
              "than memory; every block is read once per batch), or blockwise only when it does not fit (auto).")
def eval_command(model: str, tasks: str, limit: int | None, seed: int, split: str, data_dir: Path | None,
                 baseline: str | None,
                 control: Path | None, control_lambda: float | None, batch_size: int, out: Path | None,
                 overwrite: bool, device_map: str | None, trust_remote_code: bool, execution: str) -> None:
    """Evaluate MODEL (a folder, 'embedded', a .gguf or a Hub id) on bias and capability tasks.

    With --baseline, the report shows base vs MODEL (labelled 'edited') and their difference; with --control, also
    the baseline with the control neurons edited at run time.
    """
    out = _output_folder(out, model, overwrite)
    baked = check_before_eval(out)  # into a baked folder: the rest of it must match bakeedit.json
    click.get_current_context().with_resource(parallel.distributed())  # torchrun: split the items, rank 0 writes
    if data_dir is not None and not data_dir.is_dir():
        raise BakeeditError(f"--data-dir: no such folder '{data_dir}'")
    if control is not None and baseline is None:
        prov = _provenance(model)
        if prov is None:
            raise RecipeError("--control needs --baseline (the model the control neurons are edited in)")
        baseline = _recorded_base(prov, Path(model))
    models: dict[str, ModelRef] = {}
    descriptions: dict[str, dict[str, Any]] = {}
    with command_progress() as (progress, report):  # rich on a terminal, plain lines in a log
        report("load models")
        if baseline is not None:
            base = _load(baseline, device_map, execution=execution, label="base", report=report)
            models["base"] = base
            descriptions["base"] = {"ref": baseline, "description": f"`{baseline}`"}
            if control is not None:
                models["control"], what = _control(control, base, model, control_lambda)
                descriptions["control"] = {"ref": baseline, "neurons": str(control), "description": what}
        label = "edited" if baseline is not None else "model"
        models[label] = _load(model, device_map, trust_remote_code, execution, label, report)
        descriptions[label] = {"ref": model, "description": f"`{model}`"}
        report("evaluate")
        run = evaluate_models(
            models, tasks, data_dir=data_dir, limit=limit, seed=seed, progress=bar_reporter(progress),
            batch_size=batch_size,
            warn=lambda msg: console.print(f"[yellow]warning:[/] {msg}", soft_wrap=True), descriptions=descriptions,
            split=split, notice=lambda msg: console.print(msg, soft_wrap=True, highlight=False, markup=False),
        )
    if not parallel.is_main():
        return
    if baked is not None:  # no local path in a published folder: local models by their folder's name
        run.models = {label: _portable(info) for label, info in run.models.items()}
    path = _write(out, run, overwrite)
    if baked is not None:
        record_evaluation(baked, out, run)  # the new files join bakeedit.json, so verify/card/push still pass
    console.print(_summary(run))
    click.echo(str(path))
