"""What a budgeted generation evaluates, and the budget state a checkpoint carries.

- Calibration generations (the first `calibration_generations`, when a subset or length caps
  are set) score every candidate on every train item, without racing; their per-item results
  (and the sources', with `subset.include_sources`) fit the item model, the subset and the caps
  at the end of the last one.
- Later generations score the subset (most informative items first), or without a subset all
  items in a seeded order of (seed, generation), in racing rounds of `racing.slice` items.

The state (calibration results, item model, subset, caps, the sources' cost) is JSON and goes
into every generation record, so a resumed run continues with the same subset and caps.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from typing import Any

from evomerge_core.fitness.budget import irt
from evomerge_core.fitness.budget.config import BudgetConfig
from evomerge_core.fitness.budget.racing import told_fitness
from evomerge_core.errors import ConfigError


@dataclass
class BudgetState:
    """The run's budget state after a generation (see module docstring)."""

    n_items: int
    calibration: list[list[float]] = field(default_factory=list)  # per-item values, one row per model
    needed: list[list[int]] = field(default_factory=list)  # tokens per item, same rows
    item_model: dict[str, Any] | None = None
    subset: list[int] | None = None
    caps: list[int] | None = None
    weights: list[float] | None = None  # subset.method anchors: each subset item's weight (sum 1)
    sources: dict[str, Any] = field(default_factory=dict)  # {"items_evaluated", "generated_tokens", "fitness"}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BudgetState:
        return cls(**data)

    @property
    def calibrated(self) -> bool:
        return self.subset is not None or self.caps is not None


def is_calibration(budget: BudgetConfig, generation: int) -> bool:
    """Whether `generation` is scored on every item to calibrate the subset / the caps."""
    return budget.calibrates and generation < budget.calibration_generations


def generation_items(budget: BudgetConfig, state: BudgetState, generation: int, seed: int) -> list[int]:
    """The items a generation's candidates are scored on, in the order the rounds take them."""
    if is_calibration(budget, generation) or (budget.subset is None and budget.racing is None):
        return list(range(state.n_items))
    if budget.subset is not None:
        if state.subset is None:
            raise RuntimeError("the item subset was not chosen: the calibration generations are missing")
        return list(state.subset)
    rng = random.Random(f"evomerge-racing-order:{seed}:{generation}")
    order = list(range(state.n_items))
    rng.shuffle(order)
    limit = budget.racing.max_items if budget.racing is not None else None  # racing is set here (see above)
    return order[:limit] if limit is not None else order


def rounds_of(budget: BudgetConfig, generation: int, items: list[int]) -> list[list[int]]:
    """The items of each racing round (one round without racing or in calibration)."""
    if budget.racing is None or is_calibration(budget, generation):
        return [items]
    size = budget.racing.slice
    return [items[i : i + size] for i in range(0, len(items), size)]


def caps_for(state: BudgetState, items: list[int]) -> list[int] | None:
    """The per-item `max_new_tokens` of `items` (None before the caps are set)."""
    return None if state.caps is None else [state.caps[j] for j in items]


def calibrate(budget: BudgetConfig, state: BudgetState, *, seed: int, max_new_tokens: int) -> None:
    """Fit the item model, choose the subset and set the caps from the calibration rows."""
    if not state.calibration:
        raise RuntimeError("no calibration results: every calibration candidate failed")
    if budget.subset is not None:
        size = budget.subset.size
        if size > state.n_items:
            raise ConfigError(f"fitness.budget.subset.size is {size} but fitness.dataset has only {state.n_items} "
                              "items; lower the size")
        model = irt.fit(state.calibration)
        state.item_model = model.to_dict()
        if budget.subset.method == "anchors":
            state.subset, state.weights = irt.anchor_items(state.calibration, size)
        elif budget.subset.method == "irt":
            mean, std = model.scale
            thetas = [((sum(r) / len(r)) - mean) / std if std > 0 else 0.0 for r in state.calibration]
            state.subset = irt.select_items(model, thetas, size)
        else:
            state.subset = sorted(random.Random(f"evomerge-subset:{seed}").sample(range(state.n_items), size))
    if budget.length_caps is not None:
        caps = budget.length_caps
        state.caps = []
        for j in range(state.n_items):
            most = max(row[j] for row in state.needed)
            cap = max_new_tokens if most >= max_new_tokens else math.ceil(caps.margin * most) + caps.extra
            state.caps.append(max(1, min(max_new_tokens, cap)))


