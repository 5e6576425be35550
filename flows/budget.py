"""The evolve flow's budgeted evaluation (`fitness.budget`, docs/budget.md): racing rounds
mapped over the surviving candidates, calibration of the item subset and the length caps,
and the final check of the top candidates on the whole train split. Decisions are in
`evomerge_core.fitness.budget`; every round result is stored in the run store as soon as it is done,
so a resumed run reuses it and races to the same decisions."""

from __future__ import annotations

from typing import Any

from prefect import unmapped

from evomerge.flows.runners import candidate_slots, map_candidates
from evomerge.tasks.evolve import evaluate_full_train, evaluate_round, evaluate_source
from evomerge_core.fitness.budget import plan
from evomerge_core.fitness.budget.racing import run_race
from evomerge_core.config.schema import RunConfig
from evomerge_core.fitness.budget.config import RacingConfig
from evomerge_core.runs.records import MEAN_INDEX, CandidateRecord
from evomerge_core.runs.resume import Run, evaluation_config
from evomerge_core.runs.store import candidate_key


def uses_items(cfg: RunConfig) -> bool:
    """Whether the budget changes how a generation is evaluated (racing, subset or caps)."""
    b = cfg.fitness.budget
    return b is not None and (b.racing is not None or b.subset is not None or b.length_caps is not None)


def initial_state(cfg: RunConfig, generations: list[dict[str, Any]], n_items: int) -> plan.BudgetState:
    """The budget state of the last checkpointed generation, or a fresh one."""
    saved = generations[-1].get("budget") if generations else None
    return plan.BudgetState.from_dict(saved) if saved else plan.BudgetState(n_items=n_items)


def _key(cfg: RunConfig, revisions: dict[str, str], genome: list[float], what: dict[str, Any]) -> str:
    return candidate_key(genome, revisions, {**evaluation_config(cfg), "budget_stage": what})


def calibrate_sources(cfg: RunConfig, sources: dict[str, Any], state: plan.BudgetState, counts: dict[str, int]) -> None:
    """Score each source alone on every train item and add the results to the calibration."""
    refs = [s.model for s in cfg.sources]
    items = list(range(state.n_items))
    keys = [_key(cfg, sources["revisions"], [], {"source": ref}) for ref in refs]
    futures = map_candidates(evaluate_source, unmapped(cfg), unmapped(sources["paths"]), refs,
                             index=[-1 - i for i in range(len(refs))], key=keys, items=unmapped(items))
    results = [f.result() for f in futures]
    fitness = {}
    for ref, res in zip(refs, results):
        if res.get("error"):
            raise RuntimeError(f"source {ref} could not be scored for the budget's calibration: {res['error']}")
        state.calibration.append(res["scores"])
        state.needed.append(res["tokens"])
        fitness[ref] = sum(res["scores"]) / len(res["scores"])
    state.sources = {"items_evaluated": len(items) * len(refs),
                     "generated_tokens": sum(sum(r["tokens"]) for r in results), "fitness": fitness}
    counts["new"] += len(refs)


def evaluate_generation(cfg: RunConfig, sources: dict[str, Any], genomes: list[list[float]], generation: int, run: Run,
                        state: plan.BudgetState, popsize: int, counts: dict[str, int]) -> list[CandidateRecord]:
    """One budgeted generation's records (racing rounds mapped over the surviving candidates)."""
    budget = cfg.fitness.budget
    if generation == 0 and budget.subset is not None and budget.subset.include_sources and not state.sources:
        calibrate_sources(cfg, sources, state, counts)
    items = plan.generation_items(budget, state, generation, cfg.optimizer.seed)
    rounds = plan.rounds_of(budget, generation, items)
    runner = cfg.runtime.task_runner

    def evaluate(alive: list[int], r: int) -> dict[int, dict[str, Any]]:
        keys = [_key(cfg, sources["revisions"], genomes[i], {"items": rounds[r]}) for i in alive]
        cached = run.cached(keys)
        counts["reused"] += sum(c is not None for c in cached)
        counts["new"] += sum(c is None for c in cached)
        batches = [[alive[j] for j in b] for b in runner.batches(len(alive), candidate_slots())]
        by_index = dict(zip(alive, keys))
        futures = map_candidates(evaluate_round, unmapped(cfg), unmapped(sources["paths"]),
                                 [[genomes[i] for i in b] for b in batches], generation=unmapped(generation),
                                 indices=batches, keys=[[by_index[i] for i in b] for b in batches], round=unmapped(r),
                                 items=unmapped(rounds[r]), caps=unmapped(plan.caps_for(state, rounds[r])),
                                 span=[f"{b[0]}-{b[-1]}" if len(b) > 1 else str(b[0]) for b in batches])
        out = {}
        for batch, future in zip(batches, futures):
            for i, res in zip(batch, future.result(), strict=True):
                out[i] = res
        return out

    racing = None if plan.is_calibration(budget, generation) else budget.racing
    results, stopped = run_race(list(range(len(genomes))), rounds, evaluate, popsize // 2, racing,
                                plan.item_weights(state))
    base = [{"generation": generation, "index": i, "genome": [float(x) for x in g], "accuracy": None, "metrics": {}}
            for i, g in enumerate(genomes)]
    from evomerge_core.fitness.registry import get_scorer

    worst = cfg.fitness.failure_fitness if cfg.fitness.failure_fitness is not None else get_scorer(cfg.fitness.scorer).worst
    records = plan.finish_generation(budget, state, generation, base, results, stopped, float(worst))
    if plan.is_calibration(budget, generation) and generation == budget.calibration_generations - 1:
        plan.calibrate(budget, state, seed=cfg.optimizer.seed, max_new_tokens=cfg.fitness.max_new_tokens)
    return [CandidateRecord.from_dict(r) for r in records]


