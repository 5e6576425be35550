"""A merge recipe: what to merge and how. The schema is mergekit's YAML schema (a superset of
the parts we support), so a mergekit config *is* a recipe. Parameter values may be

- a scalar (applies everywhere),
- a list of numbers (a gradient interpolated over the decoder layers, as mergekit does),
- a list of ``{filter: str|None, value: ...}`` (first filter that is a substring of the
  tensor name wins; ``filter: null`` is the fallback).

Models are referred to by the string given in ``model`` (a Hub id ``org/name[@rev]``, a local
directory or an fsspec URL); sources are resolved to local snapshots separately.
"""

from __future__ import annotations

from typing import Any, Union

from pydantic import BaseModel, ConfigDict, Field

Scalar = Union[float, int, bool, str]


class ConditionalValue(BaseModel):
    """A parameter value that applies to tensors whose name contains `filter`."""

    model_config = ConfigDict(extra="forbid")
    filter: str | None = None
    value: Union[Scalar, list[float]]


ParamValue = Union[Scalar, list[float], list[ConditionalValue]]


class ModelEntry(BaseModel):
    """One source model in a recipe and its per-model parameters (weight, density, ...)."""

    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: dict[str, ParamValue] = Field(default_factory=dict)


class MergeRecipe(BaseModel):
    """A complete, self-contained description of one merge."""

    model_config = ConfigDict(extra="forbid")
    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] = Field(default_factory=list)
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    # Seed for stochastic methods (DARE). Each tensor draws from its own generator derived
    # from (seed, tensor name, model index), so results do not depend on tensor order.
    seed: int = 0

    def model_names(self) -> list[str]:
        """All distinct model references, base first when there is one."""
        names: list[str] = []
        if self.base_model:
            names.append(self.base_model)
        for entry in self.models:
            if entry.model not in names:
                names.append(entry.model)
        return names

    def to_yaml_dict(self) -> dict[str, Any]:
        """A plain dict suitable for YAML (mergekit-compatible keys, defaults omitted)."""
        return self.model_dump(exclude_defaults=True, mode="json")
