"""Offline simulator of evaluation-budget strategies on the demo world (issue 22).

    python benchmarks/budget_sim.py '{"k": 48, "slice": 12, "conf": 0.8, "final": 2, "final_mean": true}' 0,1,2,3

Runs the demo's PS search (DARE-TIES, 16 CMA-ES generations of 9, seeded as `evomerge demo`)
outside the flow, scoring every candidate on *every* train item, but lets the strategy see (and
pay for) only the items it chose. So each strategy's chosen best has a known full-train
fitness (`true`) besides its UNION validation exact match (`val`, the tuning signal); the test
split is never read. With `{}` it is the full search (it reproduces the flow's best exactly).

Strategy keys: `k` items drawn fresh per generation (shared by the generation's candidates;
None: all), racing rounds of `slice` at one-sided `conf` (`min_items`), `final` top candidates
by budgeted estimate checked on all items, `final_mean` the CMA-ES mean checked too, `est`
"mean" or "twoway" (an additive ability + item-easiness model fitted on every observed value,
for the final ranking). Results: docs/benchmarks.md ("Evaluation budget").
"""
from __future__ import annotations

import json
import os
import random
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from evomerge_core.config.schema import RunConfig  # noqa: E402
from evomerge_core.fitness.budget.racing import to_stop, told_fitness  # noqa: E402
from evomerge_core.kinds.evaluate import CandidateEvaluator, get_evaluator  # noqa: E402
from evomerge_core.runs.search import make_optimizer  # noqa: E402
from evomerge_core.toyworld import build_zoo, evaluate_exact_match  # noqa: E402
from evomerge_core.toyworld.demo import search_config  # noqa: E402

N_ITEMS, GENERATIONS = 200, 16
_truth: dict[tuple[float, ...], tuple[np.ndarray, np.ndarray]] = {}


def _evaluator(zoo, seed: int) -> tuple[RunConfig, CandidateEvaluator]:
    cfg = RunConfig.model_validate(search_config(zoo, seed=seed, evaluations=144, storage=tempfile.mkdtemp(),
                                                 run_key="sim"))
    return cfg, get_evaluator(cfg, {s.model: s.model for s in cfg.sources})


