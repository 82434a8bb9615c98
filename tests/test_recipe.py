from pathlib import Path

import pytest

from clearlm.errors import RecipeError
from clearlm.recipe import load_recipe, parse_recipe


def _parse(text: str, overrides: list[str] = ()):
    return parse_recipe(text, "r.toml", Path("."), overrides).recipe


def test_builtin_quickstart_loads_without_argument():
    loaded = load_recipe()
    assert loaded.recipe.name == "quickstart"
    assert loaded.recipe.data.builtin == "cpython-stdlib"
    assert loaded.origin == "<builtin quickstart>"


def test_repo_recipe_file_is_the_builtin_one():
    repo_file = Path(__file__).parents[1] / "recipes" / "quickstart.toml"
    assert load_recipe(repo_file).recipe == load_recipe().recipe


def test_unknown_key_is_one_line_naming_file_and_key():
    with pytest.raises(RecipeError) as e:
        _parse('name = "x"\n[train]\nmax_step = 3\n[data]\nbuiltin = "cpython-stdlib"')
    msg = str(e.value)
    assert msg == "r.toml: train.max_step: unknown key"


def test_bad_value_names_key_and_value():
    with pytest.raises(RecipeError) as e:
        _parse('name = "x"\n[data]\nbuiltin = "cpython-stdlib"\n[train]\nlr = -1')
    assert "train.lr" in str(e.value) and "-1" in str(e.value) and "\n" not in str(e.value)


def test_invalid_model_shape_is_reported():
    with pytest.raises(RecipeError, match=r"model: .*divisible by n_heads"):
        _parse('name = "x"\n[data]\nbuiltin = "cpython-stdlib"\n[model]\nd_model = 30\nn_heads = 4')


def test_overrides_parse_toml_values_and_reach_nested_keys():
    r = _parse('name = "x"\n[data]\nbuiltin = "cpython-stdlib"', ["train.max_steps=200", "train.lr=1e-3"])
    assert r.train.max_steps == 200 and r.train.lr == 1e-3


def test_override_of_unknown_key_is_an_error():
    with pytest.raises(RecipeError, match=r"train\.nope: unknown key"):
        _parse('name = "x"\n[data]\nbuiltin = "cpython-stdlib"', ["train.nope=1"])


def test_malformed_override_and_toml():
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        _parse('name = "x"', ["train.max_steps"])
    with pytest.raises(RecipeError, match=r"r\.toml: invalid TOML"):
        _parse("name = ")


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.toml")


def test_data_needs_a_source():
    with pytest.raises(
        RecipeError,
        match=r"^r\.toml: the recipe has no \[data\] section \(needed by tokenizer <- "
        r"eval\): add one, or post-train a model folder",
    ):
        _parse('name = "x"')
    with pytest.raises(RecipeError, match="data: needs a builtin corpus"):
        _parse('name = "x"\n[data]\nvalidation_fraction = 0.1')
