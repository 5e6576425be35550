"""Parameter resolution: gradients over layers, filters, precedence and validation."""

from __future__ import annotations

import pytest

from evomerge_core.errors import ConfigError, MergeError
from evomerge_core.merge.params import evaluate_setting, layer_position, plan_recipe, resolve_tensor_params
from evomerge_core.merge.recipe import ConditionalValue, MergeRecipe


def recipe(**kw) -> MergeRecipe:
    data = {
        "merge_method": "ties",
        "base_model": "b",
        "models": [{"model": "m1", "parameters": {"weight": 1.0}}, {"model": "m2", "parameters": {"weight": 0.5}}],
    }
    data.update(kw)
    return MergeRecipe.model_validate(data)


def test_layer_position_matches_mergekit():
    assert layer_position("model.layers.0.mlp.up_proj.weight", 5) == 0.0
    assert layer_position("model.layers.4.mlp.up_proj.weight", 5) == 1.0
    assert layer_position("model.layers.1.mlp.up_proj.weight", 5) == 0.25
    assert layer_position("model.layers.0.mlp.up_proj.weight", 1) == 1.0
    assert layer_position("model.embed_tokens.weight", 5) == 0.0
    assert layer_position("lm_head.weight", 5) == 0.0


def test_gradient_interpolates():
    assert evaluate_setting([0.0, 1.0], "x", 0.25) == 0.25
    assert evaluate_setting([0.0, 1.0, 0.0], "x", 0.75) == pytest.approx(0.5)
    assert evaluate_setting([0.2, 0.8], "x", 1.0) == 0.8
    assert evaluate_setting(0.3, "x", 0.5) == 0.3


def test_filters_first_match_wins_and_none_falls_through():
    setting = [ConditionalValue(filter="mlp", value=0.1), ConditionalValue(filter="self_attn", value=[0.0, 1.0]), ConditionalValue(value=0.9)]
    assert evaluate_setting(setting, "model.layers.0.mlp.up_proj.weight", 0.5) == 0.1
    assert evaluate_setting(setting, "model.layers.1.self_attn.q_proj.weight", 0.5) == 0.5
    assert evaluate_setting(setting, "model.norm.weight", 0.0) == 0.9
    assert evaluate_setting([ConditionalValue(filter="mlp", value=0.1)], "model.norm.weight", 0.0) is None


def test_precedence_model_then_global_then_default():
    r = recipe(parameters={"density": 0.4, "weight": 9.0, "lambda": [1.0, 3.0]},
               models=[{"model": "m1", "parameters": {"weight": 1.0, "density": [{"filter": "mlp", "value": 0.2}]}},
                       {"model": "m2", "parameters": {"weight": 0.5}}])
    plan = plan_recipe(r)
    g, per = resolve_tensor_params(plan, "model.layers.1.mlp.up_proj.weight", 3)
    assert g["lambda"] == 2.0 and g["normalize"] is True
    assert per == [{"weight": 1.0, "density": 0.2}, {"weight": 0.5, "density": 0.4}]
    g, per = resolve_tensor_params(plan, "model.layers.0.self_attn.q_proj.weight", 3)
    assert per[0]["density"] == 0.4 and g["lambda"] == 1.0


def test_default_density_and_missing_weight():
    plan = plan_recipe(recipe(models=[{"model": "m1"}, {"model": "m2", "parameters": {"weight": 1}}]))
    with pytest.raises(MergeError, match="'weight' for model 'm1'"):
        resolve_tensor_params(plan, "model.norm.weight", 2)
    plan = plan_recipe(recipe())
    _, per = resolve_tensor_params(plan, "model.norm.weight", 2)
    assert per[0]["density"] == 1.0


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"parameters": {"density": 1.5}}, r"density.*\[0.0, 1.0\]"),
        ({"parameters": {"density": [0.5, -0.1]}}, "density"),
        ({"merge_method": "slerp", "models": [{"model": "m1"}], "parameters": {"t": 2}}, "'t'"),
        ({"parameters": {"densty": 0.5}}, "did you mean 'density'"),
        ({"models": [{"model": "m1", "parameters": {"weight": 1, "lambda": 2}}]}, "is global"),
        ({"models": [{"model": "m1", "parameters": {"weight": 1}}, {"model": "m1", "parameters": {"weight": 1}}]}, "listed twice"),
        ({"base_model": None}, "needs a base model"),
        ({"merge_method": "slerp", "parameters": {"t": 0.5}}, "exactly 1"),
        ({"parameters": {"normalize": "yes"}}, "true or false"),
        ({"merge_method": "nope"}, "unknown merge method"),
    ],
)
def test_plan_rejects_bad_recipes(kw, match):
    with pytest.raises((ConfigError, MergeError), match=match):
        plan_recipe(recipe(**kw))


def test_linear_takes_unlisted_base_as_an_input_like_mergekit():
    plan = plan_recipe(MergeRecipe.model_validate({"merge_method": "linear", "base_model": "b", "models": [{"model": "a"}],
                                                   "parameters": {"weight": 1}}))
    assert plan.inputs == ("a", "b") and plan.base is None and plan.reference == "b"
