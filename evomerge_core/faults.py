"""Fault injection for tests (a testing hook, off unless ``EVOMERGE_FAULT`` is set).

``EVOMERGE_FAULT`` holds one or more comma-separated ``ACTION_POINT:N`` entries:

- ``kill_after_candidates:N``: SIGKILL this process right after its N-th finished evaluation
  was stored in the run store (counted per process);
- ``kill_during_checkpoint:G``: SIGKILL after ``generations/{G}.json`` was written and before
  ``latest.json`` names it (a checkpoint cut in half);
- ``kill_after_generation:G``: SIGKILL right after generation G's checkpoint is complete
  (between two generations);
- ``fail_after_candidates:N``: raise :class:`InjectedFault` instead (a failed flow run, for
  ``prefect flow-run retry``).

Kills use ``os.kill(os.getpid(), SIGKILL)``: nothing runs after them (no ``finally``, no
lease release), exactly like a machine that dies. Never set it outside tests.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from evomerge_core.errors import ConfigError

ENV = "EVOMERGE_FAULT"
_ACTIONS = ("kill", "fail")
_POINTS = ("after_candidates", "during_checkpoint", "after_generation")
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
        if action not in _ACTIONS or point not in _POINTS or not number.isdigit():
            raise ConfigError(
                f"{ENV}={raw!r} is malformed at {entry!r}; use ACTION_POINT:N with ACTION in "
                f"{_ACTIONS} and POINT in {_POINTS}, e.g. kill_after_candidates:5."
            )
        plan[point] = (action, int(number))
    return plan


def _trigger(action: str, where: str) -> None:
    if action == "fail":
        raise InjectedFault(f"injected failure ({ENV}) at {where}")
    print(f"[{ENV}] killing process {os.getpid()} at {where}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def candidate_stored() -> None:
    """Count one stored evaluation of this process; fire ``*_after_candidates:N`` at the N-th."""
    plan = _plan()
    if "after_candidates" not in plan:
        return
    with _lock:
        _counts["after_candidates"] = n = _counts.get("after_candidates", 0) + 1
    action, target = plan["after_candidates"]
    if n == target:
        _trigger(action, f"stored candidate {n}")


def at(point: str, generation: int) -> None:
    """Fire ``*_{point}:G`` when ``generation == G`` (points ``during_checkpoint``,
    ``after_generation``)."""
    plan = _plan()
    if point in plan and plan[point][1] == generation:
        _trigger(plan[point][0], f"{point.replace('_', ' ')} {generation}")
