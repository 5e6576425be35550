"""The demo flow: the paper's Table 1 in miniature on the offline toy world.

    build (or reuse) the toy world
    score each source model and three hand-set merges on the test splits
    for each search seed:
        PS+DFS as one chained run (the real `evolve` flow): stage "ps" is the PS row,
            stage "dfs" (A = the PS model, B = the JA model) the PS+DFS row
        DFS through the JA and the skill model, and the same with every scale fixed to 1
    score every run's best on the test splits
    write results.md / results.json / fitness.png (and the VLM table when asked)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from evomerge.flows.evolve import evolve
from evomerge.tasks.demo import build_toy_world, score_baseline_merge, score_evolved, score_source
from evomerge_core.toyworld import load_zoo
from evomerge_core.toyworld.demo import (
    DEFAULT_DFS_EVALUATIONS,
    DEFAULT_EVALUATIONS,
    SPACES,
    baseline_recipes,
    dfs_search_config,
    psdfs_search_config,
    render_table,
    search_config,
    write_outputs,
)

SOURCE_ROWS = ("base", "skill_a", "skill_b", "lang")
ROW_NAMES = {
    "ps": "evolved PS (DARE-TIES, CMA-ES)",
    "psdfs": "evolved PS+DFS (A = PS model, B = lang)",
    "dfs": "evolved DFS (A = lang, B = skill_a)",
    "dfs_noscale": "evolved DFS, scales fixed to 1 (ablation)",
}


class _Evolved:
    """Scores, evaluations, seconds and fitness curves of one kind of evolved row over seeds."""

    def __init__(self) -> None:
        self.scores: dict[str, list[float]] = {}
        self.evaluated = 0
        self.seconds = 0.0
        self.seeds = 0

    def add(self, scores: dict[str, float], evaluated: int, seconds: float) -> None:
        for task, value in scores.items():
            self.scores.setdefault(task, []).append(value)
        self.evaluated += evaluated
        self.seconds += seconds
        self.seeds += 1

    def row(self, kind: str) -> dict[str, Any]:
        n = max(self.seeds, 1)
        return {"name": f"{ROW_NAMES[kind]}, {self.seeds} seed{'s' if n > 1 else ''}", "kind": "evolved",
                "space": kind, "scores": self.scores, "evaluated": self.evaluated // n, "seconds": self.seconds / n}


@flow(name="demo", validate_parameters=False)
def demo(out_dir: str, size: str = "demo", seeds: int = 3, evaluations: int = DEFAULT_EVALUATIONS,
         dfs_evaluations: int = DEFAULT_DFS_EVALUATIONS, spaces: tuple[str, ...] = SPACES) -> dict[str, Any]:
    """Run the whole demo; returns the rows of the results table and the output paths.

    `spaces` picks the evolved rows: "ps", "psdfs" (implies the PS row), "dfs" (also runs its
    scales-fixed-to-1 ablation) and "vlm" (the VLM table).
    """
    out = Path(out_dir).resolve()
    zoo_root = build_toy_world(size)
    zoo = load_zoo(Path(zoo_root))
    rows: list[dict[str, Any]] = [score_source(zoo_root, name) for name in SOURCE_ROWS]
    for label in baseline_recipes(zoo):
        slug = label.split(" ")[0].lower()
        rows.append(score_baseline_merge(zoo_root, label, str(out / "baselines" / slug)))

    storage = (out / "runs").as_uri()
    evolved = {kind: _Evolved() for kind in ROW_NAMES}
    curves: list[list[dict[str, Any]]] = []
    for seed in range(seeds):
        if "psdfs" in spaces:  # one chained run gives both the PS and the PS+DFS row
            key = f"demo-{size}-psdfs-seed{seed}"
            cfg = psdfs_search_config(zoo, seed=seed, ps_evaluations=evaluations, dfs_evaluations=dfs_evaluations,
                                      storage=storage, run_key=key)
            _run(cfg, key)
            for index, kind in ((0, "ps"), (1, "psdfs")):
                stage = _stage_result(storage, key, index)
                if index == 0:
                    curves.append(stage["generations"])
                scores = score_evolved(zoo_root, f"{storage}/{key}/stages", str(index),
                                       str(out / "evolved" / kind / f"seed{seed}"))
                evolved[kind].add(scores, stage["evaluations"], search_seconds(stage))
        elif "ps" in spaces:
            key = f"demo-{size}-seed{seed}"
            result = _run(search_config(zoo, seed=seed, evaluations=evaluations, storage=storage, run_key=key),
                            key)
            curves.append(result["generations"])
            scores = score_evolved(zoo_root, storage, key, str(out / "evolved" / "ps" / f"seed{seed}"))
            evolved["ps"].add(scores, result["evaluations"], search_seconds(result))
        if "dfs" in spaces:
            for kind, scales in (("dfs", "matrix"), ("dfs_noscale", "none")):
                key = f"demo-{size}-{kind}-seed{seed}"
                result = _run(dfs_search_config(zoo, seed=seed, evaluations=dfs_evaluations, storage=storage,
                                                  run_key=key, scales=scales), key)
                scores = score_evolved(zoo_root, storage, key, str(out / "evolved" / kind / f"seed{seed}"))
                evolved[kind].add(scores, result["evaluations"], search_seconds(result))
    rows += [evolved[kind].row(kind) for kind in ROW_NAMES if evolved[kind].seeds]
    vlm_rows = None
    if "vlm" in spaces:
        from evomerge.flows.demo_vlm import DEFAULT_VLM_EVALUATIONS
        from evomerge.flows.demo_vlm import vlm_rows as run_vlm_rows

        # micro: a quick VLM that only exercises the code path (its scores mean nothing)
        vlm_rows = run_vlm_rows(out, seeds=seeds, evaluations=DEFAULT_VLM_EVALUATIONS if size == "demo" else 16,
                                size=size)
    paths = write_outputs(out, rows, curves, vlm_rows=vlm_rows)
    print("\n" + render_table(rows) + "\n", flush=True)
    print(paths["markdown"].read_text(encoding="utf-8").split("\n\n", 2)[-1], flush=True)
    return {"rows": rows, "vlm_rows": vlm_rows, "outputs": {k: str(v) for k, v in paths.items()}}


def _run(config: dict[str, Any], key: str) -> dict[str, Any]:
    return evolve(config, resume=False, run_key=key)


def search_seconds(result: dict[str, Any]) -> float:
    """Wall seconds of a run's generations (ask, evaluate, tell, checkpoint)."""
    return sum(g.get("seconds", 0.0) for g in result["generations"])


def _stage_result(storage: str, key: str, stage: int) -> dict[str, Any]:
    """`result.json` of one stage of a chained run."""
    from evomerge_core.runstore import RunStore

    result = RunStore(f"{storage}/{key}/stages", str(stage)).read_json("result.json")
    if result is None:
        raise RuntimeError(f"stage {stage} of {key} wrote no result.json")
    return result
