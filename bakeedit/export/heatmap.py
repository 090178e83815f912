"""Per-layer x per-site heat maps of a NeuronSet: a count grid, a rich table for terminals, a PNG for folders.

Where located neurons sit is the first thing to look at after locating (COCO reports its neurons mostly in deeper
layers' Q and V; KnowBias in the upper FFN layers); ``bakeedit locate``, ``inspect`` and ``apply`` show the same map.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from rich.color import Color
from rich.style import Style
from rich.table import Table
from rich.text import Text

from bakeedit.errors import NeuronSetError
from bakeedit.models.spec import site_order
from bakeedit.neurons import NeuronSet


def _sites(neuron_set: NeuronSet, sites: Sequence[str] | None) -> list[str]:
    """The columns: ``sites`` as given, else the sites the set uses, in the canonical order."""
    if sites is not None:
        return list(sites)
    used = {n.site for n in neuron_set.neurons}
    return sorted(used, key=site_order)


def counts_grid(neuron_set: NeuronSet, n_layers: int, sites: Sequence[str] | None = None) -> np.ndarray:
    """``grid[layer, j]`` = number of neurons in ``layer`` at ``sites[j]``; shape ``[n_layers, len(sites)]``.

    A neuron outside the grid (a layer >= ``n_layers`` or a site not in ``sites``) is an error, not dropped: a map
    that silently leaves neurons out would misreport the set.
    """
    columns = _sites(neuron_set, sites)
    grid = np.zeros((n_layers, len(columns)), dtype=np.int64)
    for n in neuron_set.neurons:
        if n.layer >= n_layers:
            raise NeuronSetError(f"neuron at layer {n.layer} does not fit a model of {n_layers} layers")
        if n.site not in columns:
            raise NeuronSetError(f"neuron at site {n.site} is not among the heat map's sites ({', '.join(columns)})")
        grid[n.layer, columns.index(n.site)] += 1
    return grid


def _shade(count: int, peak: int) -> Style:
    """White-on-dark-red for the densest cell, fading to no background for empty ones."""
    if count == 0:
        return Style(dim=True)
    level = 0.25 + 0.75 * count / peak
    background = Color.from_rgb(60 + 170 * level, 60 * (1 - level) + 20, 60 * (1 - level) + 20)
    return Style(color="white", bgcolor=background, bold=count == peak)


def rich_heatmap(
    neuron_set: NeuronSet, n_layers: int, sites: Sequence[str] | None = None, title: str | None = None
) -> Table:
    """A rich table, layers as rows and sites as columns, each cell its count on a shaded background."""
    columns = _sites(neuron_set, sites)
    grid = counts_grid(neuron_set, n_layers, columns)
    peak = max(1, int(grid.max(initial=0)))
    table = Table(title=title or f"{len(neuron_set.neurons)} neurons per layer x site", title_justify="left")
    table.add_column("layer", justify="right")
    for site in columns:
        table.add_column(site, justify="right")
    table.add_column("total", justify="right", style="bold")
    for layer in range(n_layers):
        cells = [Text(f"{c:>4}" if c else "   ·", style=_shade(int(c), peak)) for c in grid[layer]]
        table.add_row(str(layer), *cells, str(int(grid[layer].sum())))
    table.add_section()
    table.add_row("total", *(str(int(v)) for v in grid.sum(axis=0)), str(int(grid.sum())))
    return table


def save_heatmap_png(
    neuron_set: NeuronSet, n_layers: int, sites: Sequence[str] | None, path: Path, title: str | None = None
) -> Path:
    """Write the heat map as a PNG (matplotlib Agg, no display needed); the file appears complete or not at all."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = _sites(neuron_set, sites)
    grid = counts_grid(neuron_set, n_layers, columns)
    fig = Figure(figsize=(1.6 + 1.1 * max(1, len(columns)), 1.4 + 0.28 * n_layers), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(grid, aspect="auto", cmap="Reds", vmin=0, vmax=max(1, int(grid.max(initial=0))))
    ax.set_xticks(range(len(columns)), labels=columns)
    ax.set_yticks(range(n_layers), labels=[str(i) for i in range(n_layers)], fontsize=7)
    ax.set_xlabel("site")
    ax.set_ylabel("layer")
    ax.set_title(title or f"{neuron_set.method}: {len(neuron_set.neurons)} neurons", fontsize=9)
    peak = max(1, int(grid.max(initial=0)))
    for layer, j in zip(*np.nonzero(grid), strict=True):
        value = int(grid[layer, j])
        ax.text(j, layer, str(value), ha="center", va="center", fontsize=6,
                color="white" if value > peak / 2 else "black")
    fig.colorbar(image, ax=ax, label="neurons")
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path
