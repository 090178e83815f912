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


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("{lambda: true}", r"edit\.lambda: expected a number, got the boolean true"),
        ('{lambda: "2"}', r"edit\.lambda: expected a number, got the string '2'"),
        ("{lambda: 1e-4}", r"edit\.lambda: .*write e\.g\. 1\.0e-4"),
        ("{lambda: 2, start: 1.0}", r"edit\.start: expected a whole number"),
    ],
)
def test_numbers_are_strict(tmp_path, edit, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(write(tmp_path, f"name: x\nmodel: embedded\nneurons: [{{layer: 0, site: attn.q, index: 1}}]\n"
                                    f"edit: {edit}\n"))


def test_ints_and_negative_lambdas_are_numbers(tmp_path):
    lr = load_recipe(write(tmp_path, "name: x\nmodel: embedded\nedit: {lambda: -1}\n"
                                     "neurons: [{layer: 0, site: attn.q, index: 1, lambda: -0.5}]\n"))
    assert lr.recipe.edit.lambda_ == -1.0 and lr.recipe.neurons[0].lambda_ == -0.5


@pytest.mark.parametrize(("size", "ok"), [("2GB", True), ("20KB", True), ("1.5GB", True), ("banana", False),
                                          ("0GB", False), ("2 parsecs", False)])
def test_max_shard_size_is_parsed_when_read(tmp_path, size, ok):
    text = f"name: x\nmodel: embedded\nneurons: []\nexport: {{max_shard_size: '{size}'}}\n"
    if ok:
        assert load_recipe(write(tmp_path, text)).recipe.export.max_shard_size == size
    else:
        with pytest.raises(RecipeError, match=r"export\.max_shard_size: .*size"):
            load_recipe(write(tmp_path, text))


@pytest.mark.parametrize(("device", "ok"), [("cpu", True), ("auto", True), ("tpu", False), ("cuda:99", False),
                                            ("gpu", False)])
def test_device_is_checked_when_read(tmp_path, device, ok):
    text = f"name: x\nmodel: {{id: embedded, device: '{device}'}}\nneurons: []\n"
    if ok:
        assert load_recipe(write(tmp_path, text)).recipe.model.device == device
    else:
        with pytest.raises(RecipeError, match=r"model\.device: "):
            load_recipe(write(tmp_path, text))


def test_empty_verify_prompts_are_an_error(tmp_path):
    with pytest.raises(RecipeError, match=r"verify\.prompts: an empty list"):
        load_recipe(write(tmp_path, "name: x\nmodel: embedded\nneurons: []\nverify: {prompts: []}\n"))


def test_oversized_recipe_is_refused_before_parsing(tmp_path):
    path = write(tmp_path, "name: x\nmodel: embedded\nneurons: []\n# " + "y" * 1_000_000 + "\n")
    with pytest.raises(RecipeError, match=r"r\.yaml: a recipe is at most 1,000,000 bytes \(1 MB\)"):
        load_recipe(path)


def test_hub_id_is_kept_and_marked_when_no_such_path_is_beside_the_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").mkdir()
    path = tmp_path / "recipes" / "r.yaml"
    path.write_text("name: x\nmodel: org/name\nneurons: []\n")
    lr = load_recipe(path)
    assert lr.recipe.model.id == "org/name" and lr.recipe.model.hub_only
    (tmp_path / "recipes" / "org" / "name").mkdir(parents=True)
    lr = load_recipe(path)  # a folder of that name beside the recipe wins, given relative to the cwd
    assert lr.recipe.model.id == "recipes/org/name" and not lr.recipe.model.hub_only
