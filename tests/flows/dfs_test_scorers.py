"""User scorers for the DFS flow tests."""

from __future__ import annotations

from evomerge_core.fitness.registry import get_scorer


def logprob_and_items(ctx) -> dict[str, float]:
    """The built-in log-likelihood fitness, plus `items`: a bit mask of the scored rows'
    answers (row i of the tiny dataset has answer i + 1), so tests can see which rows were used."""
    fitness = get_scorer("logprob")(ctx)["fitness"]
    return {"fitness": fitness, "items": float(sum(2 ** int(row["answer"]) for row in ctx.rows))}


logprob_and_items.worst_fitness = -1e9
