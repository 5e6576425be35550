"""Helpers of the fault-matrix tests (`test_faults.py`, `test_secrets.py`): user scorers that
log each finished evaluation, and run configs over the tiny models. No tests here.

``EVOMERGE_TEST_EVAL_LOG=PATH``: every scoring that finishes appends one JSON line
``{"genome": [...], "pid": N, "outputs": [...]}`` to PATH (one ``write`` of a line opened with
O_APPEND: atomic across the flow's threads and Dask worker processes). A candidate killed
before it was scored leaves no line, so the lines count the *finished* evaluations.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

LOG_ENV = "EVOMERGE_TEST_EVAL_LOG"
PLANTED = {"density": 0.7, "weight": 0.4}


def _log(ctx, outputs: list[str] | None = None) -> None:
    path = os.environ.get(LOG_ENV)
    if not path:
        return
    line = json.dumps({"genome": ctx.genome, "pid": os.getpid(), "outputs": outputs}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def counted(ctx) -> float:
    """Negative squared distance of every source's (density, weight) to PLANTED (cheap,
    deterministic, no generation); logs the finished evaluation."""
    total = 0.0
    for entry in ctx.recipe.models:
        for name, value in PLANTED.items():
            if name in entry.parameters:
                total -= (float(entry.parameters[name]) - value) ** 2
    _log(ctx)
    return total


counted.worst_fitness = -10.0


def generated(ctx) -> float:
    """Greedy generation on every item (`ctx.outputs`), scored by the fraction of items whose
    output contains the answer; logs the outputs."""
    outputs = ctx.outputs
    _log(ctx, outputs)
    return sum(str(a) in o for o, a in zip(outputs, ctx.answers)) / len(outputs)


generated.worst_fitness = -1.0


def read_log(path: Path) -> list[dict[str, Any]]:
    """The finished evaluations logged at `path` (none when the file does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_data(path: Path, rows: int = 2) -> Path:
    """A small prompt/answer dataset the tiny tokenizer can encode."""
    path.write_text("".join(json.dumps({"question": f"what is {i} plus 1? ", "target": str(i + 1)}) + "\n"
                            for i in range(rows)))
    return path


def run_config(family: dict[str, Path], data: Path, storage: Path | str, run_key: str, *,
               scorer: str = "test_faults_helpers:counted", **over: dict) -> dict:
    """A 2-generation, population-4 PS run over the tiny family (each section of `over`
    updates the section of that name)."""
    config: dict[str, Any] = {
        "run_key": run_key,
        "storage": storage if str(storage).startswith(("file://", "s3://")) else f"file://{storage}",
        "sources": [{"model": str(family["base"]), "base": True}, {"model": str(family["ft1"])},
                    {"model": str(family["ft2"])}],
        "space": {"ps": {"method": "dare_ties", "params": ["density", "weight"]}},
        "optimizer": {"popsize": 4, "seed": 11, "generations": 2},
        "fitness": {"dataset": {"path": str(data), "columns": {"prompt": "question", "answer": "target"}},
                    "scorer": scorer, "accuracy_scorer": "none", "max_new_tokens": 2, "batch_size": 2},
        "runtime": {"torch_threads": 1},
        "output": {"materialise_best": False, "report": False},
    }
    for section, values in over.items():
        config[section] = {**config.get(section, {}), **values}
    return config


def strip(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What must be identical between an interrupted-and-resumed run and an uninterrupted one."""
    return [{k: h[k] for k in ("generation", "index", "genome", "fitness")} for h in history]
