"""Per-candidate cost of the in-process evaluator on the toy world (the demo's PS search).

One process, no Dask, no Prefect: `evomerge_core.kinds.evaluate.get_evaluator` on the micro zoo with
the demo's search config (DARE-TIES over 3 experts, 6 genes; fitness = answer log-likelihood on
the UNION train items, accuracy = greedy generation + exact match), then `evaluate(genome)` for
N random genomes after one warm-up candidate. Each call is split into

  merge     `ResidentModel.apply` (the recipe merged in place into the resident model)
  score     the fitness scorer (forward passes)
  generate  the accuracy scorer (batched greedy generation)
  overhead  everything else in `evaluate` (decode the genome, the NaN/inf logits check,
            records, locking)

and the table gives the mean seconds and the share of the candidate. Acceptance (issue 10):
merge + overhead below 10% of the candidate. Two fitness settings are measured: the demo's
(`logprob` only, no per-candidate generation) and the same with the accuracy scorer on
(`accuracy_scorer: auto`: greedy generation + exact match on the same items).

    python benchmarks/candidate_breakdown.py [--candidates 24] [--threads 1] [--json out.json]
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


class _Timed:
    """Calls `fn`, adding its seconds to `store[key]`; other attributes come from `fn`."""

    def __init__(self, store: dict[str, float], key: str, fn: Any) -> None:
        self._store, self._key, self._fn = store, key, fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return self._fn(*args, **kwargs)
        finally:
            self._store[self._key] = self._store.get(self._key, 0.0) + time.perf_counter() - t

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fn, name)


def run(candidates: int, threads: int, accuracy: bool) -> dict[str, Any]:
    import numpy as np
    import torch

    from evomerge_core.config.schema import parse_run_config
    from evomerge_core.kinds.cache import clear_model_cache
    from evomerge_core.kinds.evaluate import get_evaluator
    from evomerge_core.kinds import run_kind
    from evomerge_core.toyworld.demo import search_config
    from evomerge_core.toyworld.zoo import build_zoo

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = search_config(build_zoo("micro", progress=False), seed=0, evaluations=candidates + 1,
                            storage=f"file://{tmp}", run_key="bench")
        cfg["fitness"] = {**cfg["fitness"], "test": None, "accuracy_scorer": "auto" if accuracy else "none"}
        cfg["runtime"] = {**cfg["runtime"], "torch_threads": threads}
        config = parse_run_config(cfg)
        paths = run_kind(config).resolve_sources(config)["paths"]
        clear_model_cache()
        t = time.perf_counter()
        ev = get_evaluator(config, paths)
        load = time.perf_counter() - t
        times: dict[str, float] = {}
        ev.runner.apply = _Timed(times, "merge", ev.runner.apply)
        ev.fitness.scorer = _Timed(times, "score", ev.fitness.scorer)
        if ev.fitness.accuracy is not None:
            ev.fitness.accuracy = _Timed(times, "generate", ev.fitness.accuracy)
        rng = np.random.default_rng(0)
        rows = []
        for i in range(candidates + 1):
            genome = list(np.clip(0.5 + rng.normal(0, 1 / 6, 6), 0, 1))
            times.clear()
            t = time.perf_counter()
            record = ev.evaluate(genome, generation=0, index=i)
            wall = time.perf_counter() - t
            if record["error"]:
                raise RuntimeError(f"candidate {i} failed: {record['error']}")
            if i == 0:
                continue  # warm-up (first forward passes, allocator)
            pieces = {k: times.get(k, 0.0) for k in ("merge", "score", "generate")}
            rows.append({**pieces, "overhead": wall - sum(pieces.values()), "total": wall, "fitness": record["fitness"]})
        clear_model_cache()
    mean = {k: statistics.mean(r[k] for r in rows) for k in ("merge", "score", "generate", "overhead", "total")}
    return {"candidates": candidates, "threads": threads, "accuracy_scorer": accuracy, "load_seconds": load, "mean": mean,
            "merge_plus_overhead_share": (mean["merge"] + mean["overhead"]) / mean["total"], "rows": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=24)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = []
    ok = True
    for accuracy in (False, True):
        load_start = os.getloadavg()
        res = run(args.candidates, args.threads, accuracy)
        res["load_average"] = {"start": load_start, "end": os.getloadavg()}
        results.append(res)
        m = res["mean"]
        print(f"\ntoy world (micro zoo), in-process evaluator, {args.candidates} candidates, {args.threads} torch thread(s), "
              f"accuracy scorer {'on' if accuracy else 'off (the demo)'}; load average {load_start[0]:.2f} -> {res['load_average']['end'][0]:.2f}")
        print(f"{'piece':<10}{'seconds':>10}{'share':>8}")
        for k in ("merge", "score", "generate", "overhead", "total"):
            print(f"{k:<10}{m[k]:>10.4f}{m[k] / m['total']:>8.1%}")
        share = res["merge_plus_overhead_share"]
        ok &= share < 0.10
        print(f"merge + overhead = {share:.1%} of a candidate (target < 10%): {'met' if share < 0.10 else 'NOT met'}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
