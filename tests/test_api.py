"""`recast.refactor`: a recipe and keyword overrides, set by the same code as `--set`."""

import pytest
import torch
import yaml

import recast
import recast.api
from recast.errors import RecipeError
from recast.recipe import load_recipe
from tiny_models import outputs, tiny_model, token_batch

IN_MEMORY = {"name": "in-memory", "model": "<in-memory>"}


class Seen(Exception):
    """Raised instead of transforming: carries the recipe refactor built."""


def recipe_seen(monkeypatch, *args, **keywords):
    """The validated recipe `recast.refactor(model, *args, **keywords)` converts with."""

    def stop(dense, recipe, **_):
        raise Seen(recipe)

    monkeypatch.setattr(recast.api, "transform", stop)
    with pytest.raises(Seen) as seen:
        recast.refactor(tiny_model("llama"), *args, progress=False, **keywords)
    return seen.value.args[0]


BASE = {
    "experts": {"count": 4, "strategy": "uniform", "options": {"order": "random"}},
    "router": {"kind": "oracle"},
}


def test_a_recipe_dict_and_keywords_are_the_recipe_with_set(monkeypatch):
    through_api = recipe_seen(
        monkeypatch, BASE, top_k=1, shared=0.25, router="all", **{"experts.count": 2}
    )
    through_set = load_recipe(
        {**IN_MEMORY, **BASE},
        ["experts.top_k=1", "experts.shared=0.25", "router.kind=all", "experts.count=2"],
    )
    assert through_api.to_yaml() == through_set.to_yaml()
    assert through_api.experts.strategy_options == through_set.experts.strategy_options
    assert BASE["experts"]["count"] == 4  # the caller's dict is not changed


def test_the_recipe_can_be_a_file_and_converts_as_through_set(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(BASE))
    ids = token_batch()
    via_keywords = recast.refactor(tiny_model("llama"), path, top_k=1, progress=False)
    via_set = recast.refactor(
        tiny_model("llama"), load_recipe({**IN_MEMORY, **BASE}, ["experts.top_k=1"]), progress=False
    )
    assert via_keywords.recast.top_k == via_set.recast.top_k == 1
    assert via_keywords.recast.partition.to_json() == via_set.recast.partition.to_json()
    torch.testing.assert_close(outputs(via_keywords, ids), outputs(via_set, ids), rtol=0, atol=0)


def test_dotted_keys_override_single_recipe_keys(monkeypatch):
    recipe = recipe_seen(
        monkeypatch,
        strategy="uniform",
        recover={"rounds": 3},
        **{"recover.steps": 10, "recover.lora.rank": 4, "evaluate.enabled": False},
    )
    assert (recipe.recover.steps, recipe.recover.rounds, recipe.recover.lora.rank) == (10, 3, 4)
    assert recipe.recover.lr == 1e-4  # the schema's default, untouched
    assert recipe.evaluate.enabled is False


def test_shorthands_given_none_are_left_out(monkeypatch):
    recipe = recipe_seen(monkeypatch, strategy="uniform", recover=None, router_options=None)
    assert recipe.recover.steps == 0
    assert recipe.router.kind == "oracle"


def test_a_calibration_mapping_is_the_domains(monkeypatch):
    domains = {"a": "builtin:pydoc/statements", "b": "builtin:pydoc/expressions"}
    recipe = recipe_seen(monkeypatch, strategy="domain", experts=2, calibration=domains)
    assert recipe.calibration.domains == domains
    assert recipe.calibration.data == "builtin:pydoc"


def test_an_unknown_keyword_is_a_recipe_error_with_a_suggestion():
    with pytest.raises(RecipeError, match=r"unknown keyword 'expert' \(did you mean 'experts'\?\)"):
        recast.refactor(tiny_model("llama"), expert=4, progress=False)


def test_an_unknown_dotted_key_is_a_recipe_error_with_a_suggestion():
    with pytest.raises(
        RecipeError, match=r"recover\.stepz: unknown key \(did you mean 'steps'\?\)"
    ):
        recast.refactor(tiny_model("llama"), progress=False, **{"recover.stepz": 1})
