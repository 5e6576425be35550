"""fitness.budget on the demo world (issue 22): full PS search vs budgeted vs random minibatches.

    python benchmarks/budget_demo.py VARIANT[,VARIANT...] [SEEDS] [--test]

Each variant is the demo's PS search (DARE-TIES, 144 evaluations = 16 CMA-ES generations of 9)
with another fitness budget; prints one JSON line per (variant, seed): UNION validation
exact-match of the run's best (the tuning signal), UNION test only with --test (read once,
after tuning), and the run's cost (items evaluated, generated tokens). Results:
docs/benchmarks.md ("Evaluation budget").
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="budget-prefect-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

VARIANTS: dict[str, dict | None] = {
    "full": None,
    # budgeted: calibration generation + sources, 40-item IRT subset, racing in rounds of 10
    "b40": {"subset": {"size": 40}, "racing": {"slice": 10, "min_items": 10}, "final_candidates": 3},
    "b30": {"subset": {"size": 30}, "racing": {"slice": 10, "min_items": 10}, "final_candidates": 3},
    "b30ns": {"subset": {"size": 30, "include_sources": False}, "racing": {"slice": 10, "min_items": 10},
              "final_candidates": 3},
    "b40r": {"subset": {"size": 40, "method": "random"}, "racing": {"slice": 10, "min_items": 10},
             "final_candidates": 3},
    "b20": {"subset": {"size": 20}, "racing": {"slice": 10, "min_items": 10}, "final_candidates": 3},
    "race": {"racing": {"slice": 20, "min_items": 20}, "final_candidates": 3},
    # racing on a fresh seeded draw of 48 items per generation, rounds of 12
    "race48": {"racing": {"slice": 12, "min_items": 12, "max_items": 48}, "final_candidates": 3},
}


def variant_config(zoo, name: str, seed: int, storage: str) -> dict:
    from evomerge_core.toyworld.demo import search_config

    from evomerge_core.toyworld.demo import budget_search_config

    if name in ("budget", "random"):  # the demo's rows ("evolved PS, budgeted" and its random baseline)
        cfg = budget_search_config(zoo, seed=seed, evaluations=144, storage=storage, run_key=f"{name}-seed{seed}",
                                   kind=name)
    else:
        cfg = search_config(zoo, seed=seed, evaluations=144, storage=storage, run_key=f"{name}-seed{seed}")
    cfg["output"] = {"materialise_best": True, "report": False}
    if name in ("budget", "random"):
        pass
    elif name.startswith("mb"):  # random minibatches of the same budget: "mb<SIZE>"
        cfg["fitness"]["minibatch"] = int(name[2:])
        cfg["fitness"]["budget"] = {"final_candidates": 3}
    elif VARIANTS[name] is not None:
        cfg["fitness"]["budget"] = VARIANTS[name]
    return cfg


def main() -> None:
    from evomerge.flows.evolve import evolve
    from evomerge_core.runs.store import RunStore
    from evomerge_core.toyworld import build_zoo, evaluate_exact_match, load_model, load_tokenizer

    names = sys.argv[1].split(",")
    seeds = [int(s) for s in (sys.argv[2] if len(sys.argv) > 2 and not sys.argv[2].startswith("--") else "0,1,2").split(",")]
    test = "--test" in sys.argv
    zoo = build_zoo(os.environ.get("BUDGET_ZOO", "demo"))
    root = Path(os.environ.get("BUDGET_ROOT") or tempfile.mkdtemp(prefix="budget-demo-"))
    for name in names:
        for seed in seeds:
            storage = (root / "runs").as_uri()
            started = time.perf_counter()
            cfg = variant_config(zoo, name, seed, storage)
            try:  # BUDGET_ROOT + BUDGET_RESUME=1 continues runs of an earlier, interrupted call
                result = evolve(cfg, resume=bool(os.environ.get("BUDGET_RESUME")), run_key=f"{name}-seed{seed}")
            except Exception as exc:  # e.g. the ephemeral Prefect API died under load: resume once
                print(f"retrying {name} seed {seed} after {type(exc).__name__}: {exc}", flush=True)
                result = evolve(cfg, resume=True, run_key=f"{name}-seed{seed}")
            seconds = time.perf_counter() - started
            best = root / "best" / f"{name}-{seed}"
            RunStore(storage, f"{name}-seed{seed}").get_dir("best", best)
            model, tok = load_model(best), load_tokenizer(best)
            row = {"variant": name, "seed": seed, "best_fitness": result["best_fitness"],
                   "val_union": evaluate_exact_match(model, tok, zoo.rows("union", "validation")),
                   **result["cost"], "seconds": round(seconds, 1)}
            if test:
                row["test_union"] = evaluate_exact_match(model, tok, zoo.rows("union", "test"))
            print("RESULT " + json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
