"""Bookkeeping of an evolve run in its run store (Prefect-free; the flow calls these).

Layout under ``{storage}/{run_key}/`` (objects are the run store's checksummed envelopes):
``config.yaml``, ``generations/{g:05d}.json`` (candidates + optimizer state after the
generation's `tell`, i.e. ready to ask the next one), ``latest.json``, ``result.json``,
``best/`` and ``report/``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

from evomerge_core.config.schema import RunConfig
from evomerge_core.errors import EvomergeError
from evomerge_core.optim.cmaes import CMAES
from evomerge_core.runs import faults
from evomerge_core.runs.layout import stored_config
from evomerge_core.runs.records import CandidateRecord, GenerationSummary, RunResult
from evomerge_core.runs.resume import check_before_start
from evomerge_core.runs.retries import with_retries
from evomerge_core.runs.store import RunStore
from evomerge_core.spaces import PSSpace

def prepare_run(config: RunConfig, *, resume: bool = True) -> RunStore:
    """Check the run key may be used (see `check_run_free`) and write the frozen config (no
    lease: `evomerge_core.runs.resume.open_run` is what an evolve run uses)."""
    store = check_run_free(config, resume=resume)
    store.write_config(stored_config(config))
    return store


def check_run_free(config: RunConfig, *, resume: bool = True) -> RunStore:
    """The run store, after checking storage access, that no live run holds the run key, and
    (when resuming) that the stored run may be continued with this config: UsageError for a
    finished run, ConfigError with a diff for a changed config, StorageError otherwise."""
    return check_before_start(config, resume=resume)


def make_optimizer(config: RunConfig, space: PSSpace) -> CMAES:
    """The seeded, bounded CMA-ES of a run over its search space."""
    opt = config.optimizer
    return CMAES(space.x0, sigma0=opt.sigma0, lower=space.lower, upper=space.upper,
                 popsize=opt.popsize, seed=opt.seed)


def _ok(record: Mapping[str, Any]) -> bool:
    return record.get("error") is None and record.get("fitness") is not None and math.isfinite(record["fitness"])


def candidate_records(records: Sequence[Mapping[str, Any]]) -> list[CandidateRecord]:
    """Typed records of candidate dicts (as read from the run store); records pass as they are."""
    return [CandidateRecord.from_dict(r) for r in records]


def generation_best(records: Sequence[CandidateRecord]) -> CandidateRecord | None:
    """The generation's best successful record by training fitness (first wins ties)."""
    return max((r for r in records if r.ok), key=lambda r: r.fitness, default=None)


def summarise_generation(generation: int, records: Sequence[CandidateRecord], seconds: float,
                         validation: Mapping[str, Any] | None = None) -> GenerationSummary:
    """Best / mean fitness of one generation (mean over candidates that did not fail); with
    `validation` (the generation best scored on the validation split) its validation record."""
    good = [r for r in records if r.ok]
    fits = [r.fitness for r in good]
    accs = [r.accuracy for r in good if r.accuracy is not None]
    best = max(good, key=lambda r: r.fitness, default=None)
    return GenerationSummary(
        generation=generation,
        best_fitness=best.fitness if best else None,
        best_index=best.index if best else None,
        mean_fitness=sum(fits) / len(fits) if fits else None,
        best_accuracy=max(accs) if accs else None,
        mean_accuracy=sum(accs) / len(accs) if accs else None,
        failed=len(records) - len(good),
        candidates=len(records),
        seconds=round(seconds, 3),
        validation=_validation_summary(validation) if validation is not None else None,
    )


def _validation_summary(validation: Mapping[str, Any]) -> dict[str, Any]:
    keep = ("generation", "index", "fitness", "accuracy", "n_items", "error")
    return {k: validation.get(k) for k in keep}


class BestTracker:
    """The best successful candidate so far (first one wins ties)."""

    def __init__(self) -> None:
        self.record: CandidateRecord | None = None

    def update(self, records: Sequence[CandidateRecord], validation: Mapping[str, Any] | None = None) -> None:
        """Consider a generation's records, in index order (`validation` is not used here)."""
        for r in records:
            if r.ok and (self.record is None or r.fitness > self.record.fitness):
                self.record = r

    def require(self, evaluated: int, first_error: str | None) -> CandidateRecord:
        """The best record; EvomergeError when every candidate failed."""
        if self.record is None:
            raise EvomergeError(f"all {evaluated} candidates failed, so there is no best model; first error: {first_error}")
        return self.record


