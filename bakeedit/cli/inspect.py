"""``bakeedit inspect OUT``: what was edited, where, by how much, and whether it verified (a baked checkpoint, or an
adapter or GGUF folder of ``bakeedit export``)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from bakeedit.cli.main import console
from bakeedit.errors import ManifestError
from bakeedit.export.adapter_record import AdapterRecord, check_adapter_folder, read_record
from bakeedit.export.artefacts import ADAPTER, CHECKPOINT, folder_kind
from bakeedit.export.card import HEATMAP_FILE
from bakeedit.export.gguf import GgufRecord
from bakeedit.export.gguf_check import check_gguf_folder, read_gguf_record
from bakeedit.export.heatmap import rich_heatmap, save_heatmap_png
from bakeedit.export.manifest import check_folder
from bakeedit.export.provenance import read_provenance
from bakeedit.models.arch import SITES, ModelLayout
from bakeedit.models.custom import read_base_config
from bakeedit.workflows.export import adapter_line, gguf_line


def _layout(folder: Path, prov) -> ModelLayout:
    return ModelLayout.for_config(read_base_config(folder), arch=prov.recipe.data.get("model", {}).get("arch"))


def _print_module_groups(prov) -> None:
    """The nonlinear / position-scoped part of the edit, carried by the checkpoint's custom module."""
    table = Table(title="custom module (not folded)", title_justify="left")
    for col in ("layer", "site", "neurons", "map", "parameters", "positions"):
        table.add_column(col)
    for g in prov.plan.module_groups:
        params = ", ".join(f"{k}={min(v):g}" + (f"..{max(v):g}" if max(v) != min(v) else "")
                           for k, v in g.params.items())
        table.add_row(str(g.layer), g.site, str(len(g.indices)), g.map, params,
                      g.positions + (f" from token {g.start}" if g.start else ""))
    console.print(table)
    info = prov.custom_module
    if info is not None:
        console.print(f"{info.module_file}: {info.module_lines} lines, sha256 {info.module_sha256}; "
                      f"loads with trust_remote_code=True (model_type {info.model_type})")


def _print_manifest(folder: Path) -> None:
    """Whether the folder holds exactly the files bakeedit.json lists and the record is intact (no re-hashing:
    inspect stays quick; `bakeedit verify` compares every sha256)."""
    try:
        prov = check_folder(folder, hash_files=False)
    except ManifestError as exc:
        console.print(f"[red]manifest: not intact[/]: {escape(str(exc))}", soft_wrap=True)
        return
    console.print(f"manifest: {len(prov.files_sha256)} files listed with their sha256, record intact "
                  "(`bakeedit verify` re-hashes them)")


def _plan_neurons(plan) -> Table:
    detail = Table(title="neurons", title_justify="left")
    for col in ("layer", "site", "index", "lambda"):
        detail.add_column(col)
    for group in plan.groups:
        for index, lam in zip(group.indices, group.lambdas, strict=True):
            detail.add_row(str(group.layer), group.site, str(index), f"{lam:g}")
    return detail


def _artefact_manifest(folder: Path, kind: str) -> None:
    try:
        record = check_adapter_folder(folder) if kind == ADAPTER else check_gguf_folder(folder, hash_files=False)
    except ManifestError as exc:
        console.print(f"[red]manifest: not intact[/]: {escape(str(exc))}", soft_wrap=True)
        return
    console.print(f"manifest: {len(record.files_sha256)} files listed with their sha256, record intact "
                  "(`bakeedit verify` runs the verification again)")


def _inspect_adapter(folder: Path) -> AdapterRecord:
    record = read_record(folder)
    a, base = record.adapter, record.base_model
    shape = (f"rank {a.rank}, lora_alpha {a.lora_alpha}, bias {a.bias}" if a.kind == "lora"
             else "output vectors and feedforward (input) vectors")
    console.print(f"[bold]peft {a.peft_type} adapter[/] of {base.hub_id or base.ref} ({base.kind}): "
                  f"{record.plan.n_neurons} neurons in {len(a.targets)} modules; {shape}; peft {a.peft_version}; "
                  f"bakeedit {record.bakeedit_version}, {record.created_at}")
    if record.baked_folder:
        console.print(f"baked checkpoint of the same plan: {record.baked_folder}")
    table = Table(title="targets", title_justify="left")
    # a module name is what a user greps for: kept whole, the other columns wrap instead
    table.add_column("module", no_wrap=True, min_width=max(len(t.module) for t in a.targets))
    for col in ("scales", "sites", "edited channels", *(["rank"] if a.kind == "lora" else [])):
        table.add_column(col)
    for t in a.targets:
        table.add_row(t.module, f"{t.mode} ({t.width})", ", ".join(t.sites), str(len(t.channels)),
                      *([str(t.rank)] if a.kind == "lora" else []))
    console.print(table)
    console.print(f"loads with: {', '.join(a.servable_by)}")
    for note in a.notes:
        console.print(f"[dim]note: {escape(note)}[/]", soft_wrap=True)
    v = record.verification
    status = "[yellow]not verified[/]" if v is None else ("[green]passed[/]" if v.passed else "[red]FAILED[/]")
    console.print(f"verification: {status} {escape(adapter_line(v))}", soft_wrap=True)
    return record


