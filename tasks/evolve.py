"""Prefect tasks of the evolve flow: thin wrappers around `evomerge_core`. Inputs are the parsed
run config and small JSON-able values (paths, genomes); outputs are typed records
(`evomerge_core.runs.records`) or small dicts, never tensors or modules. Task-run inputs are not
sent to the Prefect API, so the config's storage options stay in this process and its workers."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from evomerge_core.runs import layout, resume, retries, search
from evomerge_core.config.schema import RunConfig
from evomerge_core.kinds import run_kind
from evomerge_core.kinds.evaluate import get_evaluator
from evomerge_core.runs.records import CandidateRecord, GenerationSummary, RunResult
from evomerge_core.runs.report import write_report


def _config(config: RunConfig | dict[str, Any]) -> RunConfig:
    """The parsed config (the flow passes it parsed; its JSON form is still accepted)."""
    return config if isinstance(config, RunConfig) else RunConfig.model_validate(config)


@task(name="resolve_sources", cache_policy=NO_CACHE)
def resolve_sources(config: RunConfig) -> dict[str, Any]:
    """Resolve and validate the sources: ``{paths, num_layers, architecture, revisions}``
    (`revisions` key the candidate cache)."""
    cfg = _config(config)
    sources = run_kind(cfg).resolve_sources(cfg)
    return {**sources, "revisions": resume.source_revisions(sources["paths"])}


@task(name="merge_and_evaluate", task_run_name="eval-g{generation}-c{index}", cache_policy=NO_CACHE)
def merge_and_evaluate(config: RunConfig, paths: dict[str, str], genome: list[float], generation: int,
                       index: int, key: str | None = None) -> CandidateRecord:
    """Merge one candidate into this worker's resident model and score it (failures recorded);
    with a candidate `key`, store the record in the run store as soon as it is done."""
    return _evaluate_and_store(_config(config), paths, genome, generation, index, key)


@task(name="evaluate_candidates", task_run_name="eval-g{generation}-c{span}", cache_policy=NO_CACHE)
def evaluate_candidates(config: RunConfig, paths: dict[str, str], genomes: list[list[float]], generation: int,
                        indices: list[int], keys: list[str | None], span: str) -> list[CandidateRecord]:
    """Several candidates in one task run (`runtime.task_runner.candidates_per_task`), one after
    the other on the same resident model; each is stored in the run store as soon as it is done,
    so an interruption loses at most the candidate in progress."""
    cfg = _config(config)
    return [_evaluate_and_store(cfg, paths, genome, generation, index, key)
            for genome, index, key in zip(genomes, indices, keys, strict=True)]


def _evaluate_and_store(cfg: RunConfig, paths: dict[str, str], genome: list[float], generation: int, index: int,
                        key: str | None) -> CandidateRecord:
    if key is not None:  # already stored: Dask re-runs a task whose result died with its worker
        store = resume.store_for(cfg)
        stored = retries.with_retries(lambda: store.get_candidate(key), "read a stored candidate")
        if stored is not None:
            return CandidateRecord.from_dict(stored).at(generation, index)
    record = get_evaluator(cfg, paths).evaluate(genome, generation=generation, index=index)
    if key is not None:
        resume.store_candidate(cfg, key, record)
    return CandidateRecord.from_dict(record)


@task(name="evaluate_round", task_run_name="eval-g{generation}-r{round}-c{span}", cache_policy=NO_CACHE)
def evaluate_round(config: RunConfig, paths: dict[str, str], genomes: list[list[float]], generation: int,
                   indices: list[int], keys: list[str | None], round: int, items: list[int], caps: list[int] | None,
                   span: str) -> list[dict[str, Any]]:
    """One racing round (`fitness.budget`): candidates' per-item values on `items`, each stored
    in the run store when done (a resume reuses it)."""
    cfg = _config(config)
    out = []
    for genome, index, key in zip(genomes, indices, keys, strict=True):
        stored = _stored(cfg, key)
        if stored is None:
            stored = get_evaluator(cfg, paths).evaluate_items(genome, items, generation=generation, index=index,
                                                              max_new_tokens=caps)
            if key is not None:
                resume.store_candidate(cfg, key, stored)
        out.append({**stored, "generation": generation, "index": index})
    return out


@task(name="evaluate_source", task_run_name="calibrate-{source}", cache_policy=NO_CACHE)
def evaluate_source(config: RunConfig, paths: dict[str, str], source: str, index: int, key: str | None,
                    items: list[int]) -> dict[str, Any]:
    """A source model alone on `items` (`fitness.budget.subset.include_sources`: calibration)."""
    from evomerge_core.merge.recipe import MergeRecipe, ModelEntry

    cfg = _config(config)
    stored = _stored(cfg, key)
    if stored is None:
        recipe = MergeRecipe(merge_method="linear", models=[ModelEntry(model=source, parameters={"weight": 1.0})])
        stored = get_evaluator(cfg, paths).evaluate_items(None, items, generation=0, index=index, recipe=recipe)
        if key is not None:
            resume.store_candidate(cfg, key, stored)
    return stored


@task(name="evaluate_full_train", task_run_name="full-train-g{generation}-c{index}", cache_policy=NO_CACHE)
def evaluate_full_train(config: RunConfig, paths: dict[str, str], genome: list[float], generation: int, index: int,
                        key: str | None) -> CandidateRecord:
    """A top candidate on the whole train split (`fitness.budget.final_candidates`)."""
    cfg = _config(config)
    stored = _stored(cfg, key)
    if stored is None:
        stored = get_evaluator(cfg, paths).evaluate(genome, generation=generation, index=index, split="train_full")
        if key is not None:
            resume.store_candidate(cfg, key, stored)
    return CandidateRecord.from_dict(stored)


def _stored(cfg: RunConfig, key: str | None) -> dict[str, Any] | None:
    if key is None:
        return None
    store = resume.store_for(cfg)
    return retries.with_retries(lambda: store.get_candidate(key), "read a stored candidate")


@task(name="checkpoint", task_run_name="checkpoint-g{generation}", cache_policy=NO_CACHE)
def checkpoint(config: RunConfig, generation: int, records: list[CandidateRecord], optimizer_state: dict[str, Any],
               summary: GenerationSummary, best: CandidateRecord | None, evaluations: int,
               extra: dict[str, Any] | None = None) -> None:
    """Write the generation record (with `extra` entries) and `latest.json` to the run store."""
    store = layout.open_store(_config(config))
    search.checkpoint(store, generation, records, optimizer_state, summary, best, evaluations, extra)


@task(name="evaluate_test", cache_policy=NO_CACHE)
def evaluate_test(config: RunConfig, paths: dict[str, str], genome: list[float], generation: int,
                  index: int) -> CandidateRecord:
    """Score a genome on the held-out test split (reporting only, never selection)."""
    return CandidateRecord.from_dict(
        get_evaluator(_config(config), paths).evaluate(genome, generation=generation, index=index, split="test"))


@task(name="evaluate_validation", task_run_name="validate-g{generation}-c{index}", cache_policy=NO_CACHE)
def evaluate_validation(config: RunConfig, paths: dict[str, str], genome: list[float], generation: int,
                        index: int) -> CandidateRecord:
    """Score a generation's best genome on the validation split (`fitness.validation`)."""
    return CandidateRecord.from_dict(get_evaluator(_config(config), paths).evaluate(
        genome, generation=generation, index=index, split="validation"))


@task(name="materialise_best", cache_policy=NO_CACHE)
def materialise_best(config: RunConfig, paths: dict[str, str], num_layers: int, genome: list[float]) -> str:
    """Merge the best genome to `best/` (model dir + recipe.yaml + mergekit.yaml); returns its URL."""
    cfg = _config(config)
    return run_kind(cfg).materialise_best(cfg, paths, num_layers, genome, layout.open_store(cfg))


@task(name="write_result", cache_policy=NO_CACHE)
def write_result(config: RunConfig, result: RunResult | dict[str, Any]) -> str:
    """Write `result.json` and the report (`report/fitness.png`, `report/report.md`)."""
    import tempfile
    from pathlib import Path

    cfg = _config(config)
    content = RunResult.from_dict(result).to_dict()
    store = layout.open_store(cfg)
    if cfg.output.report:
        with tempfile.TemporaryDirectory(prefix="evomerge-report-") as tmp:
            store.put_dir(write_report(Path(tmp) / "report", content, cfg.model_dump(mode="json")), "report")
    retries.with_retries(lambda: store.write_json(layout.RESULT, content), "write result.json")
    return store.url(layout.RESULT)
