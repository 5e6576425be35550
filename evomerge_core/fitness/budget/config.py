"""The ``fitness.budget`` section of a run config (validated at load; off when absent)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RacingConfig(_Strict):
    """Racing inside a generation: rounds of `slice` items over the surviving candidates; a
    candidate stops once at least mu (CMA-ES's parents) others beat it with `confidence`."""

    slice: int = Field(default=10, ge=1)  # items per round
    confidence: float = Field(default=0.95, gt=0.5, lt=1.0)  # one-sided, per paired comparison
    min_items: int = Field(default=10, ge=2)  # no candidate stops before it saw this many items
    # Without a subset: at most this many items per generation, a fresh seeded draw each
    # generation (None: every train item); survivors see them all, stopped candidates fewer.
    max_items: int | None = Field(default=None, ge=2)


class SubsetConfig(_Strict):
    """An informative item subset, chosen once after the calibration generations."""

    size: int = Field(ge=1)  # items evaluated per candidate (before racing stops some)
    # irt: the most informative items of a 2PL / linear item model, full-set estimate from it;
    # anchors: one item per cluster of alike items, weighted by cluster size (tinyBenchmarks);
    # random: a seeded draw, plain mean
    method: Literal["irt", "anchors", "random"] = "irt"
    include_sources: bool = True  # score each source model alone on the full train split too


class LengthCapsConfig(_Strict):
    """Per-item `max_new_tokens` from what the calibration models needed."""

    margin: float = Field(default=1.5, ge=1.0)  # cap = ceil(margin * most tokens needed) + extra
    extra: int = Field(default=2, ge=0)
    # Stop a row at the end of its answer line (the scorer's answer is then decided): only
    # where the answer format is one line (e.g. "... = 42" then newline).
    answer_line: bool = False


class FinalRacingConfig(_Strict):
    """The final check raced: the final candidates are scored on the train split in rounds of
    `slice` items (a seeded order); one beaten by another with `confidence` stops; the ones
    left are scored on every item and the best of them is the run's best."""

    slice: int = Field(default=40, ge=2)
    confidence: float = Field(default=0.8, gt=0.5, lt=1.0)


class BudgetConfig(_Strict):
    """`fitness.budget`: what saves evaluations (every part is optional)."""

    racing: RacingConfig | None = None
    subset: SubsetConfig | None = None
    length_caps: LengthCapsConfig | None = None
    # Generations scored on the full train split (no racing) to fit the subset / the caps.
    calibration_generations: int = Field(default=1, ge=1)
    # The run's best: this many candidates are scored on the full train split at the end, and
    # the best of those is chosen: the top ones by budgeted fitness when every generation saw
    # the same items, else (fresh draws, minibatches) the winners of the last generations,
    # since estimates on different items do not compare (an easy draw lifts a generation).
    final_candidates: int = Field(default=3, ge=1)
    # Also score the CMA-ES distribution's mean after the last generation on the full train
    # split, as one more final candidate: under noisy (budgeted) fitness the mean, which
    # averages many candidates, is often better than any single evaluated one.
    final_mean: bool = False
    final_racing: FinalRacingConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _true_means_defaults(cls, value: Any) -> Any:
        if isinstance(value, dict):
            value = dict(value)
            for key in ("racing", "length_caps", "final_racing"):
                if value.get(key) is True:
                    value[key] = {}
                elif value.get(key) is False:
                    value[key] = None
        return value

    @property
    def calibrates(self) -> bool:
        """Whether the first generations are calibration generations (subset or caps set)."""
        return self.subset is not None or self.length_caps is not None
