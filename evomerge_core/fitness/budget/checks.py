"""Config-time checks of `fitness.budget` (ConfigError naming the problem and the fix)."""

from __future__ import annotations

from typing import Any

from evomerge_core.config.run_kind import kind_name
from evomerge_core.errors import ConfigError
from evomerge_core.fitness.registry import get_scorer


def check_budget(fitness: Any) -> None:
    """The budget fits the rest of the fitness section."""
    budget = fitness.budget
    if fitness.dataset is None:
        raise ConfigError("fitness.budget needs fitness.dataset (the train items it scores); add one or remove budget")
    if fitness.selection != "train":
        raise ConfigError("fitness.budget chooses the run's best on the full train split; use fitness.selection: "
                          "train or remove budget")
    items_level = budget.racing is not None or budget.subset is not None or budget.length_caps is not None
    if items_level and fitness.minibatch is not None:
        raise ConfigError("fitness.budget racing/subset/length_caps pick the items themselves; remove "
                          "fitness.minibatch (keep budget.final_candidates alone to use it with minibatches)")
    if items_level and get_scorer(fitness.scorer).per_item is None:
        raise ConfigError(f"fitness.budget racing/subset/length_caps need per-item values, which scorer "
                          f"{fitness.scorer!r} does not give; use math_accuracy, exact_match or logprob, or "
                          "give your scorer a per_item function")
    if budget.final_racing is not None and get_scorer(fitness.scorer).per_item is None:
        raise ConfigError(f"fitness.budget.final_racing compares per-item values, which scorer {fitness.scorer!r} "
                          "does not give; remove final_racing or use a scorer with per_item")


def check_budget_space(config: Any) -> None:
    """`subset.include_sources` scores each source alone: only PS spaces over LLMs can."""
    subset = config.fitness.budget.subset
    if subset is not None and subset.include_sources and kind_name(config) != "llm":
        raise ConfigError("fitness.budget.subset.include_sources scores each source model alone, which only PS "
                          "searches over language models do; set include_sources: false")
