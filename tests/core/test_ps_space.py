"""PS search space: vector <-> recipe, bounds, x0, names, layer groups."""

from __future__ import annotations

import pytest

from evomerge_core.config.schema import parse_run_config
from evomerge_core.errors import ConfigError
from evomerge_core.merge.params import evaluate_setting
from evomerge_core.spaces import build_space, needs_num_layers


def config(**ps):
    return parse_run_config({
        "sources": [{"model": "m/base", "base": True}, {"model": "m/a"}, {"model": "m/b"}],
        "space": {"ps": ps},
        "fitness": {"dataset": {"path": "x.jsonl"}},
    })


def test_model_granularity_genome_layout_and_decode():
    space = build_space(config(params=["density", "weight"], bounds={"weight": [0.0, 2.0]}, x0={"weight": 1.0}))
    assert space.names == ["m/a:density", "m/a:weight", "m/b:density", "m/b:weight"]
    assert space.lower == [0, 0, 0, 0] and space.upper == [1, 2, 1, 2]
    assert space.x0 == [0.5, 1.0, 0.5, 1.0]
    recipe = space.decode([0.1, 1.5, 0.9, 0.25])
    assert recipe.base_model == "m/base" and recipe.merge_method == "dare_ties"
    assert [(m.model, m.parameters) for m in recipe.models] == [
        ("m/a", {"density": 0.1, "weight": 1.5}), ("m/b", {"density": 0.9, "weight": 0.25})]
    assert space.encode(space.describe([0.1, 1.5, 0.9, 0.25])) == [0.1, 1.5, 0.9, 0.25]


def test_decode_rejects_out_of_bounds_and_wrong_length():
    space = build_space(config())
    with pytest.raises(ValueError, match="outside"):
        space.decode([1.2, 0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="entries"):
        space.decode([0.5])


def test_layer_groups_resolve_per_layer_like_mergekit_filters():
    cfg = config(params=["weight"], granularity={"layer_groups": 2})
    assert needs_num_layers(cfg)
    space = build_space(cfg, num_layers=4)
    assert space.names == ["m/a:weight@g0", "m/a:weight@g1", "m/b:weight@g0", "m/b:weight@g1"]
    recipe = space.decode([0.1, 0.9, 0.2, 0.8])
    setting = recipe.models[0].parameters["weight"]
    got = [evaluate_setting(setting, f"model.layers.{i}.mlp.up_proj.weight", 0.0) for i in range(4)]
    assert got == [0.1, 0.1, 0.9, 0.9]
    assert evaluate_setting(setting, "model.layers.1.self_attn.q_proj.weight", 0.0) == 0.1  # not layers.1x
    assert evaluate_setting(setting, "model.embed_tokens.weight", 0.0) == 0.1  # outside layers: group 0
    with pytest.raises(ConfigError, match="at most 4"):
        build_space(config(granularity={"layer_groups": 5}), num_layers=4)


def test_methods_without_base_merge_every_source():
    cfg = parse_run_config({
        "sources": [{"model": "m/a"}, {"model": "m/b"}],
        "space": {"ps": {"method": "linear"}},
        "fitness": {"dataset": {"path": "x.jsonl"}},
    })
    space = build_space(cfg)
    recipe = space.decode([0.3, 0.7])
    assert recipe.base_model is None and [m.model for m in recipe.models] == ["m/a", "m/b"]
