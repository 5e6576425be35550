"""Prefect tasks of the demo: build the toy world, make and score the baseline rows."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from evomerge_core.merge.engine import merge_to_dir
from evomerge_core.runs.store import RunStore
from evomerge_core.toyworld import build_zoo, load_zoo
from evomerge_core.toyworld.demo import CROSS_SIZE, baseline_recipes, cross_baseline_recipes, score_model


@task(name="build-zoo", task_run_name="build-zoo-{size}-s{seed}", cache_policy=NO_CACHE)
def build_toy_world(size: str, seed: int = 0) -> str:
    """Build (or reuse from the cache) the toy world of `size` and zoo `seed`; returns its root directory."""
    return str(build_zoo(size, seed=seed).root)


@task(name="score-source", task_run_name="score-{name}", cache_policy=NO_CACHE)
def score_source(zoo_root: str, name: str) -> dict[str, Any]:
    """Test accuracies of one zoo model."""
    zoo = load_zoo(Path(zoo_root))
    started = time.perf_counter()
    scores = score_model(zoo.models[name], zoo)
    return {"name": name, "kind": "source", "scores": {k: [v] for k, v in scores.items()},
            "evaluated": 0, "seconds": time.perf_counter() - started}


@task(name="score-baseline-merge", task_run_name="merge-{label}", cache_policy=NO_CACHE)
def score_baseline_merge(zoo_root: str, label: str, out_dir: str) -> dict[str, Any]:
    """Merge the experts with one hand-set recipe (the CROSS table's on the cross zoo), then
    score it on every test split."""
    zoo = load_zoo(Path(zoo_root))
    recipe = (cross_baseline_recipes(zoo) if zoo.size == CROSS_SIZE else baseline_recipes(zoo))[label]
    sources = {ref: Path(ref) for ref in recipe.model_names()}
    started = time.perf_counter()
    merged = merge_to_dir(recipe, sources, Path(out_dir), overwrite=True, progress=False)
    scores = score_model(merged, zoo)
    return {"name": f"unoptimised {label}", "kind": "merge", "scores": {k: [v] for k, v in scores.items()},
            "evaluated": 1, "seconds": time.perf_counter() - started}


@task(name="score-evolved", task_run_name="score-evolved-{run_key}", cache_policy=NO_CACHE)
def score_evolved(zoo_root: str, storage: str, run_key: str, local_dir: str) -> dict[str, float]:
    """Fetch a finished run's best model from the run store and score it on every test split."""
    zoo = load_zoo(Path(zoo_root))
    store = RunStore(storage, run_key)
    target = Path(local_dir)
    if target.exists():
        import shutil

        shutil.rmtree(target)
    store.get_dir("best", target)
    return score_model(target, zoo)
