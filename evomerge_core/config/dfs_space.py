"""The settings of a DFS search (``space.dfs`` in a run config); the space itself is
`evomerge_core.spaces.dfs`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator

from evomerge_core.errors import ConfigError

ScaleMode = Literal["matrix", "vector", "none"]


class DFSSpaceConfig(BaseModel):
    """Settings of a DFS search (``space.dfs`` in a run config)."""

    model_config = ConfigDict(extra="forbid")
    model_a: str  # supplies embeddings, final norm, LM head, tokenizer, first and last layer
    model_b: str
    r: int = 3
    scales: ScaleMode = "matrix"
    max_hops: int | None = None  # None: 2 x the layers of A
    indicator_bounds: tuple[float, float] = (-1.0, 1.0)
    indicator_x0_on: float = 0.5
    indicator_x0_off: float = -0.5
    scale_bounds: tuple[float, float] = (0.0, 2.0)
    scale_x0: float = 1.0

    @model_validator(mode="after")
    def _check(self) -> DFSSpaceConfig:
        # ConfigError is not a ValueError, so pydantic lets it through unchanged.
        if self.r < 1:
            raise ConfigError(f"space.dfs.r is {self.r}; the layer sequence must be repeated at least once, set r >= 1")
        if self.max_hops is not None and self.max_hops < 2:
            raise ConfigError(f"space.dfs.max_hops is {self.max_hops}; a path holds at least A's first and last layer, set max_hops >= 2")
        lo, hi = self.indicator_bounds
        if not lo < 0 < hi:
            raise ConfigError(f"space.dfs.indicator_bounds {list(self.indicator_bounds)} must contain 0 strictly inside "
                              "(a slot is kept when its value is > 0); use e.g. [-1, 1]")
        for name in ("indicator_x0_on", "indicator_x0_off"):
            v = getattr(self, name)
            if not lo <= v <= hi:
                raise ConfigError(f"space.dfs.{name} = {v} lies outside indicator_bounds {list(self.indicator_bounds)}; move it inside")
        if not self.indicator_x0_on > 0 >= self.indicator_x0_off:
            raise ConfigError("space.dfs.indicator_x0_on must be > 0 and indicator_x0_off <= 0 so that x0 keeps exactly A's layers")
        slo, shi = self.scale_bounds
        if not slo < shi:
            raise ConfigError(f"space.dfs.scale_bounds {list(self.scale_bounds)} must have lower < upper")
        if not slo <= self.scale_x0 <= shi:
            raise ConfigError(f"space.dfs.scale_x0 = {self.scale_x0} lies outside scale_bounds {list(self.scale_bounds)}; move it inside")
        return self
