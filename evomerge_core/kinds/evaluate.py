"""Candidate -> fitness record (PS and DFS spaces; train minibatches, validation and test splits).
A candidate that fails (an exception while merging or scoring, NaN/inf logits, a non-finite fitness) is recorded with the worst fitness and its error,
and the run goes on.

Running out of memory (CUDA or CPU) is not a property of the candidate but of the device and
the settings: recording it as the worst fitness would steer the search away from a genome for
no reason and be reused from the candidate cache on resume. So it stops the run instead
(:class:`CandidateOutOfMemory`, one clear error); every finished evaluation stays in the run
store and the resume evaluates only what had not finished.

`get_evaluator(config, sources)` returns a per-process cached `CandidateEvaluator` (resident
model + fitness items + search space), so mapped tasks do not reload anything per candidate.
"""

from __future__ import annotations

import gc
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from evomerge_core.config.schema import RunConfig
from evomerge_core.errors import EvomergeError
from evomerge_core.fitness.evaluator import Fitness
from evomerge_core.generation.engine import generation_backend
from evomerge_core.kinds.base import Resident, run_kind
from evomerge_core.kinds.cache import CACHE, EVALUATOR
from evomerge_core.runs import faults


class CandidateOutOfMemory(EvomergeError):
    """A candidate's merge or scoring ran out of memory: the run stops (exit code 1) and resumes."""


