"""The scorer registry. A scorer turns a candidate model (and what it generated) into one
number, higher is better. Built-in scorers are lazy ``"module:attr"`` entries, so optional
backends (lm-evaluation-harness) are imported only when used; a user scorer is given as
``my_package.my_module:my_function`` in the config.

A scorer is a callable ``fn(ctx: ScoreContext) -> float | Mapping`` (a mapping holds
``fitness`` and optionally ``accuracy`` and other metrics). Attributes a scorer function may
set: ``worst_fitness`` (recorded for failed candidates), ``is_accuracy`` (its value is an
accuracy), ``needs_dataset`` (False for scorers that bring their own data, e.g. lm-eval),
``checks_logits`` (it raises on NaN/inf logits itself, so the evaluator skips its own check
pass), ``check_options(options)`` (validate options before any model is loaded),
``per_item(ctx) -> list[float]`` (one value per row whose mean is the fitness: what
`fitness.budget` needs to race candidates and pick item subsets).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from evomerge_core.errors import ConfigError
from evomerge_core.generation.hf_loop import greedy_generate
from evomerge_core.registry import Registry

# Fitness recorded for a failed candidate of a user scorer that declares no `worst_fitness`.
DEFAULT_WORST = -1e9

ScorerFn = Callable[["ScoreContext"], Any]

# Named scorers: a lazy "module:function" (imported when used) or the function itself.
SCORERS: Registry[str | ScorerFn] = Registry("scorer", error=ConfigError)
BUILTIN_SCORERS = SCORERS  # the name callers have used


def register_scorer(name: str, scorer: str | ScorerFn) -> None:
    """Make `scorer` (a "module:function" string, imported when used, or a callable) the
    scorer called `name` in configs (`fitness.scorer: name`)."""
    if ":" in name:
        raise ValueError(f"scorer name {name!r} must not contain ':' (that form names a user scorer module:function)")
    SCORERS.add(name, scorer)


register_scorer("math_accuracy", "evomerge_core.fitness.scorers:math_accuracy")
register_scorer("exact_match", "evomerge_core.fitness.scorers:exact_match")
register_scorer("logprob", "evomerge_core.fitness.scorers:answer_logprob")
register_scorer("lmeval", "evomerge_core.fitness.lmeval:lmeval_score")
register_scorer("rouge_l", "evomerge_core.fitness.vqa:rouge_l_score")
register_scorer("vqa_rouge_l", "evomerge_core.fitness.vqa:vqa_rouge_l")


@dataclass
class ScoreContext:
    """Everything a scorer may look at for one candidate.

    `outputs` (greedy generations of `prompts`) are computed on first access and cached, so a
    scorer that never reads them (log-likelihood, a synthetic test scorer) costs no generation.
    """

    model: Any
    tokenizer: Any
    rows: Sequence[Mapping[str, Any]]
    prompts: Sequence[str]
    options: Mapping[str, Any] = field(default_factory=dict)
    recipe: Any = None
    genome: Sequence[float] | None = None
    max_new_tokens: int | Sequence[int] = 64  # or one cap per prompt (fitness.budget.length_caps)
    stop_strings: Sequence[str] = ()
    batch_size: int = 16
    # The VLM's processor (image processor + tokenizer) for image scorers; None for LLMs.
    processor: Any = None
    # Shared by `with_options` clones, so outputs are generated once per candidate.
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def outputs(self) -> list[str]:
        """Greedy generations for `prompts` (computed once)."""
        if "outputs" not in self.cache:
            stats: dict[str, Any] = {}
            self.cache["outputs"] = greedy_generate(
                self.model,
                self.tokenizer,
                list(self.prompts),
                max_new_tokens=self.max_new_tokens,
                stop_strings=tuple(self.stop_strings),
                batch_size=self.batch_size,
                stats=stats,
            )
            self.cache["row_tokens"] = stats["row_tokens"]  # the cost records count (tokens per row)
        return self.cache["outputs"]

    @property
    def answers(self) -> list[Any]:
        """The reference answers (the `answer` column)."""
        return [row.get("answer") for row in self.rows]

    def with_options(self, options: Mapping[str, Any]) -> ScoreContext:
        """The same context (sharing cached outputs) with other scorer options."""
        return dataclasses.replace(self, options=dict(options))


def _flag(attr: str, default: bool, doc: str) -> property:
    """A read-only bool property: the scorer function's attribute `attr`, else `default`."""
    return property(lambda self: bool(getattr(self.fn, attr, default)), doc=doc)


