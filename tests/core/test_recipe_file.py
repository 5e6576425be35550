"""`recipe.yaml` is THE recipe of a model directory; the names older versions wrote
(`evomerge_recipe.yaml`, `evomerge_dfs_recipe.yaml`) are still read wherever a recipe is read."""

from __future__ import annotations

import yaml

from evomerge_core.kinds.dfs import source_lineage


def test_dfs_lineage_reads_a_source_recipe_under_any_of_its_names(tmp_path):
    recipe = {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1.0}}]}
    plain = tmp_path / "plain"
    plain.mkdir()
    assert source_lineage("org/m", plain) == {"model": "org/m"}  # not an evomerge result
    for name in ("recipe.yaml", "evomerge_recipe.yaml", "evomerge_dfs_recipe.yaml"):
        model = tmp_path / name.replace(".", "_")
        model.mkdir()
        (model / name).write_text(yaml.safe_dump(recipe))
        assert source_lineage("m", model) == {"model": "m", "recipe": recipe}, name
    best = tmp_path / "best"  # an evolve best/ of before: recipe.yaml wins over the old name
    best.mkdir()
    (best / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (best / "evomerge_recipe.yaml").write_text(yaml.safe_dump({"merge_method": "other"}))
    (best / "lineage.yaml").write_text(yaml.safe_dump({"kind": "dfs"}))
    assert source_lineage("m", best) == {"model": "m", "recipe": recipe, "lineage": {"kind": "dfs"}}