_OOM_MESSAGES = ("out of memory", "can't allocate memory", "cannot allocate memory", "CUBLAS_STATUS_ALLOC_FAILED")


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA (`torch.OutOfMemoryError`) and CPU (`MemoryError`, torch's allocator error)
    out-of-memory failures."""
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(m.lower() in text.lower() for m in _OOM_MESSAGES)


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def out_of_memory_error(exc: BaseException, *, generation: int, index: int, split: str) -> CandidateOutOfMemory:
    """The one-sentence error that stops a run whose candidate ran out of memory."""
    what = f"candidate g{generation}-c{index}" if split == "train" else f"the {split} evaluation of g{generation}-c{index}"
    detail = (str(exc).strip().splitlines() or [""])[0][:200]
    return CandidateOutOfMemory(
        f"{what} ran out of memory ({type(exc).__name__}: {detail}); the run stopped and keeps every finished "
        "evaluation: lower fitness.batch_size or fitness.max_new_tokens, or use a device with more memory, then run "
        "the same command again to resume")


class CandidateEvaluator:
    """Evaluates genomes of one run on one worker (PS: merged in place into a resident model;
    DFS: run as a layer path through the cached `DataflowModel`)."""

    def __init__(self, config: RunConfig, sources: Mapping[str, str]) -> None:
        self.config = config
        self.sources = dict(sources)
        self.fitness = Fitness(config.fitness, split="train")
        self._splits: dict[str, Fitness] = {}
        self._batches: dict[int, Fitness] = {}
        if config.runtime.torch_threads:
            torch.set_num_threads(config.runtime.torch_threads)
        kind = run_kind(config)
        self.space: Any = kind.build_space(config, self.sources)
        self.num_layers = kind.num_layers(config, self.sources)
        self.runner: Resident = kind.open_model(config, self.sources)

    @property
    def resident(self) -> Any:
        """The model candidates are applied to (`ResidentModel` or the DFS runner)."""
        return self.runner

    def fitness_for(self, split: str, generation: int) -> Fitness:
        """The fitness of a split; for ``train`` with `fitness.minibatch`, the generation's minibatch
        (``train_full``: every train item, the budget's final check)."""
        if split == "train_full":
            return self.fitness
        if split != "train":
            return self.split_fitness(split)
        found = self._batches.get(generation)
        if found is None:
            found = self.fitness.for_generation(generation, seed=self.config.optimizer.seed)
            self._batches = {generation: found}  # generations arrive in order; keep one
        return found

    def evaluate(self, genome: Sequence[float], *, generation: int, index: int, split: str = "train") -> dict[str, Any]:
        """Build and score one genome; a failed candidate is recorded, never raised (running out of
        memory raises `CandidateOutOfMemory`: it stops the run)."""
        started = time.perf_counter()
        fitness = self.fitness_for(split, generation)
        record: dict[str, Any] = {
            "generation": generation,
            "index": index,
            "genome": [float(x) for x in genome],
            "values": None,
            "recipe": None,
            "fitness": None,
            "accuracy": None,
            "metrics": {},
            "n_items": len(fitness.rows),
            "items_evaluated": len(fitness.rows),
            "generated_tokens": 0,
            "seconds": None,
            "error": None,
        }
        if split != "train":
            record["split"] = split
        oom: CandidateOutOfMemory | None = None
        try:
            record["values"] = self.space.describe(genome)
            recipe = self.space.decode(genome)
            record["recipe"] = recipe.to_yaml_dict()
            with self._applied(recipe, fitness):
                scores = fitness.score(self.runner.model, self.runner.tokenizer, recipe=recipe, genome=list(genome),
                                       processor=getattr(self.runner, "processor", None))
            record.update(fitness=scores["fitness"], accuracy=scores["accuracy"], metrics=scores["metrics"],
                          generated_tokens=scores["generated_tokens"])
        except Exception as exc:  # a failed candidate must not end the run
            if is_out_of_memory(exc):  # ... but a device out of memory must (see module docstring)
                oom = out_of_memory_error(exc, generation=generation, index=index, split=split)
            else:
                record.update(fitness=fitness.worst, error=f"{type(exc).__name__}: {exc}",
                              traceback=traceback.format_exc(limit=8))
        if oom is not None:
            _free_memory()  # here, once the failed frames are released
            raise oom
        record["seconds"] = round(time.perf_counter() - started, 4)
        return record

    @contextmanager
    def _applied(self, recipe: Any, fitness: Fitness) -> Iterator[Resident]:
        """The resident model with `recipe` applied, held (its lock) until scoring is done; the
        fault hook runs and the logits are checked first unless the scorer checks them itself."""
        with self.runner.lock, generation_backend(self.config.runtime.generation):
            self.runner.apply(recipe)
            faults.candidate_merged(self.runner.model)
            if not fitness.scorer.checks_logits:  # else the scorer's own forward passes check
                check_logits(self.runner.model, self.runner.tokenizer, fitness.prompts[:1])
            yield self.runner

    def evaluate_items(self, genome: Sequence[float] | None, items: Sequence[int], *, generation: int, index: int,
                       max_new_tokens: Sequence[int] | None = None, recipe: Any = None) -> dict[str, Any]:
        """Per-item values of one genome (or of `recipe`, e.g. a source alone) on the training
        rows at `items` (`fitness.budget`: a racing round or a calibration pass):
        ``{scores, tokens, values, recipe, error, seconds}``. A failed candidate gets the
        scorer's worst value on every item and its error; running out of memory raises."""
        started = time.perf_counter()
        fitness = self.fitness.subset(items)
        out: dict[str, Any] = {"generation": generation, "index": index, "items": list(items), "scores": None,
                               "tokens": [0] * len(items), "values": None, "recipe": None, "error": None}
        try:
            if recipe is None:
                out["values"] = self.space.describe(genome)
                recipe = self.space.decode(genome)
            out["recipe"] = recipe.to_yaml_dict()
            with self._applied(recipe, fitness):
                scored = fitness.score_items(self.runner.model, self.runner.tokenizer, recipe=recipe,
                                             genome=None if genome is None else list(genome),
                                             processor=getattr(self.runner, "processor", None),
                                             max_new_tokens=max_new_tokens)
            out.update(scores=scored["scores"], tokens=scored["tokens"])
        except Exception as exc:  # a failed candidate must not end the run (see module docstring)
            if is_out_of_memory(exc):
                _free_memory()
                raise out_of_memory_error(exc, generation=generation, index=index, split="train") from None
            out.update(scores=[fitness.worst] * len(items), error=f"{type(exc).__name__}: {exc}")
        out["seconds"] = round(time.perf_counter() - started, 4)
        return out

    def split_fitness(self, split: str) -> Fitness:
        """The fitness of ``validation`` or ``test`` (`fitness.validation` / `fitness.test`), loaded on first use."""
        if split not in self._splits:
            self._splits[split] = Fitness(self.config.fitness, split=split)
        return self._splits[split]

    def test_fitness(self) -> Fitness:
        """The held-out fitness (``fitness.test``), loaded on first use."""
        return self.split_fitness("test")


@torch.no_grad()
def check_logits(model: Any, tokenizer: Any, prompts: Sequence[str]) -> None:
    """One forward pass on a prompt; ValueError when the logits hold NaN or inf."""
    text = prompts[0] if prompts else ""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"] or [tokenizer.eos_token_id or 0]
    device = next(model.parameters()).device
    logits = model(input_ids=torch.tensor([ids], device=device)).logits
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("the merged model produces NaN/inf logits")


def get_evaluator(config: RunConfig, sources: Mapping[str, str]) -> CandidateEvaluator:
    """The per-process evaluator of a run (built on first use, then reused; `kinds.cache`)."""
    key = (config.config_hash(), tuple(sorted((k, str(v)) for k, v in sources.items())))
    return CACHE.get(EVALUATOR, key, lambda: CandidateEvaluator(config, sources))


def preflight_run(config: RunConfig) -> None:
    """Checks that need data or local files but no model: load every fitness split the run
    (or each of its stages) uses, and the run kind's checks of sources that are local
    directories already (DFS: that A and B can share a path, SourceError naming the clash).
    Raises before anything is written."""
    stages = [config.stage_config(i) for i in range(len(config.stages))] if config.stages else [config]
    for stage in stages:
        Fitness(stage.fitness, split="train")
        for split, spec in (("validation", stage.fitness.validation), ("test", stage.fitness.test)):
            if spec is not None:
                Fitness(stage.fitness, split=split)
        run_kind(stage).check_local(stage)
