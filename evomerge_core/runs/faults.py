"""Fault injection for tests (a testing hook, off unless ``EVOMERGE_FAULT`` is set).

``EVOMERGE_FAULT`` holds one or more comma-separated ``ACTION_POINT:N`` entries. Points:

- ``after_candidates:N``: right after this process's N-th finished evaluation was stored in the
  run store;
- ``during_checkpoint:G``: after ``generations/{G}.json`` was written and before ``latest.json``
  names it (a checkpoint cut in half);
- ``after_generation:G``: right after generation G's checkpoint is complete (between two
  generations);
- ``during_candidate:N``: in the middle of this process's N-th candidate evaluation, after the
  recipe was merged into the resident model and before it is scored.

Actions:

- ``kill``: SIGKILL this process (nothing runs after it: no ``finally``, no lease release,
  exactly like a machine that dies or the kernel's OOM killer);
- ``term``: send SIGTERM to this process (what a scheduler or ``kill PID`` sends) and go on;
- ``fail``: raise :class:`InjectedFault` (a failed flow run, for ``prefect flow-run retry``);
- ``oom``: raise ``torch.OutOfMemoryError`` (what CUDA raises when a GPU runs out of memory);
- ``cpuoom``: make a real, impossible CPU allocation (torch's allocator raises its
  ``can't allocate memory`` error);
- ``nan`` / ``inf`` (``during_candidate`` only): overwrite one weight of the merged model with
  NaN / +inf, as an overflowing merge would.

``EVOMERGE_FAULT_ONCE=PATH`` makes each entry fire at most once across all processes (the first
to create ``PATH.<point>`` fires): a Dask worker restarted after a kill counts from zero again
and would otherwise fire again. Never set these outside tests.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

import torch

from evomerge_core.errors import ConfigError

ENV = "EVOMERGE_FAULT"
ONCE_ENV = "EVOMERGE_FAULT_ONCE"
_ACTIONS = ("kill", "term", "fail", "oom", "cpuoom", "nan", "inf")
_POINTS = ("after_candidates", "during_checkpoint", "after_generation", "during_candidate")
_MODEL_ACTIONS = ("nan", "inf")  # need the model being evaluated
_counts: dict[str, int] = {}
_lock = threading.Lock()


class InjectedFault(RuntimeError):
    """The failure asked for by ``EVOMERGE_FAULT=fail_...``."""


def _plan() -> dict[str, tuple[str, int]]:
    """``{point: (action, n)}`` from the environment; ConfigError for a malformed value."""
    raw = os.environ.get(ENV, "").strip()
    plan: dict[str, tuple[str, int]] = {}
    for entry in filter(None, (e.strip() for e in raw.split(","))):
        name, _, number = entry.partition(":")
        action, _, point = name.partition("_")
        if action not in _ACTIONS or point not in _POINTS or not number.isdigit() \
                or (action in _MODEL_ACTIONS and point != "during_candidate"):
            raise ConfigError(
                f"{ENV}={raw!r} is malformed at {entry!r}; use ACTION_POINT:N with ACTION in "
                f"{_ACTIONS} and POINT in {_POINTS} (nan and inf only with during_candidate), "
                "e.g. kill_after_candidates:5."
            )
        plan[point] = (action, int(number))
    return plan


def _first_time(point: str) -> bool:
    """False when ``EVOMERGE_FAULT_ONCE`` is set and some process already fired at `point`."""
    marker = os.environ.get(ONCE_ENV)
    if not marker:
        return True
    try:
        os.close(os.open(f"{marker}.{point}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        return False
    return True


def _poison(model: Any, value: float) -> None:
    """Fill the model's last floating-point weight (the output head of a causal LM) with `value`."""
    params = [p for p in model.parameters() if p.is_floating_point()]
    with torch.no_grad():
        params[-1].fill_(value)


def _trigger(action: str, where: str, model: Any = None) -> None:
    what = "killing process" if action == "kill" else f"{action}: process"
    print(f"[{ENV}] {what} {os.getpid()} at {where}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    if action == "fail":
        raise InjectedFault(f"injected failure ({ENV}) at {where}")
    if action == "oom":
        raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 20.00 GiB (injected by {ENV} at {where})")
    if action == "cpuoom":
        torch.empty(1 << 50, dtype=torch.uint8)  # 1 PiB: the allocator refuses
        raise AssertionError("a 1 PiB allocation succeeded")  # pragma: no cover
    if action in _MODEL_ACTIONS:
        _poison(model, float(action))
        return
    os.kill(os.getpid(), signal.SIGTERM if action == "term" else signal.SIGKILL)


def _count(point: str) -> int:
    with _lock:
        _counts[point] = n = _counts.get(point, 0) + 1
    return n


def reset_counts() -> None:
    """Forget what this process counted (tests that run several faulted runs in one process)."""
    with _lock:
        _counts.clear()


def _count_and_fire(point: str, where: str, model: Any = None) -> None:
    """Count one pass of this process at `point`; fire its planned action at the N-th."""
    plan = _plan()
    if point not in plan:
        return
    n = _count(point)
    action, target = plan[point]
    if n == target and _first_time(point):
        _trigger(action, f"{where} {n}", model)


def candidate_stored() -> None:
    """Count one stored evaluation of this process; fire ``*_after_candidates:N`` at the N-th."""
    _count_and_fire("after_candidates", "stored candidate")


def candidate_merged(model: Any) -> None:
    """Count one candidate evaluation of this process (its recipe now merged into `model`); fire
    ``*_during_candidate:N`` at the N-th."""
    _count_and_fire("during_candidate", "candidate evaluation", model)


def at(point: str, generation: int) -> None:
    """Fire ``*_{point}:G`` when ``generation == G`` (points ``during_checkpoint``,
    ``after_generation``)."""
    plan = _plan()
    if point in plan and plan[point][1] == generation and _first_time(point):
        _trigger(plan[point][0], f"{point.replace('_', ' ')} {generation}")