def final_check(cfg: RunConfig, sources: dict[str, Any], history: list[CandidateRecord],
                counts: dict[str, int], mean: list[float] | None = None) -> tuple[CandidateRecord, list[dict[str, Any]]]:
    """Score the final candidates (`plan.final_candidates`; stopped and failed ones are not
    eligible) on the whole train split, and with `final_mean` the CMA-ES mean after the last
    generation (`mean`, record index MEAN_INDEX); the best of them is the run's best. With
    `final_racing` the check is raced and only the candidates left are scored on every item."""
    eligible = [r for r in history if r.error is None and r.raced_out is None and r.fitness is not None]
    top = plan.final_candidates(cfg.fitness, eligible)
    if not top:
        raise RuntimeError("no candidate can be checked on the full train split: every candidate failed")
    if cfg.fitness.budget.final_mean and mean is not None:
        last = max(r.generation for r in history)
        top.append(CandidateRecord(generation=last, index=MEAN_INDEX, genome=[float(x) for x in mean]))
    checks = (_raced_checks if cfg.fitness.budget.final_racing is not None else _full_checks)(cfg, sources, top, counts)
    rows = [{"generation": r.generation, "index": r.index, "budgeted_fitness": r.fitness, "mean": r.index == MEAN_INDEX,
             "genome": r.genome, "fitness": c.fitness, "estimate": c.estimate, "error": c.error,
             "raced_out": c.raced_out,
             "items_evaluated": c.get("items_evaluated", 0), "generated_tokens": c.get("generated_tokens", 0)}
            for r, c in zip(top, checks)]
    ok = [(r, c) for r, c in zip(top, checks) if c.error is None and c.raced_out is None]
    if not ok:
        raise RuntimeError(f"every final candidate failed on the full train split; first error: {checks[0].error}")
    best, check = max(ok, key=lambda rc: rc[1].fitness)  # first wins ties
    if best.index == MEAN_INDEX:  # never evaluated before: its full-train record is all there is
        chosen = check.replace(generation=best.generation, index=MEAN_INDEX, raced_out=None)
    else:
        chosen = best.replace(fitness=check.fitness, accuracy=check.get("accuracy"), budgeted_fitness=best.fitness)
    return chosen, rows


def _full_checks(cfg: RunConfig, sources: dict[str, Any], top: list[CandidateRecord],
                 counts: dict[str, int]) -> list[CandidateRecord]:
    """Each final candidate scored on every train item."""
    keys = [_key(cfg, sources["revisions"], r.genome, {"final": True}) for r in top]
    futures = map_candidates(evaluate_full_train, unmapped(cfg), unmapped(sources["paths"]), [r.genome for r in top],
                             generation=[r.generation for r in top], index=[r.index for r in top], key=keys)
    checks: list[CandidateRecord] = [f.result() for f in futures]
    counts["new"] += len(checks)
    return checks


def _raced_checks(cfg: RunConfig, sources: dict[str, Any], top: list[CandidateRecord],
                  counts: dict[str, int]) -> list[CandidateRecord]:
    """The final check in racing rounds over every train item (a seeded order): a candidate
    beaten by one other with `final_racing.confidence` stops (raced_out: the round); the ones
    left see every item, and their fitness is the mean over all of them."""
    from evomerge_core.fitness.evaluator import Fitness  # deferred: loads torch, as in flows/evolve

    final = cfg.fitness.budget.final_racing
    n_items = len(Fitness(cfg.fitness, split="train").rows)
    rounds = plan.final_rounds(n_items, final.slice, cfg.optimizer.seed)

    def evaluate(alive: list[int], r: int) -> dict[int, dict[str, Any]]:
        keys = [_key(cfg, sources["revisions"], top[i].genome, {"final_items": rounds[r]}) for i in alive]
        counts["new"] += len(alive)
        futures = map_candidates(evaluate_round, unmapped(cfg), unmapped(sources["paths"]),
                                 [[top[i].genome] for i in alive], generation=[top[i].generation for i in alive],
                                 indices=[[top[i].index] for i in alive], keys=[[k] for k in keys], round=unmapped(r),
                                 items=unmapped(rounds[r]), caps=unmapped(None),
                                 span=[f"final-{top[i].index}" for i in alive])
        return {i: f.result()[0] for i, f in zip(alive, futures)}

    racing = RacingConfig(slice=final.slice, confidence=final.confidence, min_items=min(final.slice, n_items))
    results, stopped = run_race(list(range(len(top))), rounds, evaluate, 1, racing)
    checks = []
    for i, record in enumerate(top):
        done = results[i]
        scores = [v for res in done for v in res["scores"]]
        error = next((res["error"] for res in done if res.get("error")), None)
        first = done[0] if done else {}
        raced_out = stopped.get(i) if error is None else None
        partial = sum(scores) / len(scores) if scores else None
        checks.append(CandidateRecord(
            generation=record.generation, index=record.index, genome=record.genome, values=first.get("values"),
            recipe=first.get("recipe"), fitness=partial if raced_out is None else None, estimate=partial,
            error=error, n_items=len(scores), items_evaluated=len(scores),
            generated_tokens=sum(t for res in done for t in res["tokens"]), raced_out=raced_out))
    return checks


def result_section(state: plan.BudgetState | None, checks: list[dict[str, Any]]) -> dict[str, Any]:
    """What `result.json` says about the budget: the final check, the subset, the sources' calibration."""
    section: dict[str, Any] = {"final_check": checks}
    if state is not None:
        section.update(subset=state.subset, caps=state.caps, calibration_sources=state.sources or None)
    return {"budget": section}
