"""``edit.fit`` is run once per model, neurons, edit and data, and read back from bakeedit's cache after that."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from edit.test_fit import NEURONS, contrast_file

import bakeedit.workflows.fit_cache as fit_cache
from bakeedit.models.arch import ModelLayout
from bakeedit.models.load import LoadedModel, ModelSource
from bakeedit.neurons import Neuron
from bakeedit.recipe import EditSpec

from tiny_models import tiny_model, tiny_tokenizer

EDIT = {"type": "nonlinear", "map": "tanh_gain", "params": {"s": 0.2},
        "fit": {"grid": {"alpha": [-0.5, 0.5, 2.0]}, "budget": 100.0, "require_reduction": False}}


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """A tiny model, its contrast file, and a counter of the real fits run."""
    model = tiny_model("llama")
    weights = tmp_path / "model"
    weights.mkdir()
    (weights / "config.json").write_text("{}")
    loaded = LoadedModel(model=model, tokenizer=tiny_tokenizer(), layout=ModelLayout.for_model(model),
                         source=ModelSource(ref="tiny", kind="local", path=weights), dtype=torch.float32)
    fits: list[int] = []
    real = fit_cache.fit_edit

    def counting(*args, **kwargs):
        fits.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(fit_cache, "fit_edit", counting)
    return loaded, contrast_file(tmp_path), tmp_path / "cache", fits


def test_the_same_fit_is_read_back_and_says_so(setup):
    loaded, data, cache, fits = setup
    edit = EditSpec.model_validate(EDIT)
    first, report = fit_cache.cached_fit_edit(edit, NEURONS, loaded, data, cache)
    again, cached = fit_cache.cached_fit_edit(edit, list(reversed(NEURONS)), loaded, data, cache)
    assert len(fits) == 1 and again == first
    assert cached.cached and not report.cached
    assert cached.model_dump(exclude={"cached"}) == report.model_dump(exclude={"cached"})


@pytest.mark.parametrize("change", ["neurons", "neuron lambda", "grid", "data", "weights", "no cache"])
def test_anything_the_fit_reads_makes_it_run_again(setup, change):
    loaded, data, cache, fits = setup
    edit, neurons = EditSpec.model_validate(EDIT), list(NEURONS)
    fit_cache.cached_fit_edit(edit, neurons, loaded, data, cache)
    if change == "neurons":
        neurons = neurons[:-1]
    elif change == "neuron lambda":
        neurons = [*neurons[:-1], Neuron(layer=neurons[-1].layer, site=neurons[-1].site, index=neurons[-1].index,
                                         **{"lambda": 3.0})]
    elif change == "grid":
        edit = EditSpec.model_validate({**EDIT, "fit": {**EDIT["fit"], "grid": {"alpha": [-0.5, 0.5]}}})
    elif change == "data":
        data.write_text(data.read_text().replace("bakery", "library"))
    elif change == "weights":
        (loaded.source.path / "config.json").write_text('{"changed": true}')
        loaded.source.file_hashes.clear()  # a new process hashes the files again
    else:
        cache = None
    fit_cache.cached_fit_edit(edit, neurons, loaded, data, cache)
    assert len(fits) == 2


def test_a_damaged_entry_is_reported_and_fitted_again(setup, caplog):
    loaded, data, cache, fits = setup
    edit = EditSpec.model_validate(EDIT)
    _, report = fit_cache.cached_fit_edit(edit, NEURONS, loaded, data, cache)
    (entry,) = cache.glob("*.json")
    entry.write_text(entry.read_text()[:40])  # truncated by a full disk
    with caplog.at_level(logging.WARNING):
        _, again = fit_cache.cached_fit_edit(edit, NEURONS, loaded, data, cache)
    assert len(fits) == 2 and not again.cached and again.chosen == report.chosen
    assert "damaged" in caplog.text and str(entry) in caplog.text
    assert [p.name for p in cache.iterdir()] == [entry.name]  # rewritten, no temporary left


def test_the_contrast_file_counts_by_its_content_not_its_path(setup, tmp_path):
    """``bakeedit search`` writes the chosen recipe in its output folder, so ``fit.data`` is spelt from there
    (``../items.jsonl``): apply must still find the fit its trial cached."""
    loaded, data, cache, fits = setup
    beside = EditSpec.model_validate({**EDIT, "fit": {**EDIT["fit"], "data": "items.jsonl"}})
    rebased = EditSpec.model_validate({**EDIT, "fit": {**EDIT["fit"], "data": "../items.jsonl"}})
    fit_cache.cached_fit_edit(beside, NEURONS, loaded, data, cache)
    fit_cache.cached_fit_edit(rebased, NEURONS, loaded, data, cache)
    assert len(fits) == 1


def test_apply_reads_back_the_fit_of_an_earlier_apply_and_bakes_the_same_edit(tmp_path, tiny_checkpoint,
                                                                               monkeypatch):
    from click.testing import CliRunner

    from bakeedit.cli import main

    monkeypatch.setenv("BAKEEDIT_CACHE", str(tmp_path / "cache"))
    contrast_file(tmp_path)
    recipe = tmp_path / "fit.yaml"
    recipe.write_text(
        f"name: fit-tiny\nmodel: {tiny_checkpoint('llama')}\n"
        "neurons: [{layer: 1, site: attn.q, index: 2}, {layer: 2, site: mlp.act, index: 4}]\n"
        "edit: {type: nonlinear, map: tanh_gain, params: {s: 0.2},\n"
        "       fit: {grid: {alpha: [-0.5, 0.5]}, budget: 100.0, require_reduction: false, data: items.jsonl}}\n")
    records = []
    for name in ("first", "second"):
        result = CliRunner().invoke(main, ["apply", str(recipe), "-o", str(tmp_path / name), "--no-eval"])
        assert result.exit_code == 0, result.output
        records.append(json.loads((tmp_path / name / "bakeedit.json").read_text()))
    first, second = records
    assert first["fit"]["cached"] is False and second["fit"]["cached"] is True
    assert second["fit"]["chosen"] == first["fit"]["chosen"] and second["plan"] == first["plan"]
    assert len(list((tmp_path / "cache" / "fit").glob("*.json"))) == 1
