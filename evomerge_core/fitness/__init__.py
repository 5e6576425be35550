"""Fitness: scorers (registry), dataset loading with a column mapping, and the evaluator."""

from evomerge_core.fitness.registry import BUILTIN_SCORERS, ScoreContext, Scorer, get_scorer

__all__ = ["BUILTIN_SCORERS", "ScoreContext", "Scorer", "get_scorer"]
