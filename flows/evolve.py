"""The evolve flow: the paper's PS algorithm as a Prefect flow.

    open the run: storage access, lease, resume state (or --no-resume: clear it)
    resolve sources
    for each generation not yet checkpointed:
        genomes = CMA-ES ask
        records = stored evaluations, else merge_and_evaluate mapped (each stored when done)
        CMA-ES tell(fitness); renew the lease; checkpoint (generation + optimizer state, latest.json)
    score the best on the held-out test split; materialise it; write result.json + report

All logic lives in `evomerge_core`; tasks return small records. Re-running the flow with the
same parameters (a new `evomerge evolve`, or `prefect flow-run retry`) continues from the run
store.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from prefect import unmapped

from evomerge.tasks.evolve import (
    checkpoint,
    evaluate_candidates,
    evaluate_test,
    evaluate_validation,
    materialise_best,
    merge_and_evaluate,
    resolve_sources,
    write_result,
)
from evomerge.flows import budget
from evomerge.flows.monitoring import RunMonitor
from evomerge.flows.parameters import config_flow
from evomerge.flows.runners import candidate_runner, candidate_slots, map_candidates
from evomerge_core.runs import search
from evomerge_core.config.schema import RunConfig, parse_run_config
from evomerge_core.runs.records import CandidateRecord, GenerationSummary, RunResult
from evomerge_core.runs.resume import Run, candidate_keys, open_run
from evomerge_core.spaces import build_space


# The config is validated by parse_run_config (its errors name the field and the fix), not by
# Prefect; credential values in it are masked in the flow run's parameters (flows/parameters.py).
@config_flow(name="evolve", flow_run_name="evolve-{run_key}", validate_parameters=False)
def evolve(config: RunConfig, resume: bool = True, run_key: str = "") -> dict[str, Any]:
    """Run an evolutionary merge search; returns the content of `result.json`.

    `config` is a `RunConfig` (its JSON form, `RunConfig.model_dump(mode="json")`, is accepted
    too); `run_key` only names the flow run (the config's effective run key is used when empty).
    """
    cfg = _parsed(config)
    if cfg.stages is not None:  # a chained run (e.g. PS then DFS): one sub-run per stage
        from evomerge.flows.chain import run_chain

        return run_chain(cfg, resume=resume)
    run = open_run(cfg, resume=resume, owner=_lease_owner())
    try:
        with candidate_runner(cfg.runtime):  # Prefect's default runner or Dask workers (runtime.task_runner)
            return _search(cfg, run).to_dict()
    finally:
        run.close()


def _parsed(config: RunConfig | dict[str, Any]) -> RunConfig:
    """The config validated with every static check (`parse_run_config`) from its JSON form, so a
    `RunConfig` and its dump give the same run (same hash, run key and candidate keys)."""
    return parse_run_config(config.model_dump(mode="json") if isinstance(config, RunConfig) else config)


def _lease_owner() -> str:
    """This flow run's id: a retry of the same flow run (`prefect flow-run retry`) may take the
    lease back at once."""
    from prefect.runtime import flow_run

    return f"flow-run-{flow_run.id}" if flow_run.id else f"process-{uuid.uuid4().hex}"


def _search(cfg: RunConfig, run: Run) -> RunResult:
    """The generations from where the run store left off, then the end of the run."""
    store, state = run.store, run.state
    sources = resolve_sources(cfg)
    space = build_space(cfg, num_layers=sources["num_layers"], num_layers_b=sources.get("num_layers_b"))
    optimizer = search.make_optimizer(cfg, space)
    if state.optimizer_state is not None:
        optimizer.load_state_dict(state.optimizer_state)
    total = cfg.generations(optimizer.popsize)
    print(f"evolve {cfg.effective_run_key()}: {space.dim} parameters, population {optimizer.popsize}, "
          f"{total} generations -> {store.url()}", flush=True)
    best = search.make_tracker(cfg)
    for done in state.generations:
        best.update(search.candidate_records(done["candidates"]), done["summary"].get("validation"))
    history: list[CandidateRecord] = search.candidate_records(state.history)
    summaries: list[GenerationSummary] = [GenerationSummary.from_dict(s) for s in state.summaries]
    if run.resumed:
        damaged = " (the newest checkpoint was damaged: fell back one generation)" if state.recovered else ""
        print(f"resuming from generation {state.next_generation + 1}/{total}: {len(history)} evaluations "
              f"restored from checkpoints{damaged}", flush=True)
    counts = {"new": 0, "reused": 0}
    monitor = RunMonitor(cfg.effective_run_key(), total, done=state.next_generation, where=store.url(),
                         summaries=summaries)  # UI artifacts, keys unique to this run store
    budgeted = budget.uses_items(cfg)
    if budgeted:  # fitness.budget: racing / subset / length caps (flows/budget.py)
        from evomerge_core.fitness.evaluator import Fitness

        budget_state = budget.initial_state(cfg, state.generations, len(Fitness(cfg.fitness, split="train").rows))
    for generation in range(state.next_generation, total):
        started = time.perf_counter()
        genomes = optimizer.ask()
        if budgeted:
            records = budget.evaluate_generation(cfg, sources, genomes, generation, run, budget_state,
                                                 optimizer.popsize, counts)
        else:
            records = _evaluate(cfg, sources, genomes, generation, run, counts)
        optimizer.tell(genomes, [r.fitness for r in records])
        history.extend(records)
        validation = None
        top_of_generation = search.generation_best(records)
        if cfg.fitness.validation is not None and top_of_generation is not None:
            validation = evaluate_validation(cfg, sources["paths"], top_of_generation.genome, generation,
                                             top_of_generation.index)
        best.update(records, validation)
        summary = search.summarise_generation(generation, records, time.perf_counter() - started, validation)
        summaries.append(summary)
        run.lease.renew()
        checkpoint(cfg, generation, records, optimizer.state_dict(), summary, best.record, len(history),
                   {"budget": budget_state.to_dict()} if budgeted else None)
        print(search.progress_line(summary, total, best.record.fitness if best.record else None), flush=True)
        monitor.generation(records, summaries, best.record)
    first_error = next((r.error for r in history if r.error), None)
    top = best.require(len(history), first_error)
    checks: list[dict[str, Any]] = []
    if cfg.fitness.budget is not None:  # the best is chosen on the full train split
        top, checks = budget.final_check(cfg, sources, history, counts, optimizer.mean)
    test = None
    if cfg.fitness.test is not None:
        test = evaluate_test(cfg, sources["paths"], top.genome, top.generation, top.index)
    best_url = None
    if cfg.output.materialise_best:
        best_url = materialise_best(cfg, sources["paths"], sources["num_layers"], top.genome)
    result = search.build_result(cfg, space, top, history, summaries, test, best_url)
    if cfg.fitness.budget is not None:
        extra = [budget_state.sources] if budgeted and budget_state.sources else []
        result = result.replace(**budget.result_section(budget_state if budgeted else None, checks),
                                cost=search.run_cost(history, extra + checks))
    url = write_result(cfg, result)
    monitor.finished(store.url("report/fitness.png") if cfg.output.report else None)
    print(f"evaluations: {counts['new']} new, {counts['reused']} reused from the run store, "
          f"{len(state.history)} restored from checkpoints", flush=True)
    print(f"best fitness {top.fitness:.4f} (generation {top.generation + 1}, candidate {top.index}); "
          f"result: {url}", flush=True)
    if cfg.output.publish.repo_id:  # the publish step: only when output.publish.repo_id is set
        from evomerge.flows.publish import publish_run_best

        publish_run_best(cfg.model_dump(mode="json"), best_url, sources["paths"])
    return result


def _evaluate(cfg: RunConfig, sources: dict[str, Any], genomes: list[list[float]], generation: int, run: Run,
              counts: dict[str, int]) -> list[CandidateRecord]:
    """One generation's records: evaluations already in the run store (finished before an
    interruption) are reused; the others are mapped over the workers and stored as they finish."""
    keys = candidate_keys(cfg, sources["revisions"], genomes)
    records: list[CandidateRecord | None] = [
        None if r is None else CandidateRecord.from_dict(r).at(generation, i) for i, r in enumerate(run.cached(keys))
    ]
    todo = [i for i, r in enumerate(records) if r is None]
    batches = [[todo[j] for j in b] for b in cfg.runtime.task_runner.batches(len(todo), candidate_slots())]
    if batches and max(map(len, batches)) == 1:  # a task run per candidate
        futures = map_candidates(merge_and_evaluate, unmapped(cfg), unmapped(sources["paths"]),
                                 [genomes[i] for i in todo], generation=unmapped(generation), index=todo,
                                 key=[keys[i] for i in todo])
        for i, future in zip(todo, futures):
            records[i] = future.result()
    elif batches:  # runtime.task_runner.candidates_per_task > 1: a task run per batch
        futures = map_candidates(evaluate_candidates, unmapped(cfg), unmapped(sources["paths"]),
                                 [[genomes[i] for i in b] for b in batches], generation=unmapped(generation),
                                 indices=batches, keys=[[keys[i] for i in b] for b in batches],
                                 span=[f"{b[0]}-{b[-1]}" if len(b) > 1 else str(b[0]) for b in batches])
        for batch, future in zip(batches, futures):
            for i, record in zip(batch, future.result(), strict=True):
                records[i] = record
    reused = len(genomes) - len(todo)
    counts["new"] += len(todo)
    counts["reused"] += reused
    if reused:
        print(f"reused {reused} of {len(genomes)} evaluations of generation {generation + 1} from the run store",
              flush=True)
    return records  # type: ignore[return-value]
