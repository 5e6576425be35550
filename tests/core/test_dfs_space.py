"""DFS search space: genome layout, decoding (path, scales, truncation), recipe YAML, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evomerge_core.errors import ConfigError, SourceError
from evomerge_core.spaces.dfs import DFSHop, DFSRecipe, DFSSpace, DFSSpaceConfig

LA, LB = 3, 2  # M = 5


def space(**kw) -> DFSSpace:
    return DFSSpace(DFSSpaceConfig(model_a="A", model_b="B", **kw), layers_a=LA, layers_b=LB)


def genome(sp: DFSSpace, keep: set[int], scale_genes: dict[int, float] | None = None) -> list[float]:
    g = [0.5 if t in keep else -0.5 for t in range(sp.T)] + [1.0] * (sp.dim - sp.T)
    for i, v in (scale_genes or {}).items():
        g[sp.T + i] = v
    return g


def test_layout_dims_and_names():
    sp = space(r=2)
    assert (sp.M, sp.T) == (5, 10)
    assert sp.dim == 10 + 25
    assert sp.names[:6] == ["I[c0:a0]", "I[c0:a1]", "I[c0:a2]", "I[c0:b0]", "I[c0:b1]", "I[c1:a0]"]
    assert sp.names[10] == "W[a0->a0]" and sp.names[10 + 1 * 5 + 3] == "W[a1->b0]"
    assert space(scales="vector").dim == 15 + 17
    assert space(scales="none").dim == 15
    assert len(sp.lower) == len(sp.upper) == len(sp.x0) == sp.dim


def test_x0_decodes_to_model_a():
    for mode in ("matrix", "vector", "none"):
        sp = space(scales=mode)
        recipe = sp.decode(sp.x0)
        assert [(h.model, h.layer) for h in recipe.path] == [("a", 0), ("a", 1), ("a", 2)]
        assert recipe.input_scales == [1.0, 1.0, 1.0]
    # only A's first-cycle interior slots start "on"
    sp = space()
    assert [sp.names[t] for t in range(sp.T) if sp.x0[t] > 0] == ["I[c0:a1]"]


def test_decode_path_and_matrix_scales():
    sp = space()
    # keep slot 3 (b0, cycle 0), slot 6 (a1, cycle 1), slot 14 (b1, cycle 2)
    W = {}
    M = sp.M
    W[0 * M + 3] = 0.3  # a0 -> b0
    W[3 * M + 1] = 0.4  # b0 -> a1
    W[1 * M + 4] = 1.7  # a1 -> b1
    W[4 * M + 2] = 0.9  # b1 -> a2 (the fixed end)
    recipe = sp.decode(genome(sp, {3, 6, 14}, W))
    assert [(h.model, h.layer) for h in recipe.path] == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2)]
    assert recipe.input_scales == [1.0, 0.3, 0.4, 1.7, 0.9]
    assert recipe.input_layers() == [0, 3, 1, 4, 2]
    assert recipe.layout.dropped_hops == 0


def test_decode_vector_scales():
    sp = space(scales="vector")
    recipe = sp.decode(genome(sp, {4, 7}, {0: 0.8, 1 + 4: 1.2, 1 + 7: 0.6, sp.T + 1: 1.5}))
    assert [(h.model, h.layer) for h in recipe.path] == [("a", 0), ("b", 1), ("a", 2), ("a", 2)]
    assert recipe.input_scales == [0.8, 1.2, 0.6, 1.5]


def test_scales_none_fixes_all_scales_to_one():
    sp = space(scales="none")
    recipe = sp.decode([0.5] * sp.T)
    assert recipe.num_hops == sp.max_hops
    assert set(recipe.input_scales) == {1.0}


def test_max_hops_truncates_deterministically():
    sp = space(max_hops=4)
    recipe = sp.decode(genome(sp, {1, 3, 4, 8, 9}))
    # start, the first two kept slots (a1, b0), end
    assert [(h.model, h.layer) for h in recipe.path] == [("a", 0), ("a", 1), ("b", 0), ("a", 2)]
    assert recipe.layout.dropped_hops == 3
    assert space().max_hops == 2 * LA  # default cap
    assert space(max_hops=2).decode(genome(space(max_hops=2), {1, 2})).num_hops == 2


def test_genome_checks():
    sp = space()
    with pytest.raises(ValueError, match="entries"):
        sp.decode(sp.x0[:-1])
    bad = list(sp.x0)
    bad[sp.T] = 5.0
    with pytest.raises(ValueError, match="outside"):
        sp.decode(bad)
    assert sp.describe(sp.x0)["I[c0:a1]"] == 0.5


def test_recipe_yaml_round_trip(tmp_path):
    sp = space()
    recipe = sp.decode(genome(sp, {3, 6}, {0 * 5 + 3: 0.25}))
    text = recipe.to_yaml()
    assert "model_a: A" in text and "scale: 0.25" in text
    assert DFSRecipe.from_yaml(text) == recipe
    path = tmp_path / "r.yaml"
    path.write_text(text)
    assert DFSRecipe.from_yaml(path) == recipe
    assert DFSRecipe.from_yaml(json.loads(json.dumps(recipe.to_yaml_dict()))) == recipe


def test_recipe_bad_input():
    with pytest.raises(ConfigError, match="path"):
        DFSRecipe.from_yaml("model_a: A\nmodel_b: B\npath: []\n")
    with pytest.raises(ConfigError, match="path.0.model"):
        DFSRecipe.from_yaml("model_a: A\nmodel_b: B\npath: [{model: c, layer: 0}]\n")
    with pytest.raises(ConfigError, match="mapping"):
        DFSRecipe.from_yaml("- 1\n")
    recipe = DFSRecipe(model_a="A", model_b="B", path=[DFSHop(model="b", layer=5)])
    with pytest.raises(ConfigError, match="layer 5 of model B"):
        recipe.check_layers(3, 2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"r": 0}, "r >= 1"),
        ({"max_hops": 1}, "max_hops >= 2"),
        ({"indicator_bounds": (0.0, 1.0)}, "contain 0"),
        ({"scale_bounds": (1.0, 1.0)}, "lower < upper"),
        ({"scale_x0": 3.0}, "scale_x0"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        DFSSpaceConfig(model_a="A", model_b="B", **kwargs)


def test_model_a_needs_two_layers():
    with pytest.raises(ConfigError, match="at least 2"):
        DFSSpace(DFSSpaceConfig(model_a="A", model_b="B"), layers_a=1, layers_b=3)


def _config_dir(path: Path, **overrides) -> Path:
    """A model dir holding only config.json (all `from_sources` reads)."""
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 32, "intermediate_size": 64,
           "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 3, "rms_norm_eps": 1e-6}
    cfg.update(overrides)
    path.mkdir()
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def test_from_sources_reads_depths_and_checks_pair(tmp_path):
    a = _config_dir(tmp_path / "a")
    b = _config_dir(tmp_path / "b", num_hidden_layers=2)
    wide = _config_dir(tmp_path / "wide", hidden_size=48)
    sp = DFSSpace.from_sources(DFSSpaceConfig(model_a="A", model_b="B"), {"A": a, "B": b})
    assert (sp.layers_a, sp.layers_b, sp.T) == (3, 2, 15)
    with pytest.raises(SourceError, match="hidden_size"):
        DFSSpace.from_sources(DFSSpaceConfig(model_a="A", model_b="W"), {"A": a, "W": wide})
    with pytest.raises(ConfigError, match="not among the resolved sources"):
        DFSSpace.from_sources(DFSSpaceConfig(model_a="A", model_b="X"), {"A": a})
