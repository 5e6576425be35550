"""Retrying transient storage failures (connection refused or reset, timeouts, 5xx answers)
with exponential backoff, for up to ``EVOMERGE_STORAGE_RETRY_S`` seconds (default 120)."""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from typing import TypeVar

from evomerge_core.errors import StorageError, UsageError
from evomerge_core.runs.store import CorruptObjectError

logger = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_ENV = "EVOMERGE_STORAGE_RETRY_S"
DEFAULT_RETRY_S = 120.0
_TRANSIENT = re.compile(
    r"Could not connect|EndpointConnectionError|ConnectTimeout|ReadTimeout|ConnectionClosed|"
    r"Connection (reset|refused|aborted)|ServerDisconnected|ClientOSError|ClientConnector|"
    r"ServiceUnavailable|Service Unavailable|SlowDown|InternalError|Internal Server Error|"
    r"RequestTimeout|timed out|Broken pipe|\b50[0234]\b",
    re.IGNORECASE,
)


def is_transient(exc: BaseException) -> bool:
    """Whether a storage failure may go away by itself (connection refused or reset, timeouts,
    5xx answers); bad credentials, a missing bucket or a corrupt object never do."""
    return (isinstance(exc, StorageError) and not isinstance(exc, CorruptObjectError)
            and bool(_TRANSIENT.search(str(exc))))


def env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise UsageError(f"{name}={raw!r} is not a number of seconds; unset it or give e.g. 120.") from None
    if value < 0:
        raise UsageError(f"{name}={raw!r} is negative; give a number of seconds >= 0.")
    return value


def with_retries(fn: Callable[[], T], what: str, budget_s: float | None = None) -> T:
    """Call ``fn``; on a transient storage failure retry with exponential backoff (1, 2, 4 ...
    30 s) for up to ``budget_s`` (default ``EVOMERGE_STORAGE_RETRY_S`` or 120 s), then raise
    the last error. Other errors are raised at once."""
    budget = env_seconds(RETRY_ENV, DEFAULT_RETRY_S) if budget_s is None else budget_s
    deadline = time.monotonic() + budget
    delay = 1.0
    while True:
        try:
            return fn()
        except StorageError as exc:
            left = deadline - time.monotonic()
            if not is_transient(exc) or left <= 0:
                raise
            logger.warning("storage unavailable while trying to %s (%s); retrying in %.0f s", what, exc,
                           min(delay, left))
            time.sleep(min(delay, left))
            delay = min(delay * 2, 30.0)
