"""`evomerge demo`: build (or reuse) the toy world and run the evolution end to end on the
embedded default (a temporary local Prefect API this command owns, flows/local_server.py; local
file storage), printing the results table."""

from __future__ import annotations

import argparse
import time

from evomerge_core.errors import UsageError
from evomerge_core.toyworld.demo import (
    DEFAULT_DFS_EVALUATIONS,
    DEFAULT_EVALUATIONS,
    DEFAULT_WORKERS,
    OPTIONAL_SPACES,
    SPACES,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `evomerge demo`."""
    parser.add_argument("--out", default="evomerge-demo", help="output directory (default: ./evomerge-demo)")
    parser.add_argument("--size", default="demo", choices=["demo", "micro"], help="toy world size")
    parser.add_argument("--seeds", type=int, default=3, help="search seeds to run (mean and spread are reported)")
    parser.add_argument("--evaluations", type=int, default=DEFAULT_EVALUATIONS,
                        help=f"candidates per PS search (default {DEFAULT_EVALUATIONS})")
    parser.add_argument("--dfs-evaluations", type=int, default=DEFAULT_DFS_EVALUATIONS,
                        help=f"candidates per DFS search (default {DEFAULT_DFS_EVALUATIONS})")
    parser.add_argument("--spaces", default=",".join(SPACES),
                        help=f"evolved rows to run, comma-separated from {', '.join(SPACES + OPTIONAL_SPACES)} "
                             f"(default: {', '.join(SPACES)}); psdfs includes ps, dfs includes its "
                             "scales-fixed-to-1 ablation, cross adds the CROSS table (its own zoo), crossdfs also its PS+DFS row")
    parser.add_argument("--cross-zoo-seed", type=int, default=0,
                        help="seed of the cross zoo (the CROSS table's world; default 0): another seed rebuilds "
                             "the same recipe, to check the effect is not one lucky zoo")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                        help=f"processes the searches run in side by side (default {DEFAULT_WORKERS}; 1: one after "
                             "another); results do not depend on it")


def run(args: argparse.Namespace) -> int:
    """Run the demo flow and print where its outputs are."""
    if args.seeds < 1 or args.evaluations < 2 or args.dfs_evaluations < 2 or args.workers < 1:
        raise UsageError("--seeds and --workers must be >= 1 and --evaluations / --dfs-evaluations >= 2")
    if args.cross_zoo_seed < 0:
        raise UsageError("--cross-zoo-seed must be >= 0")
    spaces = tuple(s.strip() for s in args.spaces.split(",") if s.strip())
    unknown = sorted(set(spaces) - set(SPACES) - set(OPTIONAL_SPACES))
    if unknown or not spaces:
        raise UsageError(f"--spaces: unknown {unknown or 'empty list'}; "
                         f"choose from {', '.join(SPACES + OPTIONAL_SPACES)}")
    from evomerge.flows.local_server import local_api, using
    from evomerge.flows.prefect_api import check_api

    check_api()
    started = time.perf_counter()
    # Without PREFECT_API_URL: a temporary API server owned by this command (no orphan when it is
    # killed, no telemetry ERROR offline; see flows/local_server.py).
    with local_api() as server, using(server):
        from evomerge.flows.demo import demo

        result = demo(out_dir=args.out, size=args.size, seeds=args.seeds, evaluations=args.evaluations,
                      dfs_evaluations=args.dfs_evaluations, spaces=spaces, workers=args.workers,
                      cross_zoo_seed=args.cross_zoo_seed)
    print(f"demo finished in {time.perf_counter() - started:.0f} s; table: {result['outputs']['markdown']}")
    return 0