def _inspect_gguf(folder: Path) -> GgufRecord:
    record = read_gguf_record(folder)
    src = record.source
    console.print(f"[bold]baked GGUF[/] {record.gguf_file}: the edit of {Path(src.file).name} "
                  f"({src.file_type or 'quantization unknown'}, {src.architecture}); {record.plan.n_neurons} "
                  f"neurons, {len(record.changes)} tensors edited; Q/K rows permuted: {record.permute_qk}; "
                  f"base model {record.base_model or 'unknown'}; bakeedit {record.bakeedit_version}, "
                  f"{record.created_at}")
    table = Table(title="tensors edited", title_justify="left")
    table.add_column("tensor", no_wrap=True, min_width=max((len(c.tensor) for c in record.changes), default=6))
    for col in ("type", "edited", "channels", "how", "max block deviation"):
        table.add_column(col)
    for c in record.changes:
        table.add_row(c.tensor, c.type, c.axis, str(c.n_channels), c.method,
                      "exact" if c.exact else f"{c.rel_error:.2g}")
    console.print(table)
    v = record.verification
    status = "[yellow]not verified[/]" if v is None else ("[green]passed[/]" if v.passed else "[red]FAILED[/]")
    console.print(f"verification: {status} {escape(gguf_line(v))}", soft_wrap=True)
    return record


def _inspect_artefact(folder: Path, kind: str, list_neurons: bool, png: Path | None) -> None:
    if png is not None:
        raise click.UsageError("--png draws the heat map of a checkpoint folder; inspect the baked folder instead")
    record = _inspect_adapter(folder) if kind == ADAPTER else _inspect_gguf(folder)
    _artefact_manifest(folder, kind)
    if list_neurons:
        console.print(_plan_neurons(record.plan))


@click.command("inspect")
@click.argument("folder", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--neurons", "list_neurons", is_flag=True, help="List every edited neuron.")
@click.option("--png", "png", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Also draw the layer x site heat map as a PNG at this path (the folder itself is not touched).")
def inspect_command(folder: Path, list_neurons: bool, png: Path | None) -> None:
    """Show the edit recorded in a bakeedit output folder: a baked checkpoint, or a peft adapter or baked GGUF
    folder of `bakeedit export`."""
    kind = folder_kind(folder)
    if kind != CHECKPOINT:
        _inspect_artefact(folder, kind, list_neurons, png)
        return
    prov = read_provenance(folder)
    layout = _layout(folder, prov)
    ns = prov.neurons
    console.print(
        f"[bold]{prov.recipe.data.get('name', folder.name)}[/]: {prov.plan.n_neurons} neurons from "
        f"[bold]{ns.method}[/] on {prov.base_model.hub_id or prov.base_model.ref}"
        f"{' @ ' + prov.base_model.revision if prov.base_model.revision else ''}; edit {prov.edit_form}, "
        f"{prov.dtype}; bakeedit {prov.bakeedit_version}, {prov.created_at}"
    )
    if ns.params:
        console.print("method parameters: " + ", ".join(f"{k}={v}" for k, v in ns.params.items()))

    per_site: dict[str, dict] = defaultdict(lambda: {"n": 0, "layers": set(), "lambdas": set()})
    for group in prov.plan.groups:
        cell = per_site[group.site]
        cell["n"] += len(group.indices)
        cell["layers"].add(group.layer)
        cell["lambdas"].update(group.lambdas)
    table = Table(title="per site", title_justify="left")
    for col in ("site", "neurons", "layers", "lambdas", "share of site"):
        table.add_column(col)
    for site in SITES:
        if site in per_site:
            cell = per_site[site]
            total = layout.site_size(site) * layout.n_layers
            layers = sorted(cell["layers"])
            table.add_row(site, str(cell["n"]), f"{len(layers)} ({layers[0]}-{layers[-1]})",
                          ", ".join(f"{x:g}" for x in sorted(cell["lambdas"])), f"{cell['n'] / total:.3%}")
    console.print(table)

    # The heat map counts the folder's NeuronSet, so the neurons of a custom-module (nonlinear or position-scoped)
    # edit appear in it too, not only the folded groups.
    heat_sites = [s for s in SITES if s in {n.site for n in ns.neurons}]
    title = f"per layer x site: {len(ns.neurons)} {ns.method} neurons"
    console.print(rich_heatmap(ns, layout.n_layers, heat_sites, title=title))
    if png is not None:
        png.parent.mkdir(parents=True, exist_ok=True)
        console.print(f"heat map: {save_heatmap_png(ns, layout.n_layers, heat_sites, png, title=title)}")
    elif (folder / HEATMAP_FILE).is_file():
        console.print(f"heat map: {folder / HEATMAP_FILE}")

    if prov.plan.module_groups:
        _print_module_groups(prov)

    if any(s in per_site for s in ("attn.k", "attn.v")) and layout.dims.n_kv_heads != layout.dims.n_heads:
        group = layout.dims.n_heads // layout.dims.n_kv_heads
        console.print(f"[yellow]note[/]: grouped-query attention; each attn.k/attn.v channel is shared by "
                      f"{group} query heads, and its edit touches all of them")

    ver = prov.verification
    console.print(
        f"verification: {'[green]passed[/]' if ver.passed else '[red]FAILED[/]'} max |delta logit| "
        f"{ver.max_abs_logit_delta:.2e} <= {ver.tolerance:.1e} over {ver.n_tokens} tokens ({ver.dtype})"
    )
    _print_manifest(folder)
    if list_neurons:
        detail = Table(title="neurons", title_justify="left")
        for col in ("layer", "site", "index", "channel", "lambda", "score"):
            detail.add_column(col)
        scores = {n.address: n.score for n in ns.neurons}
        for group in prov.plan.groups:
            for index, lam in zip(group.indices, group.lambdas, strict=True):
                score = scores.get((group.layer, group.site, index))
                detail.add_row(str(group.layer), group.site, str(index), layout.describe_channel(group.site, index),
                               f"{lam:g}", "" if score is None else f"{score:.4g}")
        console.print(detail)
