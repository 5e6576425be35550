"""Search spaces: decode an optimizer's vector into a recipe (``ps``: a merge recipe,
``dfs``: a layer path through two models)."""

from __future__ import annotations

from typing import Union

from evomerge_core.config.dfs_space import DFSSpaceConfig
from evomerge_core.config.schema import LayerGroups, RunConfig
from evomerge_core.errors import ConfigError
from evomerge_core.spaces.dfs import DFSRecipe, DFSSpace
from evomerge_core.spaces.ps import GenomeEntry, PSSpace

SearchSpace = Union[PSSpace, DFSSpace]


def build_space(config: RunConfig, *, num_layers: int | None = None, num_layers_b: int | None = None) -> SearchSpace:
    """The search space of a run config.

    PS: `num_layers` of the sources (needed for layer groups). DFS: `num_layers` of model A
    and `num_layers_b` of model B (both required).
    """
    if config.space.kind == "dfs":
        if num_layers is None or num_layers_b is None:
            raise ConfigError("a DFS space needs the layer counts of model A and model B; resolve the sources first")
        assert config.space.dfs is not None, "a DFS space needs space.dfs"  # the schema requires it for kind 'dfs'
        return DFSSpace(config.space.dfs, layers_a=num_layers, layers_b=num_layers_b)
    return PSSpace.from_config(config, num_layers=num_layers)


def needs_num_layers(config: RunConfig) -> bool:
    """True when the space needs the sources' layer count before it can be built."""
    if config.space.kind == "dfs":
        return True
    assert config.space.ps is not None, "a PS space needs space.ps"
    return isinstance(config.space.ps.granularity, LayerGroups)


__all__ = ["DFSRecipe", "DFSSpace", "DFSSpaceConfig", "GenomeEntry", "PSSpace", "SearchSpace", "build_space", "needs_num_layers"]
