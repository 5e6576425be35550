"""User scorer (`resume_scorers:planted`) for the resume tests: a cheap, deterministic fitness
(negative squared distance of the decoded recipe to a planted optimum), optionally slowed down by
``EVOMERGE_TEST_SCORER_SLEEP`` seconds per candidate so a test can act while a run is going."""

from __future__ import annotations

import os
import time

PLANTED = {"density": 0.7, "weight": 0.4}


def planted(ctx) -> float:
    """Negative squared distance of every source's (density, weight) to PLANTED."""
    time.sleep(float(os.environ.get("EVOMERGE_TEST_SCORER_SLEEP", "0")))
    total = 0.0
    for entry in ctx.recipe.models:
        for name, value in PLANTED.items():
            if name in entry.parameters:
                total -= (float(entry.parameters[name]) - value) ** 2
    return total


planted.worst_fitness = -10.0
