"""Recipe parsing: data only (safe_load), strict schema, errors that name the file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from bakeedit.errors import RecipeError
from bakeedit.evaluate.runner import expand_tasks
from bakeedit.recipe import load_recipe


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_minimal_recipe_with_model_shorthand(tmp_path):
    lr = load_recipe(write(tmp_path, "name: x\nmodel: embedded\nneurons: [{layer: 0, site: attn.q, index: 1}]\n"))
    assert lr.recipe.model.id == "embedded"
    assert lr.recipe.edit.lambda_ == 2.0
    assert len(lr.sha256) == 64


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "name: x\nmodel: [unclosed\n")
    with pytest.raises(RecipeError, match=r"r\.yaml: malformed YAML at line \d+"):
        load_recipe(path)


def test_yaml_tags_are_not_executed(tmp_path):
    path = write(tmp_path, "name: !!python/object/apply:os.system ['echo pwned']\nmodel: embedded\n")
    with pytest.raises(RecipeError, match="malformed YAML"):
        load_recipe(path)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("neurons: [{layer: 0, site: attn.x, index: 1}]",
         r"neurons\.0\.site: unknown site 'attn\.x'; allowed: attn\.q"),
        ("neurons: [{layer: 0, site: attn.q, index: -1}]", r"neurons\.0\.index: Input should be greater than"),
        ("neurons: [{layer: 0, site: attn.q, index: 1}]\nedit: {lambda: .nan}",
         r"edit\.lambda: lambda must be a finite number"),
        ("neurons: [{layer: 0, site: attn.q, index: 1}]\nedit: {lamda: 2}", r"edit\.lamda: Extra inputs"),
        ("neurons: []\nneurons_file: n.json", "give exactly one of 'neurons'"),
        ("", "give exactly one of 'neurons'.*got none"),
    ],
)
def test_schema_errors_name_the_field(tmp_path, body, message):
    with pytest.raises(RecipeError, match=message) as info:
        load_recipe(write(tmp_path, f"name: x\nmodel: embedded\n{body}\n"))
    assert str(info.value).startswith(str(tmp_path / "r.yaml"))


def test_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "nope.yaml")


def test_not_a_mapping(tmp_path):
    with pytest.raises(RecipeError, match="must be a YAML mapping"):
        load_recipe(write(tmp_path, "- a\n- b\n"))


def test_shipped_recipes_validate():
    recipes = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
    assert recipes, "the repo ships recipes"
    for path in recipes:
        recipe = load_recipe(path).recipe
        if recipe.evaluate is not None:
            expand_tasks(recipe.evaluate.tasks)  # an unknown task name fails here, not after an hour of locating
