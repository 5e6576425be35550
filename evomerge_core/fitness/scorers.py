"""Built-in scorers: math accuracy (last number + optional script check, the paper's
``acc_ja``), exact match, and the mean answer log-likelihood (a graded fitness for searches
where accuracy is flat)."""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping
from typing import Any

from evomerge_core.errors import ConfigError
from evomerge_core.fitness.registry import ScoreContext
from evomerge_core.fitness.text import SCRIPTS, answer_number, in_script, last_number, numbers_equal
from evomerge_core.generation.hf_loop import answer_logprobs


def check_script_options(options: Mapping[str, Any], allowed: set[str], scorer: str) -> None:
    """Reject unknown options and bad `target_script` / `script_min_fraction` values."""
    for key in options:
        if key not in allowed:
            raise ConfigError(f"fitness.options: unknown option {key!r} for scorer {scorer!r}; allowed: {sorted(allowed)}")
    script = options.get("target_script")
    if script is not None and script not in SCRIPTS:
        raise ConfigError(f"fitness.options.target_script: unknown script {script!r}; choose from {', '.join(SCRIPTS)}")
    frac = options.get("script_min_fraction", 0.5)
    if not isinstance(frac, (int, float)) or not 0 < frac <= 1:
        raise ConfigError(f"fitness.options.script_min_fraction must be in (0, 1], got {frac!r}")


def _script_ok(text: str, options: Mapping[str, Any]) -> bool:
    script = options.get("target_script")
    return script is None or in_script(text, script, float(options.get("script_min_fraction", 0.5)))


def math_correct(output: str, answer: Any, options: Mapping[str, Any] | None = None) -> bool:
    """True when the last number of `output` equals the answer (and, if a target script is
    set, the output is written in it)."""
    options = options or {}
    return numbers_equal(last_number(output), answer_number(answer)) and _script_ok(output, options)


def math_accuracy(ctx: ScoreContext) -> float:
    """Fraction of items whose generated text ends in the right number (paper: acc / acc_ja).

    Options: ``target_script`` (latin | japanese | fullwidth), ``script_min_fraction`` (0.5).
    """
    correct = _math_items(ctx)
    return sum(correct) / len(correct) if correct else 0.0


def _math_items(ctx: ScoreContext) -> list[float]:
    return [float(math_correct(o, a, ctx.options)) for o, a in zip(ctx.outputs, ctx.answers)]


math_accuracy.worst_fitness = 0.0  # type: ignore[attr-defined]
math_accuracy.is_accuracy = True  # type: ignore[attr-defined]
math_accuracy.per_item = _math_items  # type: ignore[attr-defined]
math_accuracy.check_options = lambda o: check_script_options(o, {"target_script", "script_min_fraction"}, "math_accuracy")  # type: ignore[attr-defined]


def _normalise(text: str, ignore_case: bool) -> str:
    text = unicodedata.normalize("NFKC", text).strip()
    return text.casefold() if ignore_case else text


def exact_match(ctx: ScoreContext) -> float:
    """Fraction of items whose generated text (NFKC, stripped) equals the answer.

    Options: ``ignore_case`` (false), ``target_script``, ``script_min_fraction``.
    """
    correct = _exact_items(ctx)
    return sum(correct) / len(correct) if correct else 0.0


def _exact_items(ctx: ScoreContext) -> list[float]:
    ignore_case = bool(ctx.options.get("ignore_case", False))
    return [float(_normalise(o, ignore_case) == _normalise(str(a), ignore_case) and _script_ok(o, ctx.options))
            for o, a in zip(ctx.outputs, ctx.answers)]


exact_match.worst_fitness = 0.0  # type: ignore[attr-defined]
exact_match.is_accuracy = True  # type: ignore[attr-defined]
exact_match.per_item = _exact_items  # type: ignore[attr-defined]
exact_match.check_options = lambda o: check_script_options(o, {"ignore_case", "target_script", "script_min_fraction"}, "exact_match")  # type: ignore[attr-defined]


def answer_logprob(ctx: ScoreContext) -> float:
    """Mean over items of the mean per-token log-probability of the reference answer under
    teacher forcing. Option ``answer_template`` (default ``"{answer}"``) formats the answer
    (e.g. ``" {answer}"`` when the prompt does not end in a space)."""
    values = _logprob_items(ctx)
    return sum(values) / len(values) if values else DEFAULT_LOGPROB_WORST


def _logprob_items(ctx: ScoreContext) -> list[float]:
    """Per-row mean answer log-probabilities; the answer tokens scored go to ``ctx.cache``
    (``scored_tokens``: one forward position each, the cost records count them)."""
    template = str(ctx.options.get("answer_template", "{answer}"))
    answers = [template.format(**row) for row in ctx.rows]
    values = answer_logprobs(ctx.model, ctx.tokenizer, list(ctx.prompts), answers, batch_size=ctx.batch_size)
    ctx.cache["scored_tokens"] = [len(ctx.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers]
    return values


DEFAULT_LOGPROB_WORST = -1e4  # far below any real mean token log-prob (log(1/vocab) ~ -12)


def _check_logprob(options: Mapping[str, Any]) -> None:
    for key in options:
        if key != "answer_template":
            raise ConfigError(f"fitness.options: unknown option {key!r} for scorer 'logprob'; allowed: ['answer_template']")


answer_logprob.worst_fitness = DEFAULT_LOGPROB_WORST  # type: ignore[attr-defined]
answer_logprob.checks_logits = True  # type: ignore[attr-defined]  # answer_logprobs raises on NaN/inf
answer_logprob.per_item = _logprob_items  # type: ignore[attr-defined]
answer_logprob.check_options = _check_logprob  # type: ignore[attr-defined]
