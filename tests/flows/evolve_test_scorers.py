"""User scorers (`module:function`) for the evolve flow tests."""

from __future__ import annotations

# The planted optimum: (density, weight) per fine-tune, keyed by the source dir's name.
PLANTED = {"ft1": {"density": 0.8, "weight": 0.3}, "ft2": {"density": 0.35, "weight": 0.65}}


def planted(ctx) -> float:
    """Negative squared distance of the decoded recipe's (density, weight) to PLANTED."""
    total = 0.0
    for entry in ctx.recipe.models:
        target = PLANTED[entry.model.rstrip("/").rsplit("/", 1)[-1]]
        for name, value in target.items():
            total -= (float(entry.parameters[name]) - value) ** 2
    return total


planted.worst_fitness = -10.0


def flaky(ctx) -> float:
    """Like `planted`, but raises for candidates whose first genome entry exceeds 0.5."""
    if ctx.genome[0] > 0.5:
        raise RuntimeError("injected failure for a test")
    return planted(ctx)


flaky.worst_fitness = -10.0
