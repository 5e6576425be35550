"""Racing inside a generation (pure decisions on per-item values).

All surviving candidates of a generation are scored on the same items, round after round, so
candidates are compared *paired*, item by item: candidate d beats c when the mean of
(value_d - value_c) over the items both saw is above zero by `z` standard errors (`z` the
one-sided normal quantile of `racing.confidence`). A candidate beaten by at least mu others
(mu: the parents CMA-ES recombines, popsize // 2) cannot enter the top mu, so it stops.

Fitness told to CMA-ES (docs/budget.md): survivors get their estimate on every item; a stopped
candidate gets its estimate on the items it saw, shifted (one common shift for all stopped
candidates of the generation) to just below the worst survivor. CMA-ES only uses the ranking of
a generation: the mean and the positive-weight covariance updates use the top mu, which are
exactly the survivors' order; stopped candidates keep their partial-estimate order among
themselves for the negative (active CMA) weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from statistics import NormalDist
from typing import Any


def z_value(confidence: float) -> float:
    """The one-sided normal quantile of `confidence`."""
    return NormalDist().inv_cdf(confidence)


def beats(d: Sequence[float], c: Sequence[float], z: float) -> bool:
    """Whether d is better than c with confidence (paired, over the items both saw)."""
    n = min(len(d), len(c))
    if n < 2:
        return False
    diffs = [d[i] - c[i] for i in range(n)]
    mean = sum(diffs) / n
    if mean <= 0:
        return False
    var = sum((x - mean) ** 2 for x in diffs) / (n - 1)
    return var == 0 or mean / math.sqrt(var / n) > z


def to_stop(values: Mapping[int, Sequence[float]], alive: Sequence[int], mu: int, *, confidence: float,
            min_items: int) -> list[int]:
    """The alive candidates to stop after a round: those beaten by at least `mu` others, keeping
    at least `mu` alive (the best by mean stay); in index order."""
    alive = sorted(alive)
    if len(alive) <= mu or min(len(values[c]) for c in alive) < min_items:
        return []
    z = z_value(confidence)
    beaten = {c: sum(beats(values[d], values[c], z) for d in alive if d != c) for c in alive}
    stop = [c for c in alive if beaten[c] >= mu]
    keep = len(alive) - len(stop)
    if keep < mu:  # the tests are not transitive: never leave CMA-ES fewer than mu ranked survivors
        by_mean = sorted(stop, key=lambda c: (-sum(values[c]) / len(values[c]), c))
        stop = sorted(set(stop) - set(by_mean[: mu - keep]))
    return stop


def told_fitness(estimates: Mapping[int, float], stopped: set[int], failed: Mapping[int, float]) -> dict[int, float]:
    """The fitness CMA-ES is told per candidate: survivors their estimate, stopped candidates
    theirs shifted below the worst survivor (order kept), failed ones their worst value."""
    survivors = [c for c in estimates if c not in stopped and c not in failed]
    out = {c: estimates[c] for c in survivors}
    out.update(failed)
    ranked_out = [c for c in estimates if c in stopped and c not in failed]
    if ranked_out:
        shift = 0.0
        if survivors:
            floor = min(out[c] for c in survivors)
            top = max(estimates[c] for c in ranked_out)
            gap = 1e-6 * max(1.0, abs(floor))
            shift = max(0.0, top - floor + gap)
        for c in ranked_out:
            out[c] = estimates[c] - shift
    return out


def run_race(indices: Sequence[int], rounds: Sequence[Sequence[int]], evaluate: Callable[[list[int], int], dict[int, dict[str, Any]]],
             mu: int, racing: Any | None, weights: Mapping[int, float] | None = None,
             ) -> tuple[dict[int, list[dict[str, Any]]], dict[int, int]]:
    """Drive the rounds: `evaluate(alive, round)` returns each alive candidate's round result
    (``items``, ``scores``, ``tokens``, ``error``); returns every candidate's round results and,
    for the stopped ones, the round after which they stopped. `weights` (item -> weight) weigh
    the per-item values the racing compares (anchor subsets)."""
    alive = list(indices)
    results: dict[int, list[dict[str, Any]]] = {i: [] for i in indices}
    stopped_at: dict[int, int] = {}
    for r in range(len(rounds)):
        if not alive:
            break
        for i, res in evaluate(alive, r).items():
            results[i].append(res)
        failed = [i for i in alive if results[i][-1].get("error")]
        for i in failed:
            stopped_at[i] = r
        alive = [i for i in alive if i not in failed]
        if racing is None or r == len(rounds) - 1:
            continue
        w = weights or {}
        values = {i: [w.get(j, 1.0) * v for res in results[i] for j, v in zip(res.get("items", []), res["scores"])]
                  if w else [v for res in results[i] for v in res["scores"]] for i in alive}
        for i in to_stop(values, alive, mu, confidence=racing.confidence, min_items=racing.min_items):
            stopped_at[i] = r
            alive.remove(i)
    return results, stopped_at
