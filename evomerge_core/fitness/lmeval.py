"""lm-evaluation-harness as a fitness: run one lm-eval task on the in-memory candidate.

Optional extra: ``pip install evomerge[lmeval]``. Local task YAML files work offline: put
them in a directory and pass it as ``include_path``.

Options: ``task`` (required), ``metric`` (default ``acc``), ``filter`` (default ``none``),
``include_path``, ``limit``, ``num_fewshot``, ``batch_size``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from evomerge_core.errors import ConfigError
from evomerge_core.fitness.registry import ScoreContext

_OPTIONS = {"task", "metric", "filter", "include_path", "limit", "num_fewshot", "batch_size"}


def require_lm_eval() -> Any:
    """Import lm_eval or raise a ConfigError naming the extra to install."""
    try:
        import lm_eval  # deferred: lm-eval is optional (the lmeval extra)
    except ImportError:
        raise ConfigError(
            "the lmeval scorer needs lm-evaluation-harness, which is not installed; run: pip install evomerge[lmeval]"
        ) from None
    return lm_eval


def _check(options: Mapping[str, Any]) -> None:
    for key in options:
        if key not in _OPTIONS:
            raise ConfigError(f"fitness.options: unknown option {key!r} for scorer 'lmeval'; allowed: {sorted(_OPTIONS)}")
    if not options.get("task"):
        raise ConfigError("fitness.options.task is required for the lmeval scorer (an lm-eval task name)")
    require_lm_eval()


def lmeval_score(ctx: ScoreContext) -> dict[str, float]:
    """Evaluate the candidate on one lm-eval task; fitness = the chosen metric."""
    lm_eval = require_lm_eval()
    from lm_eval.models.huggingface import HFLM  # deferred: lm-eval is optional (the lmeval extra)
    from lm_eval.tasks import TaskManager  # deferred: lm-eval is optional (the lmeval extra)

    opts = dict(ctx.options)
    task = str(opts["task"])
    metric = str(opts.get("metric", "acc"))
    filt = str(opts.get("filter", "none"))
    lm = HFLM(pretrained=ctx.model, tokenizer=ctx.tokenizer, batch_size=int(opts.get("batch_size", ctx.batch_size)))
    manager = TaskManager(include_path=opts.get("include_path"))
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=[task],
        task_manager=manager,
        limit=opts.get("limit"),
        num_fewshot=opts.get("num_fewshot"),
        log_samples=False,
    )
    metrics = results["results"][task]
    key = f"{metric},{filt}"
    if key not in metrics:
        raise ValueError(f"lm-eval task {task!r} reported no metric {key!r}; it has {sorted(metrics)}")
    value = float(metrics[key])
    return {"fitness": value, "accuracy": value}


lmeval_score.worst_fitness = 0.0  # type: ignore[attr-defined]
lmeval_score.is_accuracy = True  # type: ignore[attr-defined]
lmeval_score.needs_dataset = False  # type: ignore[attr-defined]
lmeval_score.check_options = _check  # type: ignore[attr-defined]
