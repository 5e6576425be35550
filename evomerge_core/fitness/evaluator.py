"""A fitness function ready to score models: items loaded once, prompts rendered, scorers
resolved. `Fitness.score(model, tokenizer, recipe=..., genome=...)` returns a small dict."""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Sequence
from typing import Any

from evomerge_core.config.schema import FitnessConfig
from evomerge_core.errors import ConfigError
from evomerge_core.fitness.data import load_items, render_prompts
from evomerge_core.fitness.registry import ScoreContext, accuracy_scorer, get_scorer


SPLITS = {"train": "dataset", "test": "test", "validation": "validation"}


def minibatch_indices(num_rows: int, size: int, *, seed: int, generation: int) -> list[int]:
    """The training items of one generation's minibatch: `size` distinct indices in
    ``range(num_rows)``, sorted, drawn from (`seed`, `generation`) only (the same for every
    candidate of a generation, on every worker and on resume)."""
    if size > num_rows:
        raise ConfigError(f"fitness.minibatch is {size} but fitness.dataset has only {num_rows} items; lower minibatch or remove it")
    # A string seed is hashed with SHA-512 by `random`, independent of PYTHONHASHSEED.
    rng = random.Random(f"evomerge-minibatch:{seed}:{generation}")
    return sorted(rng.sample(range(num_rows), size))


class Fitness:
    """Scores candidate models on one split: ``train`` (selection), ``validation`` (choosing
    the best snapshot, `fitness.validation`) or ``test`` (reports only)."""

    def __init__(self, config: FitnessConfig, *, split: str = "train") -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        self.config = config
        self.split = split
        self.scorer = get_scorer(config.scorer)
        self.accuracy = accuracy_scorer(config, self.scorer)
        field = SPLITS[split]
        spec = getattr(config, field)
        where = f"fitness.{field}"
        if spec is None:
            if split != "train":
                raise ValueError(f"no {split} dataset configured ({where})")
            self.rows: list[dict[str, Any]] = []
        else:
            self.rows = load_items(spec, where=where, template=config.prompt_template,
                                   required=self.scorer.required_columns(config.options))
            self.rows = self.scorer.prepare_rows(self.rows, spec, where, config.options)
        self.prompts = render_prompts(self.rows, config.prompt_template)
        if not math.isfinite(self.worst):  # it is told to CMA-ES for every failed candidate
            where = ("fitness.failure_fitness" if config.failure_fitness is not None
                     else f"scorer {self.scorer.name!r} (its worst_fitness)")
            raise ConfigError(f"{where} is {self.worst}, but a failed candidate's fitness must be a finite number; "
                              "set fitness.failure_fitness to a finite value below any real fitness")
        if split == "train" and config.minibatch is not None and config.minibatch > len(self.rows):
            minibatch_indices(len(self.rows), config.minibatch, seed=0, generation=0)  # raises the ConfigError

    def subset(self, indices: Sequence[int]) -> Fitness:
        """The same fitness on the rows at `indices` only (a view: nothing is reloaded)."""
        view = copy.copy(self)
        view.rows = [self.rows[i] for i in indices]
        view.prompts = [self.prompts[i] for i in indices]
        return view

    def for_generation(self, generation: int, *, seed: int) -> Fitness:
        """This generation's minibatch (`fitness.minibatch`), or self when no minibatch is set."""
        if self.config.minibatch is None or self.split != "train":
            return self
        return self.subset(minibatch_indices(len(self.rows), self.config.minibatch, seed=seed, generation=generation))

    @property
    def worst(self) -> float:
        """Fitness recorded for a failed candidate."""
        if self.config.failure_fitness is not None:
            return float(self.config.failure_fitness)
        return self.scorer.worst

    def context(self, model: Any, tokenizer: Any, *, recipe: Any = None, genome: Sequence[float] | None = None,
                processor: Any = None) -> ScoreContext:
        """A fresh score context for one candidate (`processor`: a VLM's, for image scorers)."""
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
            processor=processor,
        )

    def score(self, model: Any, tokenizer: Any, *, recipe: Any = None, genome: Sequence[float] | None = None,
              processor: Any = None) -> dict[str, Any]:
        """``{fitness, accuracy, metrics, n_items}``; raises ValueError on a non-finite fitness."""
        ctx = self.context(model, tokenizer, recipe=recipe, genome=genome, processor=processor)
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
        return {"fitness": fitness, "accuracy": accuracy, "metrics": result, "n_items": len(self.rows),
                "generated_tokens": generated_tokens(ctx)}

    def score_items(self, model: Any, tokenizer: Any, *, recipe: Any = None, genome: Sequence[float] | None = None,
                    processor: Any = None, max_new_tokens: Sequence[int] | None = None) -> dict[str, Any]:
        """Per-row values of the fitness scorer (their mean is the fitness) and the tokens each
        row cost: ``{scores, tokens}`` (`fitness.budget`; `max_new_tokens`: a cap per row)."""
        per_item = self.scorer.per_item
        if per_item is None:
            raise ValueError(f"scorer {self.scorer.name!r} gives no per-item values (fitness.budget needs them)")
        ctx = self.context(model, tokenizer, recipe=recipe, genome=genome, processor=processor)
        if max_new_tokens is not None:
            ctx.max_new_tokens = list(max_new_tokens)
        caps = self.config.budget.length_caps if self.config.budget is not None else None
        if caps is not None and caps.answer_line and "\n" not in ctx.stop_strings:
            ctx.stop_strings = (*ctx.stop_strings, "\n")  # one-line answers: decided at the line's end
        scores = [float(v) for v in per_item(ctx)]
        bad = [v for v in scores if not math.isfinite(v)]
        if bad:
            raise ValueError(f"scorer {self.scorer.name!r} returned a non-finite per-item value ({bad[0]})")
        return {"scores": scores, "tokens": row_tokens(ctx)}


def row_tokens(ctx: ScoreContext) -> list[int]:
    """Tokens each row cost: generated (decoded) tokens plus answer tokens scored by teacher
    forcing (the log-likelihood scorer), zero for a scorer that did neither."""
    gen = ctx.cache.get("row_tokens") or [0] * len(ctx.rows)
    scored = ctx.cache.get("scored_tokens") or [0] * len(ctx.rows)
    return [int(a) + int(b) for a, b in zip(gen, scored)]


def generated_tokens(ctx: ScoreContext) -> int:
    """All tokens one scoring cost (see `row_tokens`)."""
    return sum(row_tokens(ctx))
