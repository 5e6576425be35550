"""The VLM rows of the demo (issue 7): the toy EvoVLM pair scored on EN and JA test.

    build (or reuse) the VLM toy world: a tiny LLaVA that answers in EN + the JA expert `lang`
    score the source VLM and the unoptimised TIES merge on EN and JA test
    for each search seed: run the real `evolve` flow (PS over the VLM's language model and
    `lang`, selection on JA train only) and score its best
    -> rows for the demo's VLM table

`evomerge.flows.demo` calls `vlm_rows`; each row is ``{"name", "kind" (source | merge |
evolved), "scores": {"ja": [per seed], "en": [...]}, "evaluated", "seconds"}``.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from evomerge.flows.evolve import evolve
from evomerge_core.runs.store import RunStore
from evomerge_core.toyworld.vlm import (
    DEFAULT_VLM_EVALUATIONS,
    VLMZoo,
    build_vlm_zoo,
    score_vlm_dir,
    vlm_baseline_recipes,
    vlm_search_config,
    vlm_search_label,
)

__all__ = ["DEFAULT_VLM_EVALUATIONS", "vlm_evolved_row", "vlm_fixed_rows", "vlm_rows", "vlm_seed"]


def _zoo(size: str) -> VLMZoo:
    return build_vlm_zoo(llm_size=size, progress=False)  # cached after the first build


@task(name="build-vlm-zoo", task_run_name="build-vlm-zoo-{size}", cache_policy=NO_CACHE)
def build_vlm_world(size: str) -> str:
    """Build (or reuse from the cache) the VLM toy world; returns its root directory."""
    return str(build_vlm_zoo(llm_size=size, progress=True).root)


@task(name="score-source-vlm", task_run_name="score-source-vlm-{size}", cache_policy=NO_CACHE)
def score_source_vlm(size: str) -> dict[str, Any]:
    """EN and JA test scores of the source VLM."""
    started = time.perf_counter()
    zoo = _zoo(size)
    scores = score_vlm_dir(zoo.models["vlm"], zoo)
    return {"name": "source VLM (tiny LLaVA, answers in EN)", "kind": "source",
            "scores": {k: [v] for k, v in scores.items()}, "evaluated": 0, "seconds": time.perf_counter() - started}


@task(name="score-vlm-baseline", task_run_name="vlm-merge-{label}", cache_policy=NO_CACHE)
def score_vlm_baseline(size: str, label: str, out_dir: str) -> dict[str, Any]:
    """Merge `lang` into the VLM with one hand-set recipe, then score it on EN and JA test."""
    from evomerge_core.kinds.vlm import merge_vlm_to_dir

    started = time.perf_counter()
    zoo = _zoo(size)
    recipe = vlm_baseline_recipes(zoo)[label]
    sources = {ref: Path(ref) for ref in recipe.model_names()}
    merged = merge_vlm_to_dir(recipe, sources, Path(out_dir), vlm=str(zoo.models["vlm"]), overwrite=True)
    scores = score_vlm_dir(merged, zoo)
    return {"name": f"unoptimised {label}", "kind": "merge", "scores": {k: [v] for k, v in scores.items()},
            "evaluated": 1, "seconds": time.perf_counter() - started}


@task(name="score-evolved-vlm", task_run_name="score-evolved-vlm-{run_key}", cache_policy=NO_CACHE)
def score_evolved_vlm(size: str, storage: str, run_key: str, local_dir: str) -> dict[str, float]:
    """Fetch a finished VLM run's best model from the run store and score it on EN and JA test."""
    target = Path(local_dir)
    if target.exists():
        shutil.rmtree(target)
    RunStore(storage, run_key).get_dir("best", target)
    return score_vlm_dir(target, _zoo(size))


def vlm_fixed_rows(out: Path, *, size: str = "demo") -> list[dict[str, Any]]:
    """Build (or reuse) the VLM toy world; the rows of the source VLM and the unoptimised TIES
    merge (models under ``out/vlm/baselines``)."""
    root = Path(out).resolve() / "vlm"
    build_vlm_world(size)
    zoo = _zoo(size)
    rows: list[dict[str, Any]] = [score_source_vlm(size)]
    for label in vlm_baseline_recipes(zoo):
        slug = label.split(" ")[0].lower()
        rows.append(score_vlm_baseline(size, label, str(root / "baselines" / slug)))
    return rows


def vlm_seed(out: Path, *, size: str, seed: int, evaluations: int) -> dict[str, Any]:
    """One seed's VLM search (the real `evolve` flow) with its best scored on EN and JA test:
    ``{"scores": {"ja", "en"}, "evaluated", "seconds"}``."""
    root = Path(out).resolve() / "vlm"
    zoo = _zoo(size)
    storage = (root / "runs").as_uri()
    run_key = f"demo-vlm-{size}-seed{seed}"
    started = time.perf_counter()
    result = evolve(vlm_search_config(zoo, seed=seed, evaluations=evaluations, storage=storage, run_key=run_key),
                    resume=False, run_key=run_key)
    seconds = time.perf_counter() - started
    scores = score_evolved_vlm.fn(size, storage, run_key, str(root / "evolved" / f"seed{seed}"))
    return {"scores": scores, "evaluated": result["evaluations"], "seconds": seconds}


def vlm_evolved_row(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The evolved row of the VLM table from the `vlm_seed` results of every seed."""
    seeds = len(results)
    scores: dict[str, list[float]] = {}
    for result in results:
        for lang, value in result["scores"].items():
            scores.setdefault(lang, []).append(value)
    return {"name": f"evolved PS ({vlm_search_label()}, {seeds} seed{'s' if seeds > 1 else ''})",
            "kind": "evolved", "scores": scores, "evaluated": sum(r["evaluated"] for r in results) // seeds,
            "seconds": sum(r["seconds"] for r in results) / seeds}


@flow(name="demo-vlm", validate_parameters=False)
def vlm_rows(out: Path, *, seeds: int, evaluations: int = DEFAULT_VLM_EVALUATIONS, size: str = "demo") -> list[dict[str, Any]]:
    """The demo's VLM rows (source VLM, unoptimised TIES, evolved PS over `seeds` search
    seeds, one after another); models and runs are written under ``out/vlm/``. `size` is the
    LLM zoo size: ``demo`` or ``micro`` (a quick VLM for tests, numbers not meaningful).
    `evomerge.flows.demo` uses the same pieces and runs the seeds side by side."""
    if seeds < 1 or evaluations < 1:
        from evomerge_core.errors import UsageError

        raise UsageError(f"the VLM demo needs at least one seed and one evaluation (got seeds={seeds}, evaluations={evaluations})")
    rows = vlm_fixed_rows(out, size=size)
    results = [vlm_seed(out, size=size, seed=seed, evaluations=evaluations) for seed in range(seeds)]
    return rows + [vlm_evolved_row(results)]