class ValidationTracker(BestTracker):
    """`fitness.selection: validation`: each generation's best (by training fitness, which on
    minibatches is noisy and not comparable across generations) is scored on the validation
    split; the run's best is the one with the highest validation fitness (first wins ties)."""

    def update(self, records: Sequence[CandidateRecord], validation: Mapping[str, Any] | None = None) -> None:
        """Consider a generation: its records and its best's validation record."""
        if validation is None or not _ok(validation):
            return
        top = next((r for r in records if r.index == validation["index"]), None)
        if top is None:
            return
        current = self.record.validation["fitness"] if self.record is not None and self.record.validation else None
        if current is None or validation["fitness"] > current:
            self.record = top.replace(validation=_validation_summary(validation))


def make_tracker(config: RunConfig) -> BestTracker:
    """The best-so-far tracker of a run's `fitness.selection`."""
    return ValidationTracker() if config.fitness.selection == "validation" else BestTracker()


def checkpoint(store: RunStore, generation: int, records: Sequence[CandidateRecord], optimizer_state: dict[str, Any],
               summary: GenerationSummary, best: CandidateRecord | None, evaluations: int,
               extra: dict[str, Any] | None = None) -> None:
    """Write the generation record (with `extra` entries, e.g. the budget state), then
    `latest.json` (last, so it only names complete generations); transient storage failures
    are retried (`retries.with_retries`)."""
    latest = _latest_record(generation, best, evaluations)
    record = {"generation": generation, "summary": summary.to_dict(), "candidates": [r.to_dict() for r in records],
              "optimizer_state": optimizer_state, **(extra or {})}
    with_retries(lambda: store.write_generation(generation, record), f"write generation {generation}")
    faults.at("during_checkpoint", generation)
    with_retries(lambda: store.write_latest(latest), f"write latest.json for generation {generation}")
    faults.at("after_generation", generation)


def _latest_record(generation: int, best: CandidateRecord | None, evaluations: int) -> dict[str, Any]:
    return {
        "generation": generation,
        "evaluations": evaluations,
        "best_fitness": best.fitness if best else None,
        "best_genome": best.genome if best else None,
        "best_recipe": best.recipe if best else None,
        "best_generation": best.generation if best else None,
        "best_index": best.index if best else None,
        "written_at": time.time(),
    }


def build_result(config: RunConfig, space: PSSpace, best: CandidateRecord, history: Sequence[CandidateRecord],
                 summaries: Sequence[GenerationSummary], test: Mapping[str, Any] | None,
                 best_url: str | None) -> RunResult:
    """The content of `result.json`."""
    return RunResult(
        run_key=config.effective_run_key(),
        config_hash=config.config_hash(),
        best_fitness=best.fitness,
        best_accuracy=best.get("accuracy"),
        best_genome=best.genome,
        best_values=best.get("values"),
        best_recipe=best.recipe,
        best_generation=best.generation,
        best_index=best.index,
        selection=config.fitness.selection,
        best_validation=best.get("validation"),
        evaluations=len(history),
        cost=run_cost(history),
        space=space.summary(),
        generations=[s.to_dict() for s in summaries],
        test=dict(test) if test is not None else None,
        best_model=best_url,
        history=[
            {"generation": r.generation, "index": r.index, "genome": r.genome, "fitness": r.fitness,
             **{k: r[k] for k in _COST_KEYS if k in r}}
            for r in history
        ],
    )


# What each history entry of result.json carries besides its fitness: its cost, and with
# fitness.budget its full-set estimate and the racing round it stopped after (None: it ran all).
_COST_KEYS = ("items_evaluated", "generated_tokens", "estimate", "raced_out")


def run_cost(history: Sequence[Mapping[str, Any]], extra: Sequence[Mapping[str, Any]] = ()) -> dict[str, int]:
    """Items evaluated and tokens generated by a run's candidates (and `extra` evaluations:
    the budget's calibration of the sources and its final check)."""
    rows = list(history) + list(extra)
    return {"items_evaluated": sum(int(r.get("items_evaluated", r.get("n_items") or 0)) for r in rows),
            "generated_tokens": sum(int(r.get("generated_tokens") or 0) for r in rows)}


def progress_line(summary: Mapping[str, Any], total: int, best_so_far: float | None) -> str:
    """One line per generation for the console."""
    def fmt(v: float | None) -> str:
        return "   n/a" if v is None else f"{v:.4f}"

    failed = f"  failed {summary['failed']}" if summary["failed"] else ""
    return (f"generation {summary['generation'] + 1}/{total}  best {fmt(summary['best_fitness'])}  "
            f"mean {fmt(summary['mean_fitness'])}  best so far {fmt(best_so_far)}  {summary['seconds']:.1f}s{failed}")
