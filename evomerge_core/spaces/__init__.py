"""Search spaces: decode an optimizer's vector into a merge recipe (``ps`` for now)."""

from __future__ import annotations

from evomerge_core.config import LayerGroups, RunConfig
from evomerge_core.spaces.ps import GenomeEntry, PSSpace


def build_space(config: RunConfig, *, num_layers: int | None = None) -> PSSpace:
    """The search space of a run config (`num_layers` of the sources for layer groups)."""
    return PSSpace.from_config(config, num_layers=num_layers)


def needs_num_layers(config: RunConfig) -> bool:
    """True when the space needs the sources' layer count before it can be built."""
    return isinstance(config.space.ps.granularity, LayerGroups)


__all__ = ["GenomeEntry", "PSSpace", "build_space", "needs_num_layers"]
