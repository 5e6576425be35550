"""Typed records of an evolve run: one evaluated candidate, one generation's summary, the result.

Each record is a dataclass with typed fields for what the code reads, and it writes back exactly
the JSON it was read from: `from_dict` remembers which keys the dict had and in what order, and
keys this module does not name (a scorer's or a run kind's own) are kept in `extra`. So the run
store's documents (generations, candidates, result.json) and their checksums are unchanged, and
older run stores still resume.

Records are also read-only mappings of their JSON form (``record["fitness"]``,
``record.get("error")``, ``{**record}``), for consumers that still take dicts (the monitor, the
report, the budget's planning).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # typing.Self is 3.11+; the project supports 3.10
    from typing_extensions import Self


@dataclass(eq=False, kw_only=True)
class _Record(Mapping[str, Any]):
    """A typed record that round-trips its dict form (keys, order and values)."""

    # Keys written even when None (the evaluator always writes them); other fields only when set.
    _ALWAYS: ClassVar[tuple[str, ...]] = ()

    extra: dict[str, Any] = field(default_factory=dict, repr=False)
    _keys: tuple[str, ...] = field(default=(), repr=False, compare=False)

    @classmethod
    def _names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in ("extra", "_keys"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """The record of a dict (as written by the run store or built by the evaluator)."""
        if isinstance(data, cls):
            return data
        names = set(cls._names())
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        return cls(**known, extra=extra, _keys=tuple(data))

    @classmethod
    def from_json(cls, text: str | bytes) -> Self:
        """The record of a JSON document."""
        return cls.from_dict(json.loads(text))

    def _order(self) -> tuple[str, ...]:
        if self._keys:
            return self._keys
        return tuple(n for n in self._names() if n in self._ALWAYS or getattr(self, n) is not None) + tuple(self.extra)

    def to_dict(self) -> dict[str, Any]:
        """The dict form: the keys it was read with, in their order (new records: the set fields)."""
        names = set(self._names())
        return {k: getattr(self, k) if k in names else self.extra[k] for k in self._order()}

    def to_json(self) -> str:
        """`json.dumps` of the dict form (the run store writes it with sorted keys and a checksum)."""
        return json.dumps(self.to_dict())

    def replace(self, **changes: Any) -> Self:
        """A copy with `changes`; new keys are added at the end, as ``{**record, key: value}`` would."""
        names = set(self._names())
        order = self._order()
        extra = dict(self.extra)
        fields = {k: v for k, v in changes.items() if k in names}
        extra.update({k: v for k, v in changes.items() if k not in names})
        keys = order + tuple(k for k in changes if k not in order)
        return dataclasses.replace(self, **fields, extra=extra, _keys=keys)

    # Mapping: the dict form, read-only.
    def __getitem__(self, key: str) -> Any:
        if key not in self._order():
            raise KeyError(key)
        return getattr(self, key) if key in set(self._names()) else self.extra[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._order())

    def __len__(self) -> int:
        return len(self._order())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return self.to_dict() == dict(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable, like the dict it stands for


# The record index of the CMA-ES distribution's mean, scored in the final check
# (`fitness.budget.final_mean`); its generation is the last one.
MEAN_INDEX = -1


def best_label(generation: int, index: int | None) -> str:
    """How a report or card names the run's best: a candidate, or the CMA-ES mean."""
    if index == MEAN_INDEX:
        return f"the CMA-ES mean after generation {generation + 1}"
    return f"generation {generation + 1}, candidate {index}"


@dataclass(eq=False, kw_only=True)
class CandidateRecord(_Record):
    """One evaluated candidate (``generations/{g}.json`` ``candidates``, ``candidates/{key}.json``).

    `fitness` is what the optimizer was told (the scorer's worst for a failed candidate);
    `estimate` and `raced_out` are set by `fitness.budget`; `validation` is the validation
    summary of a generation's best under `fitness.selection: validation`.
    """

    _ALWAYS: ClassVar[tuple[str, ...]] = (
        "generation", "index", "genome", "values", "recipe", "fitness", "accuracy", "metrics", "n_items",
        "items_evaluated", "generated_tokens", "seconds", "error")

    generation: int = 0
    index: int = 0
    genome: list[float] = field(default_factory=list)
    values: Any = None  # the space's readable description of the genome
    recipe: dict[str, Any] | None = None
    fitness: float | None = None
    accuracy: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    n_items: int | None = None
    items_evaluated: int | None = None
    generated_tokens: int | None = None
    seconds: float | None = None
    error: str | None = None
    traceback: str | None = None
    split: str | None = None
    estimate: float | None = None
    raced_out: int | None = None
    budgeted_fitness: float | None = None
    validation: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        """Whether it succeeded: no error and a finite fitness."""
        return self.error is None and self.fitness is not None and math.isfinite(self.fitness)

    def at(self, generation: int, index: int) -> CandidateRecord:
        """The record placed at `generation`/`index` (a stored evaluation reused in another slot)."""
        return self.replace(generation=generation, index=index)


@dataclass(eq=False, kw_only=True)
class GenerationSummary(_Record):
    """One generation's summary (``generations/{g}.json`` ``summary``; result.json ``generations``)."""

    _ALWAYS: ClassVar[tuple[str, ...]] = (
        "generation", "best_fitness", "best_index", "mean_fitness", "best_accuracy", "mean_accuracy", "failed",
        "candidates", "seconds")

    generation: int = 0
    best_fitness: float | None = None
    best_index: int | None = None
    mean_fitness: float | None = None
    best_accuracy: float | None = None
    mean_accuracy: float | None = None
    failed: int = 0
    candidates: int = 0
    seconds: float = 0.0
    validation: dict[str, Any] | None = None


@dataclass(eq=False, kw_only=True)
class RunResult(_Record):
    """The content of ``result.json``: the best candidate, the generations, the history and the
    cost (with `fitness.budget` a ``budget`` section, for a chained run ``stages`` and
    ``lineage``, both kept in `extra`)."""

    _ALWAYS: ClassVar[tuple[str, ...]] = (
        "run_key", "config_hash", "best_fitness", "best_accuracy", "best_genome", "best_values", "best_recipe",
        "best_generation", "best_index", "selection", "best_validation", "evaluations", "cost", "space",
        "generations", "test", "best_model", "history")

    run_key: str = ""
    config_hash: str = ""
    best_fitness: float | None = None
    best_accuracy: float | None = None
    best_genome: list[float] = field(default_factory=list)
    best_values: Any = None
    best_recipe: dict[str, Any] | None = None
    best_generation: int | None = None
    best_index: int | None = None
    selection: str | None = None
    best_validation: dict[str, Any] | None = None
    evaluations: int = 0
    cost: dict[str, int] = field(default_factory=dict)
    space: dict[str, Any] = field(default_factory=dict)
    generations: list[dict[str, Any]] = field(default_factory=list)
    test: dict[str, Any] | None = None
    best_model: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
