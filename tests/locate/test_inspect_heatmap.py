"""``bakeedit inspect`` shows the folder's neurons as a layer x site heat map and draws it as a PNG on request."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from bakeedit.cli import main
from bakeedit.export.card import HEATMAP_FILE

# layer 1 gets two attn.v neurons and one mlp.act neuron; layer 2 one attn.o_in neuron
RECIPE = """name: tiny-heat
model: {model}
edit: {{lambda: 2.0}}
neurons:
  - {{layer: 0, site: attn.q, index: 3}}
  - {{layer: 1, site: attn.v, index: 5}}
  - {{layer: 1, site: attn.v, index: 6}}
  - {{layer: 1, site: mlp.act, index: 7}}
  - {{layer: 2, site: attn.o_in, index: 30}}
"""


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def heat_rows(text: str) -> dict[str, list[str]]:
    """The heat map's rows by their first cell (a layer number or ``total``), cells stripped."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if len(cells) == 6 and cells[0] and (cells[0].isdigit() or cells[0] == "total"):
            rows[cells[0]] = cells[1:]
    return rows


def test_inspect_prints_the_heat_map_and_writes_the_png_on_request(tmp_path: Path, tiny_checkpoint):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(model=tiny_checkpoint("llama")))
    out = tmp_path / "out"
    applied = run("apply", str(recipe), "-o", str(out), "--no-eval")
    assert applied.exit_code == 0, applied.output
    (out / HEATMAP_FILE).unlink(missing_ok=True)  # whatever apply drew: inspect must not need it
    before = sorted(p.name for p in out.iterdir())

    shown = run("inspect", str(out))
    assert shown.exit_code == 0, shown.output
    assert "per layer x site: 5" in shown.stderr and "heat map:" not in shown.stderr
    rows = heat_rows(shown.stderr)
    # columns: attn.q, attn.v, attn.o_in, mlp.act (canonical site order), total; "·" marks an empty cell
    assert rows["0"] == ["1", "·", "·", "·", "1"]
    assert rows["1"] == ["·", "2", "·", "1", "3"]
    assert rows["2"] == ["·", "·", "1", "·", "1"]
    assert rows["total"] == ["1", "2", "1", "1", "5"]

    png = tmp_path / "maps" / "heat.png"
    drawn = run("inspect", str(out), "--png", str(png))
    assert drawn.exit_code == 0, drawn.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"heat map: {png}" in drawn.stderr.replace("\n", "")
    assert sorted(p.name for p in out.iterdir()) == before  # inspect never writes into the checkpoint folder

    png.rename(out / HEATMAP_FILE)  # a folder that carries its map (as apply's card leaves it): the path is shown
    listed = run("inspect", str(out))
    assert listed.exit_code == 0 and HEATMAP_FILE in listed.stderr.replace("\n", "")
