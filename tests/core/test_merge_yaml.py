"""Loading mergekit YAML / evomerge recipes and exporting back to mergekit YAML."""

from __future__ import annotations

import pytest
import yaml

from evomerge_core.errors import ConfigError, MergeError
from evomerge_core.merge.mergekit_yaml import load_config, load_recipe, recipe_from_dict, to_mergekit_yaml

MK = """
models:
  - model: org/math@v1
    parameters:
      density: 0.53
      weight: 0.4
  - model: org/ja
    parameters:
      density: [0.2, 0.8]
      weight: {filter: mlp, value: 0.6}
merge_method: dare_ties
base_model: org/base
parameters:
  int8_mask: true
  normalize: false
dtype: bfloat16
"""


def test_load_mergekit_yaml(tmp_path):
    path = tmp_path / "mk.yaml"
    path.write_text(MK)
    recipe, notes = load_recipe(path)
    assert recipe.merge_method == "dare_ties" and recipe.base_model == "org/base" and recipe.dtype == "bfloat16"
    assert recipe.parameters == {"normalize": False}
    assert [m.model for m in recipe.models] == ["org/math@v1", "org/ja"]
    assert recipe.models[1].parameters["weight"][0].filter == "mlp"
    assert len(notes) == 1 and "int8_mask" in notes[0]


def test_export_roundtrip_and_recipe_wrapper(tmp_path):
    recipe, _ = recipe_from_dict(yaml.safe_load(MK))
    recipe = recipe.model_copy(update={"seed": 42})
    text = to_mergekit_yaml(recipe)
    assert text.startswith("# evomerge seed: 42")
    data = yaml.safe_load(text)
    assert "seed" not in data and data["merge_method"] == "dare_ties"
    again, _ = recipe_from_dict(data)
    assert again.model_dump() == recipe.model_copy(update={"seed": 0}).model_dump()
    wrapped, _ = recipe_from_dict({"recipe": recipe.to_yaml_dict()})
    assert wrapped == recipe


@pytest.mark.parametrize(
    "change, match",
    [
        ({"tokenizer": {"source": "union"}}, "tokenizer"),
        ({"tokenizer_source": "union"}, "union"),
        ({"chat_template": "chatml"}, "chat_template"),
        ({"foo": 1}, "unknown key"),
        ({"merge_method": "della"}, "unknown merge method"),
        ({"models": [{"model": "a+lora"}]}, "LoRA"),
        ({"slices": [{"sources": [{"model": "a", "layer_range": [0, 4]}]}]}, "either 'models' or 'slices'"),
    ],
)
def test_unsupported_options_are_refused(change, match):
    data = yaml.safe_load(MK)
    data.update(change)
    with pytest.raises((ConfigError, MergeError), match=match):
        recipe_from_dict(data)


def test_slices_read_as_models(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({
        "merge_method": "slerp", "base_model": "a", "parameters": {"t": 0.3},
        "slices": [{"sources": [{"model": "a", "layer_range": [0, 8]}, {"model": "b", "layer_range": [0, 8]}]}],
    }))
    loaded = load_config(path)
    assert [m.model for m in loaded.recipe.models] == ["a", "b"] and loaded.layer_range == (0, 8)
    path.write_text(yaml.safe_dump({"merge_method": "slerp", "slices": [{"sources": [{"model": "a", "layer_range": [0, 8]}]}, {"sources": []}]}))
    with pytest.raises(ConfigError, match="single-slice"):
        load_config(path)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(bad)
