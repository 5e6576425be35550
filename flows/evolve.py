"""The evolve flow: the paper's PS algorithm as a Prefect flow.

    resolve sources
    for each generation:
        genomes = CMA-ES ask
        records = merge_and_evaluate mapped over the population
        CMA-ES tell(fitness); checkpoint (generation record + optimizer state, latest.json)
    score the best on the held-out test split; materialise it; write result.json + report

All logic lives in `evomerge_core`; tasks return small records.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, unmapped

from evomerge.tasks.evolve import (
    checkpoint,
    evaluate_test,
    evaluate_validation,
    materialise_best,
    merge_and_evaluate,
    resolve_sources,
    write_result,
)
from evomerge_core import evolution
from evomerge_core.config import RunConfig, parse_run_config
from evomerge_core.spaces import build_space


@flow(name="evolve", flow_run_name="evolve-{run_key}", validate_parameters=False)
def evolve(config: dict[str, Any], resume: bool = True, run_key: str = "") -> dict[str, Any]:
    """Run an evolutionary merge search; returns the content of `result.json`.

    `config` is a run config as a dict (`RunConfig.model_dump(mode="json")`); `run_key` only
    names the flow run (the config's effective run key is used when empty).
    """
    cfg: RunConfig = parse_run_config(config)
    if cfg.stages is not None:  # a chained run (e.g. PS then DFS): one sub-run per stage
        from evomerge.flows.chain import run_chain

        return run_chain(cfg, resume=resume)
    config = cfg.model_dump(mode="json")
    store = evolution.prepare_run(cfg, resume=resume)
    sources = resolve_sources(config)
    space = build_space(cfg, num_layers=sources["num_layers"], num_layers_b=sources.get("num_layers_b"))
    optimizer = evolution.make_optimizer(cfg, space)
    total = cfg.generations(optimizer.popsize)
    print(f"evolve {cfg.effective_run_key()}: {space.dim} parameters, population {optimizer.popsize}, "
          f"{total} generations -> {store.url()}", flush=True)
    best = evolution.make_tracker(cfg)
    history: list[dict[str, Any]] = []
    summaries: list[dict[str, Any]] = []
    for generation in range(total):
        started = time.perf_counter()
        genomes = optimizer.ask()
        futures = merge_and_evaluate.map(unmapped(config), unmapped(sources["paths"]), genomes,
                                         generation=unmapped(generation), index=list(range(len(genomes))))
        records = [f.result() for f in futures]
        optimizer.tell(genomes, [r["fitness"] for r in records])
        history.extend(records)
        validation = None
        top_of_generation = evolution.generation_best(records)
        if cfg.fitness.validation is not None and top_of_generation is not None:
            validation = evaluate_validation(config, sources["paths"], top_of_generation["genome"], generation,
                                             top_of_generation["index"])
        best.update(records, validation)
        summary = evolution.summarise_generation(generation, records, time.perf_counter() - started, validation)
        summaries.append(summary)
        checkpoint(config, generation, records, optimizer.state_dict(), summary, best.record, len(history))
        print(evolution.progress_line(summary, total, best.record["fitness"] if best.record else None), flush=True)
    first_error = next((r["error"] for r in history if r.get("error")), None)
    top = best.require(len(history), first_error)
    test = None
    if cfg.fitness.test is not None:
        test = evaluate_test(config, sources["paths"], top["genome"], top["generation"], top["index"])
    best_url = None
    if cfg.output.materialise_best:
        best_url = materialise_best(config, sources["paths"], sources["num_layers"], top["genome"])
    result = evolution.build_result(cfg, space, top, history, summaries, test, best_url)
    url = write_result(config, result)
    print(f"best fitness {top['fitness']:.4f} (generation {top['generation'] + 1}, candidate {top['index']}); "
          f"result: {url}", flush=True)
    return result
