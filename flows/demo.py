"""The demo flow: the paper's Table 1 in miniature on the offline toy world.

    build (or reuse) the toy world (and the VLM toy world when the VLM rows are asked for)
    score each source model and three hand-set merges on the test splits
    the searches, as independent jobs spread over `workers` processes:
        per seed, PS+DFS as one chained run (the real `evolve` flow): stage "ps" is the PS row,
            stage "dfs" (A = the PS model, B = the JA model) the PS+DFS row
        per seed, DFS through the JA and the skill model, and the same with every scale fixed to 1
        per seed, the PS search with the evaluation budget (fitness.budget) and with random
            minibatches of the same budget ("budget" in `spaces`)
        per seed, the VLM search (`evomerge.flows.demo_vlm`)
        per seed, the PS search on the cross zoo targeting CROSS ("cross" in `spaces`; its
            sources and hand-set merges are scored on the cross zoo first), or PS then DFS as
            one chained run ("crossdfs")
      each job scores its runs' best models on the test splits
    write results.md / results.json / fitness.png (and the VLM table when asked)

Every search is seeded and runs single-threaded in one process, so where a job runs (the
flow's process or a Dask worker) does not change its numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from evomerge.flows.evolve import evolve
from evomerge.tasks.demo import build_toy_world, score_baseline_merge, score_evolved, score_source
from evomerge_core.toyworld import load_zoo
from evomerge_core.toyworld.demo import (
    CROSS_SIZE,
    DEFAULT_DFS_EVALUATIONS,
    DEFAULT_EVALUATIONS,
    DEFAULT_WORKERS,
    SPACES,
    baseline_recipes,
    budget_search_config,
    cross_baseline_recipes,
    cross_psdfs_search_config,
    cross_search_config,
    dfs_search_config,
    psdfs_search_config,
    render_table,
    search_config,
    write_outputs,
)

SOURCE_ROWS = ("base", "skill_a", "skill_b", "lang")
ROW_NAMES = {
    "ps": "evolved PS (DARE-TIES, CMA-ES)",
    "ps_budget": "evolved PS, budgeted (racing on fresh item draws)",
    "ps_random": "evolved PS, random minibatches of the same budget",
    "psdfs": "evolved PS+DFS (A = PS model, B = lang)",
    "dfs": "evolved DFS (A = lang, B = skill_a)",
    "dfs_noscale": "evolved DFS, scales fixed to 1 (ablation)",
    "cross": "evolved PS (DARE-TIES, CMA-ES) → CROSS",
    "cross_psdfs": "evolved PS+DFS (A = PS model, B = lang) → CROSS",
}
# results.json's "target" of a row searched for one task: the CROSS table's evolved rows
TARGETS = {"cross": "cross", "cross_psdfs": "cross"}
BUDGETED = {"ps_budget": True, "ps_random": "random"}  # results.json's "budgeted" mark of a row


class _Evolved:
    """Scores, evaluations, seconds and fitness curves of one kind of evolved row over seeds."""

    def __init__(self) -> None:
        self.scores: dict[str, list[float]] = {}
        self.evaluated = 0
        self.seconds = 0.0
        self.seeds = 0
        self.cost: dict[str, list[int]] = {"items_evaluated": [], "generated_tokens": []}  # per seed

    def add(self, scores: dict[str, float], evaluated: int, seconds: float, cost: dict[str, int] | None = None) -> None:
        for task_name, value in scores.items():
            self.scores.setdefault(task_name, []).append(value)
        for key, values in self.cost.items():
            values.append(int((cost or {}).get(key, 0)))
        self.evaluated += evaluated
        self.seconds += seconds
        self.seeds += 1

    def row(self, kind: str) -> dict[str, Any]:
        n = max(self.seeds, 1)
        row = {"name": f"{ROW_NAMES[kind]}, {self.seeds} seed{'s' if n > 1 else ''}", "kind": "evolved",
               "space": kind, "scores": self.scores, "evaluated": self.evaluated // n, "seconds": self.seconds / n,
               **self.cost}
        if kind in BUDGETED:
            row["budgeted"] = BUDGETED[kind]
        if kind in TARGETS:
            row["target"] = TARGETS[kind]
        return row


def _jobs(seeds: int, spaces: tuple[str, ...]) -> list[tuple[str, int]]:
    """The searches as independent (job, seed) pairs, longest first (a better packing on workers)."""
    jobs = []
    for seed in range(seeds):
        if "psdfs" in spaces:
            jobs.append(("psdfs", seed))
        elif "ps" in spaces:
            jobs.append(("ps", seed))
    if "crossdfs" in spaces:  # one chained run gives the PS and the PS+DFS rows of the CROSS table
        jobs += [("crossdfs", seed) for seed in range(seeds)]
    elif "cross" in spaces:
        jobs += [("cross", seed) for seed in range(seeds)]
    jobs += [(kind, seed) for seed in range(seeds) for kind in ("ps_budget", "ps_random") if "budget" in spaces]
    jobs += [("vlm", seed) for seed in range(seeds) if "vlm" in spaces]
    jobs += [(kind, seed) for seed in range(seeds) for kind in ("dfs", "dfs_noscale") if "dfs" in spaces]
    return jobs


@flow(name="demo", validate_parameters=False)
def demo(out_dir: str, size: str = "demo", seeds: int = 3, evaluations: int = DEFAULT_EVALUATIONS,
         dfs_evaluations: int = DEFAULT_DFS_EVALUATIONS, spaces: tuple[str, ...] = SPACES,
         workers: int = DEFAULT_WORKERS, cross_zoo_seed: int = 0) -> dict[str, Any]:
    """Run the whole demo; returns the rows of the results table and the output paths.

    `spaces` picks the evolved rows: "ps", "psdfs" (implies the PS row), "dfs" (also runs its
    scales-fixed-to-1 ablation), "vlm" (the VLM table) and "cross" (the CROSS table, on the
    cross zoo; "crossdfs" adds its PS+DFS row). `workers` processes run the
    searches side by side (1: one after another in the flow's process).
    """
    out = Path(out_dir).resolve()
    zoo_root = build_toy_world(size)
    zoo = load_zoo(Path(zoo_root))
    rows: list[dict[str, Any]] = [score_source(zoo_root, name) for name in SOURCE_ROWS]
    for label in baseline_recipes(zoo):
        slug = label.split(" ")[0].lower()
        rows.append(score_baseline_merge(zoo_root, label, str(out / "baselines" / slug)))
    vlm_fixed: list[dict[str, Any]] = []
    if "vlm" in spaces:
        from evomerge.flows.demo_vlm import vlm_fixed_rows

        vlm_fixed = vlm_fixed_rows(out, size=size)
    cross_root = None
    cross_rows: list[dict[str, Any]] = []
    if "cross" in spaces or "crossdfs" in spaces:
        cross_root, cross_rows = _cross_fixed_rows(out, cross_zoo_seed)

    jobs = _jobs(seeds, spaces)
    params = {"zoo_root": zoo_root, "out_dir": str(out), "size": size, "evaluations": evaluations,
              "dfs_evaluations": dfs_evaluations, "cross_root": cross_root}
    results = _run_jobs([(name, seed, params) for name, seed in jobs], workers)

    evolved = {kind: _Evolved() for kind in ROW_NAMES}
    curves: list[list[dict[str, Any]]] = []
    vlm_results = []
    for (name, _seed), result in zip(jobs, results):
        if name == "vlm":
            vlm_results.append(result)
            continue
        if result.get("curve") is not None:  # the UNION PS searches' curves (the CROSS jobs give none)
            curves.append(result["curve"])
        for kind, part in result["rows"].items():
            evolved[kind].add(part["scores"], part["evaluated"], part["seconds"], part.get("cost"))
    rows += [evolved[kind].row(kind) for kind in ROW_NAMES if evolved[kind].seeds and kind not in TARGETS]
    cross_rows += [evolved[kind].row(kind) for kind in TARGETS if evolved[kind].seeds]
    vlm_rows = None
    if "vlm" in spaces:
        from evomerge.flows.demo_vlm import vlm_evolved_row

        vlm_rows = vlm_fixed + [vlm_evolved_row(vlm_results)]
    paths = write_outputs(out, rows, curves, vlm_rows=vlm_rows, cross_rows=cross_rows or None)
    print("\n" + render_table(rows) + "\n", flush=True)
    print(paths["markdown"].read_text(encoding="utf-8").split("\n\n", 2)[-1], flush=True)
    return {"rows": rows, "vlm_rows": vlm_rows, "cross_rows": cross_rows or None,
            "outputs": {k: str(v) for k, v in paths.items()}}


def _cross_fixed_rows(out: Path, zoo_seed: int = 0) -> tuple[str, list[dict[str, Any]]]:
    """Build (or reuse) the cross zoo; score its sources and the CROSS table's hand-set merges."""
    cross_root = build_toy_world(CROSS_SIZE, zoo_seed)
    cross = load_zoo(Path(cross_root))
    rows = [score_source(cross_root, name) for name in SOURCE_ROWS]
    for label in cross_baseline_recipes(cross):
        slug = label.split(" ")[0].lower() + "-" + label.split(" ")[-1]
        rows.append(score_baseline_merge(cross_root, label, str(out / "cross" / "baselines" / slug)))
    return cross_root, rows


def _run_jobs(jobs: list[tuple[str, int, dict[str, Any]]], workers: int) -> list[dict[str, Any]]:
    """Run the search jobs in the flow's process (one worker or one job) or on a local Dask
    cluster of `workers` single-threaded processes; results in job order."""
    workers = min(workers, len(jobs))
    if workers <= 1:
        return [search_job(name, seed, **params) for name, seed, params in jobs]
    from evomerge.flows.runners import build_dask_runner, current_api_url
    from evomerge_core.config.task_runner import TaskRunnerConfig

    spec = TaskRunnerConfig(kind="dask", workers=workers, threads_per_worker=1)
    with build_dask_runner(spec, device="cpu", api_url=current_api_url()) as runner:
        futures = [runner.submit(search_job, parameters={"name": name, "seed": seed, **params})
                   for name, seed, params in jobs]
        return [future.result() for future in futures]


@task(name="demo-search", task_run_name="demo-{name}-seed{seed}", cache_policy=NO_CACHE)
def search_job(name: str, seed: int, zoo_root: str, out_dir: str, size: str, evaluations: int,
               dfs_evaluations: int, cross_root: str | None = None) -> dict[str, Any]:
    """One seed's search of one kind, its best scored on the test splits: ``psdfs`` (the PS and
    PS+DFS rows from one chained run), ``ps``, ``dfs``, ``dfs_noscale`` (DFS with every scale
    fixed to 1), ``vlm`` (the VLM search, `evomerge.flows.demo_vlm.vlm_seed`), ``cross`` (PS
    on the cross zoo `cross_root`, targeting CROSS) or ``crossdfs`` (that PS and PS+DFS on it as
    one chained run)."""
    out = Path(out_dir)
    if name == "vlm":
        from evomerge.flows.demo_vlm import vlm_seed
        from evomerge_core.toyworld.vlm import DEFAULT_VLM_EVALUATIONS

        # micro: a quick VLM that only exercises the code path (its scores mean nothing)
        return vlm_seed(out, size=size, seed=seed, evaluations=DEFAULT_VLM_EVALUATIONS if size == "demo" else 16)
    if name in ("cross", "crossdfs"):
        if cross_root is None:
            raise ValueError(f"the {name} search job needs cross_root (the cross zoo)")
        return _cross_job(name, seed, cross_root, out, evaluations, dfs_evaluations)
    zoo = load_zoo(Path(zoo_root))
    storage = (out / "runs").as_uri()
    rows: dict[str, dict[str, Any]] = {}
    curve = None
    if name == "psdfs":  # one chained run gives both the PS and the PS+DFS row
        key = f"demo-{size}-psdfs-seed{seed}"
        cfg = psdfs_search_config(zoo, seed=seed, ps_evaluations=evaluations, dfs_evaluations=dfs_evaluations,
                                  storage=storage, run_key=key)
        _run(cfg, key)
        for index, kind in ((0, "ps"), (1, "psdfs")):
            stage = _stage_result(storage, key, index)
            if index == 0:
                curve = stage["generations"]
            scores = score_evolved.fn(zoo_root, f"{storage}/{key}/stages", str(index),
                                      str(out / "evolved" / kind / f"seed{seed}"))
            rows[kind] = {"scores": scores, "evaluated": stage["evaluations"], "seconds": search_seconds(stage),
                          "cost": stage.get("cost")}
    elif name == "ps":
        key = f"demo-{size}-seed{seed}"
        result = _run(search_config(zoo, seed=seed, evaluations=evaluations, storage=storage, run_key=key), key)
        curve = result["generations"]
        rows["ps"] = _search_row(result, zoo_root, storage, key, out / "evolved" / "ps" / f"seed{seed}")
    elif name in ("ps_budget", "ps_random"):
        key = f"demo-{size}-{name}-seed{seed}"
        result = _run(budget_search_config(zoo, seed=seed, evaluations=evaluations, storage=storage, run_key=key,
                                           kind="budget" if name == "ps_budget" else "random"), key)
        rows[name] = _search_row(result, zoo_root, storage, key, out / "evolved" / name / f"seed{seed}")
    elif name in ("dfs", "dfs_noscale"):
        key = f"demo-{size}-{name}-seed{seed}"
        result = _run(dfs_search_config(zoo, seed=seed, evaluations=dfs_evaluations, storage=storage, run_key=key,
                                        scales="matrix" if name == "dfs" else "none"), key)
        rows[name] = _search_row(result, zoo_root, storage, key, out / "evolved" / name / f"seed{seed}")
    else:
        raise ValueError(f"unknown demo search job {name!r}")
    return {"rows": rows, "curve": curve}


def _cross_job(name: str, seed: int, cross_root: str, out: Path, evaluations: int,
               dfs_evaluations: int) -> dict[str, Any]:
    """The CROSS table's searches on the cross zoo: ``cross`` (PS) or ``crossdfs`` (PS and PS+DFS
    as one chained run, A = the PS model, B = lang)."""
    storage = (out / "runs").as_uri()
    key = f"demo-{name}-seed{seed}"
    cross = load_zoo(Path(cross_root))
    if name == "cross":
        result = _run(cross_search_config(cross, seed=seed, evaluations=evaluations, storage=storage, run_key=key),
                      key)
        row = _search_row(result, cross_root, storage, key, out / "evolved" / "cross" / f"seed{seed}")
        return {"rows": {"cross": row}, "curve": None}
    _run(cross_psdfs_search_config(cross, seed=seed, ps_evaluations=evaluations, dfs_evaluations=dfs_evaluations,
                                   storage=storage, run_key=key), key)
    rows = {}
    for index, kind in ((0, "cross"), (1, "cross_psdfs")):
        stage = _stage_result(storage, key, index)
        scores = score_evolved.fn(cross_root, f"{storage}/{key}/stages", str(index),
                                  str(out / "evolved" / kind / f"seed{seed}"))
        rows[kind] = {"scores": scores, "evaluated": stage["evaluations"], "seconds": search_seconds(stage),
                      "cost": stage.get("cost")}
    return {"rows": rows, "curve": None}


def _search_row(result: dict, zoo_root, storage: str, key: str, model_out) -> dict:
    """One searched row of the table: the run's best scored on every test split, and its cost."""
    scores = score_evolved.fn(zoo_root, storage, key, str(model_out))
    return {"scores": scores, "evaluated": result["evaluations"], "seconds": search_seconds(result),
            "cost": result.get("cost")}


def _run(config: dict[str, Any], key: str) -> dict[str, Any]:
    return evolve(config, resume=False, run_key=key)


def search_seconds(result: dict[str, Any]) -> float:
    """Wall seconds of a run's generations (ask, evaluate, tell, checkpoint)."""
    return sum(g.get("seconds", 0.0) for g in result["generations"])


def _stage_result(storage: str, key: str, stage: int) -> dict[str, Any]:
    """`result.json` of one stage of a chained run."""
    from evomerge_core.runs.store import RunStore

    result = RunStore(f"{storage}/{key}/stages", str(stage)).read_json("result.json")
    if result is None:
        raise RuntimeError(f"stage {stage} of {key} wrote no result.json")
    return result