def item_weights(state: BudgetState) -> dict[int, float]:
    """Racing compares candidates on weight * value per item: the anchors' weights scaled to
    mean 1 (every item 1 for the other subsets)."""
    if state.weights is None or state.subset is None:
        return {}
    k = len(state.subset)
    return {j: w * k for j, w in zip(state.subset, state.weights)}


def estimate(budget: BudgetConfig, state: BudgetState, items: list[int], values: list[float]) -> float:
    """A candidate's full-set estimate from its values on `items`."""
    if state.weights is not None and len(items) < state.n_items:  # anchors: weighted mean of the seen ones
        w = item_weights(state)
        return sum(w[j] * v for j, v in zip(items, values)) / sum(w[j] for j in items)
    if state.item_model is not None and budget.subset is not None and budget.subset.method == "irt" \
            and len(items) < state.n_items:
        return irt.estimate(irt.ItemModel.from_dict(state.item_model), items, values)
    return sum(values) / len(values)


def finish_generation(budget: BudgetConfig, state: BudgetState, generation: int, base: list[dict[str, Any]],
                      results: dict[int, list[dict[str, Any]]], stopped_at: dict[int, int], worst: float) -> list[dict[str, Any]]:
    """The generation's candidate records from its round results: fitness told to CMA-ES,
    estimate, items evaluated, generated tokens, the round a candidate stopped after; in
    calibration generations the per-item results are added to the state."""
    estimates, failed, records = {}, {}, []
    for rec in base:
        i = rec["index"]
        rounds = results[i]
        items = [j for r in rounds for j in r["items"]]
        values = [v for r in rounds for v in r["scores"]]
        tokens = [t for r in rounds for t in r["tokens"]]
        error = next((r["error"] for r in rounds if r.get("error")), None)
        if error is not None:
            failed[i] = worst
        else:
            estimates[i] = estimate(budget, state, items, values)
            if is_calibration(budget, generation):
                state.calibration.append(values)
                state.needed.append(tokens)
        first = rounds[0] if rounds else {}
        records.append({**rec, "values": first.get("values"), "recipe": first.get("recipe"), "error": error,
                        "n_items": len(items), "items_evaluated": len(items), "generated_tokens": sum(tokens),
                        "seconds": round(sum(r.get("seconds") or 0.0 for r in rounds), 4),
                        "estimate": estimates.get(i), "raced_out": stopped_at.get(i) if error is None else None})
    told = told_fitness(estimates, {i for i in stopped_at if i not in failed}, failed)
    for r in records:
        r["fitness"] = told[r["index"]]
    return records


def draws_per_generation(fitness: Any) -> bool:
    """Whether generations are scored on different items (fresh racing draws or
    `fitness.minibatch`): estimates then compare only within a generation."""
    budget = fitness.budget
    fresh = budget is not None and budget.subset is None and budget.racing is not None \
        and budget.racing.max_items is not None
    return fresh or fitness.minibatch is not None


def final_candidates(fitness: Any, eligible: list[Any]) -> list[Any]:
    """The records the final check scores on the full train split (see BudgetConfig)."""
    count = fitness.budget.final_candidates
    if not draws_per_generation(fitness):
        return sorted(eligible, key=lambda r: (-r.fitness, r.generation, r.index))[:count]
    generations = sorted({r.generation for r in eligible})[-count:]
    return [max((r for r in eligible if r.generation == g), key=lambda r: (r.fitness, -r.index))
            for g in generations]


def final_rounds(n_items: int, slice_: int, seed: int) -> list[list[int]]:
    """The raced final check's rounds: every train item once, in a seeded order."""
    order = list(range(n_items))
    random.Random(f"evomerge-final-order:{seed}").shuffle(order)
    return [order[i : i + slice_] for i in range(0, n_items, slice_)]
