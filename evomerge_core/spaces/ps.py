"""Parameter-space (PS) search space: a genome of per-model (optionally per-layer-group)
merge parameters, e.g. the paper's (density, weight) per source for DARE-TIES.

Genome order: for each non-base source (config order), for each evolved parameter, for each
layer group. Values are in the parameters' own units (bounds default [0, 1]), so a genome
reads directly as the recipe it decodes to.

With ``granularity: {layer_groups: N}`` decoder layer i belongs to group ``i * N // L`` (L
layers); the decoded recipe uses mergekit's conditional values (one ``filter: "layers.i."`` per
layer, first match wins) and tensors outside the decoder layers (embeddings, final norm, LM
head) take group 0's value, the position mergekit's layer gradients give them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from evomerge_core.config.schema import LayerGroups, RunConfig
from evomerge_core.errors import ConfigError
from evomerge_core.merge.methods import get_method
from evomerge_core.merge.recipe import ConditionalValue, MergeRecipe, ModelEntry, ParamValue


@dataclass(frozen=True)
class GenomeEntry:
    """One coordinate of the genome."""

    model: str
    param: str
    group: int | None
    lower: float
    upper: float
    x0: float

    @property
    def name(self) -> str:
        """Readable name, e.g. ``org/model:density`` or ``org/model:weight@g2``."""
        suffix = f"@g{self.group}" if self.group is not None else ""
        return f"{self.model}:{self.param}{suffix}"


class PSSpace:
    """Vector <-> MergeRecipe for one merge method over a fixed set of sources."""

    kind = "ps"

    def __init__(
        self,
        *,
        method: str,
        models: Sequence[str],
        base: str | None,
        params: Sequence[str],
        bounds: Mapping[str, tuple[float, float]],
        x0: Mapping[str, float],
        layer_groups: int | None = None,
        num_layers: int | None = None,
        fixed: Mapping[str, ParamValue] | None = None,
        merge_seed: int = 0,
    ) -> None:
        self.method = get_method(method)
        if self.method.needs_base and not base:
            raise ConfigError(f"merge method {method!r} needs a base model; mark one source with base: true")
        if layer_groups is not None:
            if num_layers is None:
                raise ValueError("layer_groups needs the number of decoder layers")
            if layer_groups > num_layers:
                raise ConfigError(
                    f"space.ps.granularity.layer_groups: {layer_groups} groups for {num_layers} layers; use at most {num_layers}"
                )
        self.models = list(models)
        self.base = base if self.method.needs_base else None
        self.params = list(params)
        self.layer_groups = layer_groups
        self.num_layers = num_layers
        self.fixed = dict(fixed or {})
        self.merge_seed = merge_seed
        groups: list[int | None] = list(range(layer_groups)) if layer_groups else [None]
        self.entries: list[GenomeEntry] = [
            GenomeEntry(m, p, g, float(bounds[p][0]), float(bounds[p][1]), float(x0[p]))
            for m in self.models
            for p in self.params
            for g in groups
        ]

    @classmethod
    def from_config(cls, config: RunConfig, *, num_layers: int | None = None) -> PSSpace:
        """The space a run config describes (`num_layers` is needed for layer groups)."""
        ps = config.space.ps
        assert ps is not None, "a PS space needs space.ps"  # the schema fills it for kind 'ps'
        method = get_method(ps.method)
        params = ps.params if ps.params is not None else list(method.model_params)
        base = config.base
        models = [s.model for s in config.sources if not (method.needs_base and s.model == base)]
        groups = ps.granularity.layer_groups if isinstance(ps.granularity, LayerGroups) else None
        fixed = dict(ps.fixed)
        return cls(
            method=ps.method,
            models=models,
            base=base,
            params=params,
            bounds={p: ps.bounds_of(p) for p in params},
            x0={p: ps.x0_of(p) for p in params},
            layer_groups=groups,
            num_layers=num_layers,
            fixed=fixed,
            merge_seed=ps.merge_seed,
        )

    # ------------------------------------------------------------------ genome geometry

    @property
    def dim(self) -> int:
        """Number of genome entries."""
        return len(self.entries)

    @property
    def names(self) -> list[str]:
        """Names of the genome entries, in order."""
        return [e.name for e in self.entries]

    @property
    def lower(self) -> list[float]:
        """Lower bounds, per entry."""
        return [e.lower for e in self.entries]

    @property
    def upper(self) -> list[float]:
        """Upper bounds, per entry."""
        return [e.upper for e in self.entries]

    @property
    def x0(self) -> list[float]:
        """The initial point, per entry."""
        return [e.x0 for e in self.entries]

    def describe(self, genome: Sequence[float]) -> dict[str, float]:
        """``{entry name: value}`` for a genome."""
        self._check(genome)
        return {e.name: float(v) for e, v in zip(self.entries, genome)}

    def _check(self, genome: Sequence[float]) -> None:
        if len(genome) != self.dim:
            raise ValueError(f"genome has {len(genome)} entries; this space has {self.dim}")
        for e, v in zip(self.entries, genome):
            if not e.lower - 1e-12 <= float(v) <= e.upper + 1e-12:
                raise ValueError(f"genome entry {e.name} = {v} lies outside [{e.lower}, {e.upper}]")

    def group_of_layer(self, layer: int) -> int:
        """The layer group of decoder layer `layer`."""
        assert self.layer_groups is not None and self.num_layers is not None
        return layer * self.layer_groups // self.num_layers

    # ------------------------------------------------------------------ decode / encode

    def decode(self, genome: Sequence[float]) -> MergeRecipe:
        """The merge recipe a genome stands for."""
        self._check(genome)
        values: dict[tuple[str, str], list[float]] = {}
        for e, v in zip(self.entries, genome):
            values.setdefault((e.model, e.param), []).append(float(v))
        models = []
        for m in self.models:
            params: dict[str, ParamValue] = {}
            for p in self.params:
                params[p] = self._param_value(values[(m, p)])
            models.append(ModelEntry(model=m, parameters=params))
        return MergeRecipe(
            merge_method=self.method.name,
            base_model=self.base,
            models=models,
            parameters=dict(self.fixed),
            seed=self.merge_seed,
        )

    def _param_value(self, group_values: list[float]) -> ParamValue:
        if self.layer_groups is None:
            return group_values[0]
        assert self.num_layers is not None
        conds = [
            ConditionalValue(filter=f"layers.{i}.", value=group_values[self.group_of_layer(i)])
            for i in range(self.num_layers)
        ]
        conds.append(ConditionalValue(filter=None, value=group_values[0]))
        return conds

    def encode(self, values: Mapping[str, float]) -> list[float]:
        """A genome from ``{entry name: value}`` (all entries required)."""
        missing = [n for n in self.names if n not in values]
        if missing:
            raise ValueError(f"no value for genome entry {missing[0]}")
        genome = [float(values[n]) for n in self.names]
        self._check(genome)
        return genome

    def summary(self) -> dict[str, Any]:
        """JSON-able description of the space (stored with each run)."""
        return {
            "kind": self.kind,
            "method": self.method.name,
            "base": self.base,
            "models": self.models,
            "params": self.params,
            "layer_groups": self.layer_groups,
            "num_layers": self.num_layers,
            "names": self.names,
            "lower": self.lower,
            "upper": self.upper,
            "x0": self.x0,
        }
