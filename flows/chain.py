"""Chained runs (`stages:` in a run config, e.g. the paper's PS+DFS): each stage is a complete
evolve sub-run under ``{run}/stages/{i}/`` (its own config.yaml, generations, result.json,
best/), run as a subflow; a later stage's ``@NAME`` model is the earlier stage's ``best/``.

    for each stage i:
        config_i = the stage's config, @references -> URLs of earlier stages' best models
        result_i = evolve(config_i)            (reused when it already finished and resume is on)
    result.json = the last stage's result + per-stage summaries + lineage
"""

from __future__ import annotations

from typing import Any

from evomerge_core.runs import layout, search
from evomerge_core.config.schema import RunConfig
from evomerge_core.errors import EvomergeError
from evomerge_core.runs.records import RunResult


def run_chain(cfg: RunConfig, *, resume: bool = True) -> dict[str, Any]:
    """Run every stage of a chained config in order; returns the top-level `result.json`."""
    from evomerge.flows.evolve import evolve
    from evomerge.tasks.evolve import write_result

    assert cfg.stages is not None
    search.prepare_run(cfg, resume=resume)
    key = cfg.effective_run_key()
    best_models: dict[int, str] = {}
    results: list[dict[str, Any]] = []
    stages: list[RunConfig] = []
    for i in range(len(cfg.stages)):
        stage = cfg.stage_config(i, best_models)
        stages.append(stage)
        done = layout.open_store(stage).read_json(layout.RESULT) if resume else None
        if done is not None:
            print(f"{key}: stage {i} ({cfg.stage_name(i)}) already finished; reusing its result", flush=True)
            result = done
        else:
            print(f"{key}: stage {i + 1}/{len(cfg.stages)} ({cfg.stage_name(i)}, {stage.space.kind})", flush=True)
            result = evolve(stage, resume=resume, run_key=f"{key}-stage{i}")
        if result.get("best_model") is None:
            raise EvomergeError(f"stage {i} ({cfg.stage_name(i)}) wrote no best model; later stages need it as a source")
        best_models[i] = result["best_model"]
        results.append(result)
    final = RunResult.from_dict(results[-1]).replace(
        run_key=key,
        config_hash=cfg.config_hash(),
        stages=[_stage_summary(cfg, i, s, r) for i, (s, r) in enumerate(zip(stages, results))],
        lineage=[_lineage(cfg, i, s, r) for i, (s, r) in enumerate(zip(stages, results))],
        history=[{"stage": i, **h} for i, r in enumerate(results) for h in r["history"]],
        evaluations=sum(r["evaluations"] for r in results),
    )
    url = write_result(cfg, final)
    print(f"{key}: best fitness {final.best_fitness:.4f} after {len(results)} stages; result: {url}", flush=True)
    return final.to_dict()


def _stage_summary(cfg: RunConfig, index: int, stage: RunConfig, result: dict[str, Any]) -> dict[str, Any]:
    return {
        "stage": index,
        "name": cfg.stage_name(index),
        "kind": stage.space.kind,
        "run_key": f"stages/{index}",
        "best_fitness": result["best_fitness"],
        "best_validation": result.get("best_validation"),
        "best_model": result.get("best_model"),
        "evaluations": result["evaluations"],
    }


def _lineage(cfg: RunConfig, index: int, stage: RunConfig, result: dict[str, Any]) -> dict[str, Any]:
    """What stage `index` combined: its sources (with earlier stages' models as URLs), which
    of them came from an earlier stage, and the recipe it found."""
    refs = cfg.stage_refs(index)
    return {
        "stage": index,
        "name": cfg.stage_name(index),
        "kind": stage.space.kind,
        "sources": [s.model for s in stage.sources],
        "inputs_from_stages": {field: {"stage": s, "name": cfg.stage_name(s)} for field, s in refs.items()},
        "best_recipe": result["best_recipe"],
        "best_model": result.get("best_model"),
    }
