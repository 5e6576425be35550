"""Scale-out of candidate evaluation on Dask (toy world, micro zoo, the demo's PS search config).

Part 1, per-candidate breakdown (plain Dask calls on a LocalCluster, 1 thread per worker):
each worker evaluates candidates the way `merge_and_evaluate` does and times the pieces:
  load      reading the sources + building the model (0 when the resident model is reused)
  merge     applying the recipe in place into the resident model
  score     the fitness scorer (answer log-likelihood: forward passes)
  generate  the accuracy scorer (greedy generation + exact match)
Two modes: "resident" (sources loaded once per worker: the shipped behaviour) and "reread"
(the per-worker cache is cleared before every candidate: what re-reading sources per candidate
costs, i.e. "before"). Overhead = generation wall x workers / candidates - in-worker compute.

Part 2, the real evolve flow (Prefect test harness API, `runtime.task_runner: dask`): the wall
time of each generation (checkpoint included) on 1 and 2 workers, with one Prefect task run per
candidate (`candidates_per_task: 1`) and with a generation split over the workers
(`candidates_per_task: auto`). Generation 1 is cold (worker imports, first load); later
generations are warm.

    python benchmarks/dask_scaling.py [--popsize 8] [--generations 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def search_config(storage: str, run_key: str, popsize: int, generations: int, workers: int,
                  candidates_per_task: int | str = 1) -> dict[str, Any]:
    from evomerge_core.toyworld.demo import search_config as demo_config
    from evomerge_core.toyworld.zoo import build_zoo

    cfg = demo_config(build_zoo("micro", progress=False), seed=0, evaluations=popsize * generations,
                      storage=storage, run_key=run_key)
    cfg["optimizer"] = {**cfg["optimizer"], "popsize": popsize}
    # The default candidate: fitness (answer log-likelihood) plus the reported accuracy (greedy
    # generation + exact match, what accuracy_scorer "auto" gives); the demo itself skips the latter.
    cfg["fitness"] = {**cfg["fitness"], "test": None, "accuracy_scorer": "exact_match"}
    cfg["runtime"] = {**cfg["runtime"], "torch_threads": 1,
                      "task_runner": {"kind": "dask", "workers": workers, "threads_per_worker": 1,
                                      "candidates_per_task": candidates_per_task}}
    cfg["output"] = {"materialise_best": False, "report": False}
    return cfg


def timed_candidate(config: dict[str, Any], paths: dict[str, str], genome: list[float], reread: bool) -> dict[str, float]:
    """One candidate on a worker, piece by piece (see module docstring)."""
    from evomerge_core.config.schema import RunConfig
    from evomerge_core.kinds.cache import clear_model_cache
    from evomerge_core.kinds.evaluate import get_evaluator

    t0 = time.perf_counter()
    if reread:
        clear_model_cache()
    ev = get_evaluator(RunConfig.model_validate(config), paths)
    t1 = time.perf_counter()
    recipe = ev.space.decode(genome)
    with ev.runner.lock:
        ev.runner.apply(recipe)
        t2 = time.perf_counter()
        ctx = ev.fitness.context(ev.runner.model, ev.runner.tokenizer, recipe=recipe, genome=genome)
        fitness = ev.fitness.scorer(ctx)["fitness"]
        t3 = time.perf_counter()
        accuracy = ev.fitness.accuracy(ctx.with_options(ev.config.fitness.accuracy_options))["fitness"]
        t4 = time.perf_counter()
    return {"load": t1 - t0, "merge": t2 - t1, "score": t3 - t2, "generate": t4 - t3, "fitness": fitness,
            "accuracy": accuracy, "pid": os.getpid()}


def breakdown(workers: int, reread: bool, popsize: int, rounds: int) -> dict[str, Any]:
    """Part 1 on `workers` workers: `rounds` generations of `popsize` candidates (first one warms up)."""
    import numpy as np
    from distributed import Client, LocalCluster

    from evomerge_core.config.schema import parse_run_config
    from evomerge_core.kinds import run_kind

    with tempfile.TemporaryDirectory() as tmp:
        cfg = parse_run_config(search_config(f"file://{tmp}", "bench", popsize, rounds, workers))
        paths = run_kind(cfg).resolve_sources(cfg)["paths"]
        rng = np.random.default_rng(0)
        config = cfg.model_dump(mode="json")
        env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                          dashboard_address=None, env=env) as cluster, Client(cluster) as client:
            client.run(lambda: __import__("evomerge_core.kinds.evaluate"))  # imports are not part of a generation
            walls, pieces = [], []
            for r in range(rounds):
                genomes = [list(np.clip(0.5 + rng.normal(0, 1 / 6, 6), 0, 1)) for _ in range(popsize)]
                started = time.perf_counter()
                futures = [client.submit(timed_candidate, config, paths, g, reread, pure=False) for g in genomes]
                results = client.gather(futures)
                walls.append(time.perf_counter() - started)
                pieces.append(results)
    warm_walls = walls[1:] or walls
    warm = [p for rs in pieces[1:] or pieces for p in rs]
    mean = {k: statistics.mean(p[k] for p in warm) for k in ("load", "merge", "score", "generate")}
    compute = sum(mean.values())
    per_candidate_wall = statistics.mean(warm_walls) * workers / popsize
    return {"workers": workers, "mode": "reread" if reread else "resident", "generation_walls": walls,
            "warm_generation_wall": statistics.mean(warm_walls), "per_candidate": {**mean, "overhead": per_candidate_wall - compute},
            "candidates": popsize}


def flow_walls(workers: int, popsize: int, generations: int, candidates_per_task: int | str) -> list[float]:
    """Part 2: generation wall times of the real evolve flow on `workers` Dask workers."""
    from evomerge.flows.evolve import evolve
    from evomerge_core.runs.store import RunStore

    with tempfile.TemporaryDirectory() as tmp:
        key = f"dask-{workers}-{candidates_per_task}"
        evolve(search_config(f"file://{tmp}", key, popsize, generations, workers, candidates_per_task), resume=False,
               run_key=key)
        store = RunStore(f"file://{tmp}", key)
        return [store.read_generation(g)["summary"]["seconds"] for g in range(generations)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--popsize", type=int, default=8)
    parser.add_argument("--generations", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--skip-flow", action="store_true", help="part 1 only")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    out: dict[str, Any] = {"load_average_start": os.getloadavg(), "cpus": os.cpu_count(), "breakdown": [], "flow": {}}
    for reread in (False, True):
        for workers in (1, 2):
            res = breakdown(workers, reread, args.popsize, args.generations)
            out["breakdown"].append(res)
            pc = res["per_candidate"]
            print(f"[{res['mode']:8s}] {workers} worker(s): warm generation {res['warm_generation_wall']:.2f} s; per candidate "
                  + ", ".join(f"{k} {v:.3f}" for k, v in pc.items()), flush=True)
    if not args.skip_flow:
        from prefect.testing.utilities import prefect_test_harness

        with tempfile.TemporaryDirectory() as home:
            os.environ["PREFECT_HOME"] = home
            with prefect_test_harness(server_startup_timeout=180):
                for batch in (1, "auto"):
                    for workers in (1, 2):
                        walls = flow_walls(workers, args.popsize, args.generations, batch)
                        out["flow"][f"{workers}/{batch}"] = walls
                        print(f"[flow, candidates_per_task {batch}] {workers} worker(s): generation walls "
                              + ", ".join(f"{w:.2f}" for w in walls), flush=True)
    out["load_average_end"] = os.getloadavg()
    for mode in ("resident", "reread"):
        one, two = (next(b for b in out["breakdown"] if b["mode"] == mode and b["workers"] == w) for w in (1, 2))
        print(f"[{mode}] 2 workers / 1 worker (warm generation): {two['warm_generation_wall'] / one['warm_generation_wall']:.2f}")
    if out["flow"]:
        warm = {k: statistics.mean(v[1:]) for k, v in out["flow"].items()}
        one = next(b for b in out["breakdown"] if b["mode"] == "resident" and b["workers"] == 1)
        compute = sum(v for k, v in one["per_candidate"].items() if k != "overhead")
        for batch in ("1", "auto"):
            ratio = warm[f"2/{batch}"] / warm[f"1/{batch}"]
            overhead = warm[f"1/{batch}"] / args.popsize - compute
            print(f"[flow, candidates_per_task {batch}] 2 workers / 1 worker (warm generations): {ratio:.2f}; "
                  f"1 worker: {warm[f'1/{batch}'] / args.popsize:.3f} s per candidate, of which flow overhead "
                  f"(Prefect task runs, run store, checkpoint) {overhead:.3f} s")
            out.setdefault("flow_summary", {})[batch] = {"ratio": ratio, "per_candidate_overhead_1_worker": overhead}
    print(f"load average at start {out['load_average_start']}, at end {out['load_average_end']} ({out['cpus']} CPUs)")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
