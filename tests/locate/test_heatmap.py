"""The per-layer x per-site heat map: exact counts, a rich table that shows them, a PNG that is written."""

from __future__ import annotations

import numpy as np
import pytest
from rich.console import Console

from bakeedit.errors import NeuronSetError
from bakeedit.export.heatmap import counts_grid, rich_heatmap, save_heatmap_png
from bakeedit.neurons import Neuron, NeuronSet

CELLS = {(0, "attn.q"): 2, (2, "attn.v"): 5, (2, "attn.q"): 1, (3, "mlp.act"): 3}


def neuron_set() -> NeuronSet:
    return NeuronSet(method="coco", neurons=[Neuron(layer=layer, site=site, index=i)
                                             for (layer, site), count in CELLS.items() for i in range(count)])


def test_counts_grid_counts_every_cell():
    grid = counts_grid(neuron_set(), 4, ["attn.q", "attn.v", "mlp.act"])
    expected = np.zeros((4, 3), dtype=np.int64)
    for (layer, site), count in CELLS.items():
        expected[layer, ["attn.q", "attn.v", "mlp.act"].index(site)] = count
    np.testing.assert_array_equal(grid, expected)
    # default columns: the sites the set uses, in canonical order
    np.testing.assert_array_equal(counts_grid(neuron_set(), 4), expected)
    assert counts_grid(NeuronSet(method="x", neurons=[]), 2, ["attn.q"]).tolist() == [[0], [0]]


def test_neurons_outside_the_grid_are_an_error():
    with pytest.raises(NeuronSetError, match="layer 3"):
        counts_grid(neuron_set(), 3)
    with pytest.raises(NeuronSetError, match=r"mlp\.act"):
        counts_grid(neuron_set(), 4, ["attn.q", "attn.v"])


def test_rich_heatmap_shows_layers_sites_and_counts():
    console = Console(record=True, width=100, color_system="truecolor")
    console.print(rich_heatmap(neuron_set(), 4, ["attn.q", "attn.v", "mlp.act"]))
    text = console.export_text()
    rows = {line.split("│")[1].strip(): line for line in text.splitlines() if line.count("│") >= 5}
    assert rows["2"].split("│")[2].strip() == "1" and rows["2"].split("│")[3].strip() == "5"
    assert rows["2"].split("│")[5].strip() == "6"  # row total
    assert rows["total"].split("│")[5].strip() == "11"
    assert "attn.v" in text and "mlp.act" in text
    assert "rgb(" in console.export_html() or "background-color" in console.export_html()  # cells are shaded


def test_png_is_written(tmp_path):
    path = save_heatmap_png(neuron_set(), 4, None, tmp_path / "neurons.png", title="test")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    assert [p.name for p in tmp_path.iterdir()] == ["neurons.png"]  # no temporary left behind
