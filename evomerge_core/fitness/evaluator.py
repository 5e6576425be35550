"""A fitness function ready to score models: items loaded once, prompts rendered, scorers
resolved. `Fitness.score(model, tokenizer, recipe=..., genome=...)` returns a small dict."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from evomerge_core.config import FitnessConfig
from evomerge_core.fitness.data import load_items, render_prompts
from evomerge_core.fitness.registry import ScoreContext, accuracy_scorer, get_scorer


class Fitness:
    """Scores candidate models on one split (``train`` for selection, ``test`` for reports)."""

    def __init__(self, config: FitnessConfig, *, split: str = "train") -> None:
        self.config = config
        self.split = split
        self.scorer = get_scorer(config.scorer)
        self.accuracy = accuracy_scorer(config, self.scorer)
        spec = config.dataset if split == "train" else config.test
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        where = "fitness.dataset" if split == "train" else "fitness.test"
        if spec is None:
            if split == "test":
                raise ValueError("no test dataset configured (fitness.test)")
            self.rows: list[dict[str, Any]] = []
        else:
            self.rows = load_items(spec, where=where, template=config.prompt_template)
        self.prompts = render_prompts(self.rows, config.prompt_template)

    @property
    def worst(self) -> float:
        """Fitness recorded for a failed candidate."""
        if self.config.failure_fitness is not None:
            return float(self.config.failure_fitness)
        return self.scorer.worst

    def context(self, model: Any, tokenizer: Any, *, recipe: Any = None, genome: Sequence[float] | None = None) -> ScoreContext:
        """A fresh score context for one candidate."""
        return ScoreContext(
            model=model,
            tokenizer=tokenizer,
            rows=self.rows,
            prompts=self.prompts,
            options=dict(self.config.options),
            recipe=recipe,
            genome=list(genome) if genome is not None else None,
            max_new_tokens=self.config.max_new_tokens,
            stop_strings=tuple(self.config.stop_strings),
            batch_size=self.config.batch_size,
        )

    def score(self, model: Any, tokenizer: Any, *, recipe: Any = None, genome: Sequence[float] | None = None) -> dict[str, Any]:
        """``{fitness, accuracy, metrics, n_items}``; raises ValueError on a non-finite fitness."""
        ctx = self.context(model, tokenizer, recipe=recipe, genome=genome)
        result = self.scorer(ctx)
        fitness = result.pop("fitness")
        if not math.isfinite(fitness):
            raise ValueError(f"scorer {self.scorer.name!r} returned a non-finite fitness ({fitness})")
        accuracy = result.pop("accuracy", None)
        if accuracy is None:
            if self.scorer.is_accuracy:
                accuracy = fitness
            elif self.accuracy is not None:
                accuracy = self.accuracy(ctx.with_options(self.config.accuracy_options))["fitness"]
        return {"fitness": fitness, "accuracy": accuracy, "metrics": result, "n_items": len(self.rows)}