def truth(ev: CandidateEvaluator, genome: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Per-item values and tokens of a genome on every train item (memoised)."""
    key = tuple(round(x, 12) for x in genome)
    if key not in _truth:
        res = ev.evaluate_items(genome, list(range(N_ITEMS)), generation=0, index=0)
        _truth[key] = (np.array(res["scores"]), np.array(res["tokens"]))
    return _truth[key]


def validation_exact_match(zoo, ev: CandidateEvaluator, genome: list[float]) -> float:
    with ev._applied(ev.space.decode(genome), ev.fitness) as runner:
        return evaluate_exact_match(runner.model, runner.tokenizer, zoo.rows("union", "validation"))


def two_way(observed: dict, iterations: int = 30) -> dict:
    """value = ability(candidate) + easiness(item), least squares by alternating means."""
    ability = {c: float(np.mean(v)) for c, (_, v) in observed.items()}
    for _ in range(iterations):
        total, count = np.zeros(N_ITEMS), np.zeros(N_ITEMS)
        for c, (items, values) in observed.items():
            np.add.at(total, items, values - ability[c])
            np.add.at(count, items, 1)
        easiness = np.where(count > 0, total / np.maximum(count, 1), 0.0)
        easiness -= easiness[count > 0].mean()
        ability = {c: float(np.mean(v - easiness[i])) for c, (i, v) in observed.items()}
    return ability


def _features(x: np.ndarray) -> np.ndarray:
    """Quadratic features of genomes (rows)."""
    n, d = x.shape
    cols = [np.ones(n)] + [x[:, a] for a in range(d)] + [x[:, a] * x[:, b] for a in range(d) for b in range(a, d)]
    return np.stack(cols, axis=1)


def surrogate_best(history: list[dict], mean: list[float], ev: CandidateEvaluator, seed: int) -> dict:
    """The argmax of a quadratic surrogate of the budgeted estimates (one intercept per
    generation: a generation's items shift all its estimates alike), over a cloud around the
    CMA-ES mean and the evaluated genomes."""
    x = np.array([h["genome"] for h in history])
    gens = sorted({h["g"] for h in history})
    onehot = np.array([[1.0 if h["g"] == g else 0.0 for g in gens[1:]] for h in history])
    features = np.concatenate([_features(x), onehot], axis=1)
    y = np.array([h["est"] for h in history])
    ridge = 1e-3 * np.eye(features.shape[1])
    coef = np.linalg.solve(features.T @ features + ridge, features.T @ y)
    quad = coef[: _features(x[:1]).shape[1]]
    rng = np.random.default_rng(seed)
    late = x[-36:]
    cloud = np.clip(rng.multivariate_normal(np.array(mean), np.cov(late.T) + 1e-6 * np.eye(x.shape[1]), 4000), 0, 1)
    points = np.concatenate([cloud, x])
    best = points[int(np.argmax(_features(points) @ quad))]
    genome = [float(v) for v in best]
    return {"g": GENERATIONS, "i": -2, "genome": genome, "true": float(truth(ev, genome)[0].mean())}


def informative_draw(spread: dict[int, list[float]], k: int, share: float, rng: random.Random) -> list[int]:
    """`share` of the k items drawn with probability proportional to how much candidates
    differed on them so far (unseen items: the mean spread), the rest uniformly; no repeats."""
    prior = float(np.mean([np.mean(v) for v in spread.values()])) if spread else 1.0
    weight = {i: (float(np.mean(spread[i])) if i in spread else prior) + 1e-9 for i in range(N_ITEMS)}
    chosen: list[int] = []
    for _ in range(round(share * k)):
        pool = [i for i in range(N_ITEMS) if i not in chosen]
        chosen.append(rng.choices(pool, weights=[weight[i] for i in pool])[0])
    rest = [i for i in range(N_ITEMS) if i not in chosen]
    rng.shuffle(rest)
    items = chosen + rest[: k - len(chosen)]
    rng.shuffle(items)
    return items


def simulate(zoo, seed: int, k: int | None = None, slice: int | None = None, conf: float = 0.95,
             min_items: int = 8, final: int = 3, est: str = "mean", final_mean: bool = False,
             final_slice: int | None = None, final_conf: float = 0.8, final_surrogate: bool = False,
             final_pick: str = "top", draw: str = "random", informative_share: float = 0.5) -> dict:
    cfg, ev = _evaluator(zoo, seed)
    optimizer = make_optimizer(cfg, ev.space)
    observed, history, items_used, tokens_used = {}, [], 0, 0
    spread: dict[int, list[float]] = {}
    for g in range(GENERATIONS):
        genomes = optimizer.ask()
        order = list(range(N_ITEMS))
        rng = random.Random(f"sim:{seed}:{g}")
        rng.shuffle(order)
        items = order if k is None else order[:k]
        if draw == "informative" and k is not None and g > 0:
            items = informative_draw(spread, k, informative_share, rng)
        values = {i: truth(ev, genome) for i, genome in enumerate(genomes)}
        rounds = [items] if slice is None else [items[j:j + slice] for j in range(0, len(items), slice)]
        alive, seen, stopped = list(range(len(genomes))), {i: [] for i in range(len(genomes))}, set()
        for r, round_items in enumerate(rounds):
            for i in alive:
                seen[i] += round_items
                items_used += len(round_items)
                tokens_used += int(values[i][1][round_items].sum())
            if slice is None or r == len(rounds) - 1:
                continue
            partial = {i: list(values[i][0][seen[i]]) for i in alive}
            for i in to_stop(partial, alive, len(genomes) // 2, confidence=conf, min_items=min_items):
                stopped.add(i)
                alive.remove(i)
        estimate = {i: float(values[i][0][seen[i]].mean()) for i in seen}
        told = told_fitness(estimate, stopped, {})
        optimizer.tell(genomes, [told[i] for i in range(len(genomes))])
        first = rounds[0]  # every candidate saw the first round: how much they differ per item
        for j, item in enumerate(first):
            spread.setdefault(item, []).append(float(np.std([values[i][0][item] for i in seen])))
        for i in seen:
            observed[(g, i)] = (np.array(seen[i]), values[i][0][seen[i]])
            history.append({"g": g, "i": i, "genome": genomes[i], "est": estimate[i], "stopped": i in stopped,
                            "true": float(values[i][0].mean())})
    if k is None:
        chosen = max(history, key=lambda h: h["true"])
    else:
        if est == "twoway":
            ability = two_way(observed)
            for h in history:
                h["est"] = ability[(h["g"], h["i"])]
        if final_pick == "generation_winners":  # each of the last `final` generations' best (ranked on shared items)
            top = [max((h for h in history if h["g"] == g and not h["stopped"]), key=lambda h: h["est"])
                   for g in range(GENERATIONS - final, GENERATIONS)]
        else:
            top = sorted((h for h in history if not h["stopped"]), key=lambda h: -h["est"])[:final]
        if final_mean:
            top.append({"g": GENERATIONS, "i": -1, "genome": optimizer.mean,
                        "true": float(truth(ev, optimizer.mean)[0].mean())})
        if final_surrogate:
            top.append(surrogate_best(history, optimizer.mean, ev, seed))
        if final_slice is None:
            for h in top:
                items_used += N_ITEMS
                tokens_used += int(truth(ev, h["genome"])[1].sum())
            chosen = max(top, key=lambda h: h["true"])
        else:  # the final check raced too: a candidate beaten by one other stops; survivors see all items
            order = list(range(N_ITEMS))
            random.Random(f"sim-final:{seed}").shuffle(order)
            alive, seen = list(range(len(top))), {c: [] for c in range(len(top))}
            for start in range(0, N_ITEMS, final_slice):
                chunk = order[start:start + final_slice]
                for c in alive:
                    seen[c] += chunk
                    items_used += len(chunk)
                    tokens_used += int(truth(ev, top[c]["genome"])[1][chunk].sum())
                if start + final_slice >= N_ITEMS:
                    break
                partial = {c: list(truth(ev, top[c]["genome"])[0][seen[c]]) for c in alive}
                for c in to_stop(partial, alive, 1, confidence=final_conf, min_items=final_slice):
                    alive.remove(c)
            chosen = max((top[c] for c in alive), key=lambda h: h["true"])
    return {"true": round(chosen["true"], 4), "val": validation_exact_match(zoo, ev, chosen["genome"]),
            "items": items_used, "tokens": tokens_used, "chosen_generation": chosen["g"],
            "oracle": round(max(h["true"] for h in history), 4)}  # the best evaluated candidate's full-train fitness


def main() -> None:
    torch.set_num_threads(1)
    spec = json.loads(sys.argv[1])
    zoo = build_zoo("demo")
    for seed in [int(s) for s in (sys.argv[2] if len(sys.argv) > 2 else "0,1,2").split(",")]:
        started = time.perf_counter()
        row = {"spec": spec, "seed": seed, **simulate(zoo, seed, **spec),
               "seconds": round(time.perf_counter() - started, 1)}
        print("SIM " + json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
