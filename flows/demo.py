"""The demo flow: the paper's Table 1 in miniature on the offline toy world.

    build (or reuse) the toy world
    score each source model and three hand-set merges on the test splits
    for each search seed: run the real `evolve` flow (PS, DARE-TIES, CMA-ES) and score its best
    write results.md / results.json / fitness.png
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow

from evomerge.flows.evolve import evolve
from evomerge.tasks.demo import build_toy_world, score_baseline_merge, score_evolved, score_source
from evomerge_core.toyworld import load_zoo
from evomerge_core.toyworld.demo import (
    DEFAULT_EVALUATIONS,
    baseline_recipes,
    render_table,
    search_config,
    write_outputs,
)

SOURCE_ROWS = ("base", "skill_a", "skill_b", "lang")


@flow(name="demo", validate_parameters=False)
def demo(out_dir: str, size: str = "demo", seeds: int = 3, evaluations: int = DEFAULT_EVALUATIONS) -> dict[str, Any]:
    """Run the whole demo; returns the rows of the results table and the output paths."""
    out = Path(out_dir).resolve()
    zoo_root = build_toy_world(size)
    zoo = load_zoo(Path(zoo_root))
    rows: list[dict[str, Any]] = [score_source(zoo_root, name) for name in SOURCE_ROWS]
    for label in baseline_recipes(zoo):
        slug = label.split(" ")[0].lower()
        rows.append(score_baseline_merge(zoo_root, label, str(out / "baselines" / slug)))

    storage = (out / "runs").as_uri()
    evolved: dict[str, list[float]] = {}
    curves: list[list[dict[str, Any]]] = []
    evaluated, seconds = 0, 0.0
    for seed in range(seeds):
        run_key = f"demo-{size}-seed{seed}"
        started = time.perf_counter()
        result = evolve(search_config(zoo, seed=seed, evaluations=evaluations, storage=storage, run_key=run_key),
                        resume=False, run_key=run_key)
        seconds += time.perf_counter() - started
        evaluated += result["evaluations"]
        curves.append(result["generations"])
        scores = score_evolved(zoo_root, storage, run_key, str(out / "evolved" / f"seed{seed}"))
        for task, value in scores.items():
            evolved.setdefault(task, []).append(value)
    rows.append({"name": f"evolved PS (DARE-TIES, CMA-ES, {seeds} seed{'s' if seeds > 1 else ''})",
                 "kind": "evolved", "scores": evolved, "evaluated": evaluated // max(seeds, 1),
                 "seconds": seconds / max(seeds, 1)})
    paths = write_outputs(out, rows, curves)
    print("\n" + render_table(rows) + "\n", flush=True)
    print(paths["markdown"].read_text(encoding="utf-8").split("\n\n")[-1], flush=True)
    return {"rows": rows, "outputs": {k: str(v) for k, v in paths.items()}}