@dataclass(frozen=True)
class Scorer:
    """A resolved scorer and what the evaluator needs to know about it."""

    name: str
    fn: ScorerFn

    @property
    def worst(self) -> float:
        """Fitness recorded for a candidate that failed."""
        return float(getattr(self.fn, "worst_fitness", DEFAULT_WORST))

    is_accuracy = _flag("is_accuracy", False, "True when the scorer's value is itself an accuracy.")
    checks_logits = _flag("checks_logits", False,
                          "True when the scorer raises on NaN/inf logits itself (no separate check pass needed).")
    needs_dataset = _flag("needs_dataset", True, "False for scorers that bring their own data (lm-eval tasks).")
    needs_images = _flag("needs_images", False,
                         "True for scorers of a VLM on image items (they need a source marked vlm: true).")

    @property
    def per_item(self) -> Callable[[ScoreContext], list[float]] | None:
        """The scorer's per-row values (their mean is the fitness), or None when it has none."""
        return getattr(self.fn, "per_item", None)

    def required_columns(self, options: Mapping[str, Any]) -> tuple[str, ...]:
        """Columns every row must have (besides the prompt template's fields)."""
        required = getattr(self.fn, "required_columns", None)
        return tuple(required(options)) if required is not None else ("prompt", "answer")

    def prepare_rows(self, rows: list[dict[str, Any]], spec: Any, where: str, options: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Rows as the scorer needs them (e.g. images opened and checked); as loaded by default."""
        prepare = getattr(self.fn, "prepare_rows", None)
        return prepare(rows, spec, where, options) if prepare is not None else rows

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Validate scorer options before any model is loaded (ConfigError on problems)."""
        check = getattr(self.fn, "check_options", None)
        if check is not None:
            check(dict(options))

    def __call__(self, ctx: ScoreContext) -> dict[str, float]:
        """Run the scorer; always returns a dict with a float `fitness`."""
        value = self.fn(ctx)
        if isinstance(value, Mapping):
            if "fitness" not in value:
                raise ValueError(f"scorer {self.name!r} returned a mapping without a 'fitness' entry")
            return {k: float(v) for k, v in value.items()}
        return {"fitness": float(value)}


def _import_attr(spec: str, what: str) -> Any:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{what}: {spec!r} is not of the form module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{what}: cannot import module {module_name!r} ({exc}); check the name and that it is installed") from None
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"{what}: module {module_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise ConfigError(f"{what}: {spec!r} is not callable")
    return obj


def get_scorer(name: str, *, what: str = "fitness.scorer") -> Scorer:
    """Resolve a built-in scorer name or a user ``module:function``; ConfigError if unknown."""
    if name in SCORERS:
        entry = SCORERS.get(name)
        return Scorer(name, _import_attr(entry, what) if isinstance(entry, str) else entry)
    if ":" in name:
        return Scorer(name, _import_attr(name, what))
    close = SCORERS.close_match(name)
    hint = f" (did you mean {close!r}?)" if close else ""
    raise ConfigError(f"{what}: unknown scorer {name!r}{hint}; use one of {', '.join(SCORERS)} or a user scorer as module:function")


def accuracy_scorer(fitness_config: Any, main: Scorer) -> Scorer | None:
    """The scorer whose value is reported as accuracy (None: report none, or the fitness is one)."""
    choice = fitness_config.accuracy_scorer
    if choice == "none" or main.is_accuracy and choice == "auto":
        return None
    if choice == "auto":
        return get_scorer("exact_match", what="fitness.accuracy_scorer") if main.needs_dataset else None
    return get_scorer(choice, what="fitness.accuracy_scorer")


def validate_scorer(fitness_config: Any) -> None:
    """Config-time checks of the fitness scorer(s): known, importable, options valid, data given."""
    main = get_scorer(fitness_config.scorer)
    main.check_options(fitness_config.options)
    if main.needs_dataset and fitness_config.dataset is None:
        raise ConfigError(f"fitness.dataset is required for scorer {fitness_config.scorer!r}; add a dataset with path and columns")
    acc = accuracy_scorer(fitness_config, main)
    if acc is not None:
        try:
            acc.check_options(fitness_config.accuracy_options)
        except ConfigError as exc:  # the scorers name `fitness.options`; these are the accuracy's
            raise ConfigError(str(exc).replace("fitness.options", "fitness.accuracy_options", 1)) from None
        if acc.needs_dataset and fitness_config.dataset is None:
            raise ConfigError("fitness.dataset is required to report accuracy; add one or set fitness.accuracy_scorer: none")
