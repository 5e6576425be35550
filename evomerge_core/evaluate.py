"""Candidate -> fitness record. A candidate that fails (an exception while merging or
scoring, NaN/inf logits, a non-finite fitness) is recorded with the worst fitness and its error,
and the run goes on.

`get_evaluator(config, sources)` returns a per-process cached `CandidateEvaluator` (resident
model + fitness items + search space), so mapped tasks do not reload anything per candidate.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from evomerge_core.config import RunConfig
from evomerge_core.fitness.evaluator import Fitness
from evomerge_core.io import read_config
from evomerge_core.architectures import num_hidden_layers
from evomerge_core.resident import ResidentModel, get_resident
from evomerge_core.spaces import PSSpace, build_space


class CandidateEvaluator:
    """Evaluates genomes of one run on one worker."""

    def __init__(self, config: RunConfig, sources: Mapping[str, str]) -> None:
        self.config = config
        self.sources = dict(sources)
        reference = config.base or config.sources[0].model
        from pathlib import Path

        self.num_layers = num_hidden_layers(read_config(Path(self.sources[reference])))
        self.space: PSSpace = build_space(config, num_layers=self.num_layers)
        self.fitness = Fitness(config.fitness, split="train")
        self._test: Fitness | None = None
        if config.runtime.torch_threads:
            torch.set_num_threads(config.runtime.torch_threads)
        self.resident: ResidentModel = get_resident(
            self.sources, reference=reference, num_layers=self.num_layers,
            dtype=config.runtime.dtype, device=config.runtime.device,
        )

    def evaluate(self, genome: Sequence[float], *, generation: int, index: int, split: str = "train") -> dict[str, Any]:
        """Merge and score one genome; never raises for a candidate failure."""
        started = time.perf_counter()
        fitness = self.fitness if split == "train" else self.test_fitness()
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
            "seconds": None,
            "error": None,
        }
        try:
            record["values"] = self.space.describe(genome)
            recipe = self.space.decode(genome)
            record["recipe"] = recipe.to_yaml_dict()
            with self.resident.lock:
                self.resident.apply(recipe)
                check_logits(self.resident.model, self.resident.tokenizer, fitness.prompts[:1])
                scores = fitness.score(self.resident.model, self.resident.tokenizer, recipe=recipe, genome=list(genome))
            record.update(fitness=scores["fitness"], accuracy=scores["accuracy"], metrics=scores["metrics"])
        except Exception as exc:  # a failed candidate must not end the run
            record.update(fitness=fitness.worst, error=f"{type(exc).__name__}: {exc}",
                          traceback=traceback.format_exc(limit=8))
        record["seconds"] = round(time.perf_counter() - started, 4)
        return record

    def test_fitness(self) -> Fitness:
        """The held-out fitness (``fitness.test``), loaded on first use."""
        if self._test is None:
            self._test = Fitness(self.config.fitness, split="test")
        return self._test


@torch.no_grad()
def check_logits(model: Any, tokenizer: Any, prompts: Sequence[str]) -> None:
    """One forward pass on a prompt; ValueError when the logits hold NaN or inf."""
    text = prompts[0] if prompts else ""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"] or [tokenizer.eos_token_id or 0]
    device = next(model.parameters()).device
    logits = model(input_ids=torch.tensor([ids], device=device)).logits
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("the merged model produces NaN/inf logits")


_EVALUATORS: dict[tuple[str, tuple[tuple[str, str], ...]], CandidateEvaluator] = {}
_EVALUATORS_LOCK = threading.Lock()


def get_evaluator(config: RunConfig, sources: Mapping[str, str]) -> CandidateEvaluator:
    """The per-process evaluator of a run (built on first use, then reused)."""
    key = (config.config_hash(), tuple(sorted((k, str(v)) for k, v in sources.items())))
    with _EVALUATORS_LOCK:
        found = _EVALUATORS.get(key)
        if found is None:
            _EVALUATORS.clear()
            found = CandidateEvaluator(config, sources)
            _EVALUATORS[key] = found
        return found


def clear_evaluators() -> None:
    """Forget cached evaluators (tests; frees the resident model)."""
    from evomerge_core.resident import clear_resident_cache

    with _EVALUATORS_LOCK:
        _EVALUATORS.clear()
    clear_resident_cache()
