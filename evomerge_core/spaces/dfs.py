"""Data-flow-space (DFS) search space: which layers of models A and B a token passes
through, in which order, and with which input scales (Akiba et al. 2025, section 3.2).

Layout. A has ``La`` decoder layers, B has ``Lb``; ``M = La + Lb``. Global layer index ``g``
is ``g = l`` for A's layer ``l`` and ``g = La + l`` for B's layer ``l``. The slot sequence is
that layer sequence repeated ``r`` times: ``T = M * r`` slots, slot ``t`` holding global layer
``t % M`` in cycle ``t // M``.

Genome (in this order):
- ``I`` (T values): slot ``t`` is kept when ``I[t] > 0``.
- scales, by ``scales`` mode:
  ``matrix``: ``W`` (M*M values, row-major): the hop entering layer ``j`` from layer ``i``
  has scale ``W[i, j]``; the first hop (from the embeddings) has scale 1.
  ``vector``: T + 2 values: the first hop's scale, one per slot (the hop entering that slot),
  and the last hop's scale.
  ``none``: no scale genes; every scale is 1 (the paper's ablation).

Path. A's first layer starts the path and A's last layer ends it; in between come the kept
slots in slot order. A path longer than ``max_hops`` is *truncated* deterministically: the
start, the first ``max_hops - 2`` kept slots, then the end (the recipe records how many kept
slots were dropped). The initial point keeps exactly A's first-cycle interior slots
(A's layers 1 .. La-2), so ``x0`` decodes to model A itself.

What a scale means (see docs/dfs.md): the scale of hop k multiplies the previous hop's
feed-forward (MLP) output, for the first hop the embeddings, before it joins the residual
stream, which is what the paper's released model does with vLLM's separate residual.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from evomerge_core.config.dfs_space import DFSSpaceConfig, ScaleMode
from evomerge_core.errors import ConfigError
from evomerge_core.io.model_files import read_config
from evomerge_core.sources.decoder_families import check_pair

class DFSHop(BaseModel):
    """One hop of a path: a decoder layer of model ``a`` or ``b`` and its input scale."""

    model_config = ConfigDict(extra="forbid")
    model: Literal["a", "b"]
    layer: int = Field(ge=0)
    scale: float = 1.0


class DFSLayout(BaseModel):
    """How the genome that produced a recipe was laid out (informational, kept for provenance)."""

    model_config = ConfigDict(extra="forbid")
    layers_a: int
    layers_b: int
    r: int
    scales: ScaleMode
    max_hops: int
    dropped_hops: int = 0  # kept slots cut by the max_hops cap


class DFSRecipe(BaseModel):
    """A complete DFS merge: the layer path through A and B with one input scale per hop."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["dfs"] = "dfs"
    model_a: str
    model_b: str
    path: list[DFSHop]
    layout: DFSLayout | None = None
    dtype: str | None = None

    @model_validator(mode="after")
    def _check(self) -> DFSRecipe:
        if not self.path:
            raise ConfigError("a DFS recipe needs a non-empty path; list at least one hop")
        if self.layout is not None:
            self.check_layers(self.layout.layers_a, self.layout.layers_b)
        return self

    def check_layers(self, layers_a: int, layers_b: int) -> None:
        """ConfigError when a hop names a layer the models do not have."""
        for k, hop in enumerate(self.path):
            n = layers_a if hop.model == "a" else layers_b
            if hop.layer >= n:
                raise ConfigError(f"DFS path hop {k} uses layer {hop.layer} of model {hop.model.upper()}, which has only {n} layers; fix the recipe")

    @property
    def num_hops(self) -> int:
        """Number of hops (= decoder layers of the materialised model)."""
        return len(self.path)

    @property
    def input_scales(self) -> list[float]:
        """One scale per hop (the released model's ``input_scales``)."""
        return [h.scale for h in self.path]

    def input_layers(self, layers_a: int | None = None) -> list[int]:
        """Global layer index per hop (the released model's ``input_layers``): A's layer l is l,
        B's layer l is ``layers_a + l``."""
        if layers_a is None:
            if self.layout is None:
                raise ValueError("input_layers needs layers_a when the recipe has no layout")
            layers_a = self.layout.layers_a
        return [h.layer if h.model == "a" else layers_a + h.layer for h in self.path]

    @classmethod
    def identity(cls, model_a: str, model_b: str, layers_a: int) -> DFSRecipe:
        """The path that is model A itself: each of A's layers once, all scales 1."""
        return cls(model_a=model_a, model_b=model_b, path=[DFSHop(model="a", layer=i) for i in range(layers_a)])

    def to_yaml_dict(self) -> dict[str, Any]:
        """A plain, JSON-able dict (the YAML form)."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        """The recipe as YAML text."""
        return yaml.safe_dump(self.to_yaml_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, source: str | Path | Mapping[str, Any]) -> DFSRecipe:
        """Read a recipe from YAML text, a YAML file path or an already-parsed mapping."""
        if isinstance(source, Mapping):
            data: Any = dict(source)
        else:
            if isinstance(source, Path):
                try:
                    source = source.read_text()
                except OSError as exc:
                    raise ConfigError(f"cannot read DFS recipe {source}: {exc.strerror}; check the path") from None
            try:
                data = yaml.safe_load(source)
            except yaml.YAMLError as exc:
                raise ConfigError(f"DFS recipe is not valid YAML ({exc}); fix the file") from None
        if not isinstance(data, dict):
            raise ConfigError("a DFS recipe must be a YAML mapping with model_a, model_b and path")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err["loc"]) or "recipe"
            raise ConfigError(f"DFS recipe field {loc}: {err['msg']}; fix the recipe") from None


@dataclass(frozen=True)
class Slot:
    """One slot of the repeated layer sequence."""

    index: int
    cycle: int
    model: Literal["a", "b"]
    layer: int
    global_layer: int

    @property
    def name(self) -> str:
        return f"c{self.cycle}:{self.model}{self.layer}"


class DFSSpace:
    """Vector <-> DFSRecipe for a pair of models A (``layers_a`` layers) and B (``layers_b``)."""

    kind = "dfs"

    def __init__(self, config: DFSSpaceConfig, *, layers_a: int, layers_b: int) -> None:
        if layers_a < 2:
            raise ConfigError(f"model A ({config.model_a}) has {layers_a} decoder layer(s); DFS fixes A's first and "
                              "last layer as the path's ends, so A needs at least 2")
        if layers_b < 1:
            raise ConfigError(f"model B ({config.model_b}) has no decoder layers; choose a decoder model")
        self.config = config
        self.layers_a = layers_a
        self.layers_b = layers_b
        self.M = layers_a + layers_b
        self.T = self.M * config.r
        self.max_hops = config.max_hops if config.max_hops is not None else 2 * layers_a
        self.slots = [self._slot(t) for t in range(self.T)]
        names: list[str] = [f"I[{s.name}]" for s in self.slots]
        lower = [config.indicator_bounds[0]] * self.T
        upper = [config.indicator_bounds[1]] * self.T
        x0 = [
            config.indicator_x0_on if (s.cycle == 0 and s.model == "a" and 0 < s.layer < layers_a - 1) else config.indicator_x0_off
            for s in self.slots
        ]
        if config.scales == "matrix":
            labels = [self._label(g) for g in range(self.M)]
            names += [f"W[{i}->{j}]" for i in labels for j in labels]
        elif config.scales == "vector":
            names += ["S[start]"] + [f"S[{s.name}]" for s in self.slots] + ["S[end]"]
        n_scales = len(names) - self.T
        lower += [config.scale_bounds[0]] * n_scales
        upper += [config.scale_bounds[1]] * n_scales
        x0 += [config.scale_x0] * n_scales
        self.names, self.lower, self.upper, self.x0 = names, lower, upper, x0

    @classmethod
    def from_sources(cls, config: DFSSpaceConfig, sources: Mapping[str, str | Path]) -> DFSSpace:
        """The space for resolved sources (``{ref: local dir}``): checks that A and B can be
        combined (same layer shapes, a supported decoder family) and reads their depths."""
        for ref in (config.model_a, config.model_b):
            if ref not in sources:
                raise ConfigError(f"space.dfs model {ref!r} is not among the resolved sources; list it under sources")
        cfg_a = read_config(Path(sources[config.model_a]))
        cfg_b = read_config(Path(sources[config.model_b]))
        check_pair(cfg_a, cfg_b, name_a=config.model_a, name_b=config.model_b)
        return cls(config, layers_a=int(cfg_a["num_hidden_layers"]), layers_b=int(cfg_b["num_hidden_layers"]))

    def _slot(self, t: int) -> Slot:
        g = t % self.M
        model: Literal["a", "b"] = "a" if g < self.layers_a else "b"
        layer = g if model == "a" else g - self.layers_a
        return Slot(t, t // self.M, model, layer, g)

    def _label(self, g: int) -> str:
        return f"a{g}" if g < self.layers_a else f"b{g - self.layers_a}"

    # ------------------------------------------------------------------ genome geometry

    @property
    def dim(self) -> int:
        """Number of genome entries."""
        return len(self.names)

    def describe(self, genome: Sequence[float]) -> dict[str, float]:
        """``{entry name: value}`` for a genome."""
        self._check(genome)
        return {n: float(v) for n, v in zip(self.names, genome)}

    def _check(self, genome: Sequence[float]) -> None:
        if len(genome) != self.dim:
            raise ValueError(f"genome has {len(genome)} entries; this DFS space has {self.dim}")
        for name, lo, hi, v in zip(self.names, self.lower, self.upper, genome):
            if not lo - 1e-12 <= float(v) <= hi + 1e-12:
                raise ValueError(f"genome entry {name} = {v} lies outside [{lo}, {hi}]")

    # ------------------------------------------------------------------ decode

    def decode(self, genome: Sequence[float]) -> DFSRecipe:
        """The recipe a genome stands for (truncated to ``max_hops``, see the module doc)."""
        self._check(genome)
        values = [float(v) for v in genome]
        kept = [s for s in self.slots if values[s.index] > 0]
        room = self.max_hops - 2
        dropped = max(0, len(kept) - room)
        kept = kept[:room]
        start = Slot(-1, 0, "a", 0, 0)
        end = Slot(-2, 0, "a", self.layers_a - 1, self.layers_a - 1)
        nodes = [start, *kept, end]
        scales = self._scales(values[self.T :], nodes)
        path = [DFSHop(model=n.model, layer=n.layer, scale=s) for n, s in zip(nodes, scales)]
        layout = DFSLayout(
            layers_a=self.layers_a, layers_b=self.layers_b, r=self.config.r,
            scales=self.config.scales, max_hops=self.max_hops, dropped_hops=dropped,
        )
        return DFSRecipe(model_a=self.config.model_a, model_b=self.config.model_b, path=path, layout=layout)

    def _scales(self, genes: list[float], nodes: list[Slot]) -> list[float]:
        mode = self.config.scales
        if mode == "none":
            return [1.0] * len(nodes)
        if mode == "matrix":
            return [1.0] + [genes[prev.global_layer * self.M + cur.global_layer] for prev, cur in zip(nodes, nodes[1:])]
        # vector: genes = [start, slot_0 .. slot_{T-1}, end]
        out = [genes[0]]
        out += [genes[1 + n.index] for n in nodes[1:-1]]
        out.append(genes[self.T + 1])
        return out

    def summary(self) -> dict[str, Any]:
        """JSON-able description of the space (stored with each run)."""
        return {
            "kind": self.kind,
            "model_a": self.config.model_a,
            "model_b": self.config.model_b,
            "layers_a": self.layers_a,
            "layers_b": self.layers_b,
            "r": self.config.r,
            "slots": self.T,
            "scales": self.config.scales,
            "max_hops": self.max_hops,
            "names": self.names,
            "lower": self.lower,
            "upper": self.upper,
            "x0": self.x0,
        }
