"""The run lease: one writer per run key (``lease.json``), acquired at start, renewed every
generation and by a heartbeat thread, released at the end; a dead process's lease on this host
is taken over at once."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

from evomerge_core.errors import StorageError
from evomerge_core.io.host import pid_alive
from evomerge_core.runs.retries import env_seconds, with_retries
from evomerge_core.runs.store import RunStore

logger = logging.getLogger(__name__)

LEASE_TTL_ENV = "EVOMERGE_LEASE_TTL_S"
DEFAULT_LEASE_TTL_S = 600.0


def holder_is_gone(lease: dict[str, Any]) -> bool:
    """True when a lease names a process on this host that no longer runs (it was killed):
    such a lease is taken over at once instead of waiting for it to expire."""
    pid = lease.get("pid")
    if lease.get("host") != socket.gethostname() or not isinstance(pid, int) or pid == os.getpid():
        return False
    return not pid_alive(pid)  # a zombie (killed, not yet reaped) is gone too


def ensure_lease_free(store: RunStore) -> None:
    """Raise :class:`StorageError` if a live run holds the run key's lease (a check before
    starting; the flow then takes the lease itself)."""
    lease = store.read_lease()
    if lease is None or lease["expires_at"] <= time.time() or holder_is_gone(lease):
        return
    left = lease["expires_at"] - time.time()
    raise StorageError(
        f"run is already in progress: {store.url('lease.json')} is held by owner {lease.get('owner')!r} "
        f"(host {lease.get('host')!r}, pid {lease.get('pid')}) for another {left:.0f} s; wait for that "
        "run to finish (or its lease to expire), or use another run key."
    )


class LeaseKeeper:
    """Holds a run's lease: acquire, renew (each generation, and from a heartbeat thread every
    ttl/4 so a long generation never lets it expire), release."""

    def __init__(self, store: RunStore, owner: str, ttl_s: float | None = None) -> None:
        self.store = store
        self.owner = owner
        self.ttl_s = ttl_s if ttl_s is not None else env_seconds(LEASE_TTL_ENV, DEFAULT_LEASE_TTL_S)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lease (a dead process's lease on this host is taken over)."""
        with_retries(lambda: self.store.acquire_lease(self.owner, self.ttl_s, takeover_if=holder_is_gone),
                     "acquire the run lease")

    def renew(self) -> None:
        """Extend the lease; StorageError if it was lost (another run took it over)."""
        with self._lock:
            with_retries(lambda: self.store.renew_lease(self.owner, self.ttl_s), "renew the run lease")

    def start_heartbeat(self) -> None:
        """Renew the lease every ttl/4 in a daemon thread until :meth:`release`."""
        def beat() -> None:
            while not self._stop.wait(self.ttl_s / 4):
                try:
                    self.renew()
                except StorageError as exc:  # the flow's own renew each generation raises it
                    logger.warning("lease heartbeat failed: %s", exc)

        self._thread = threading.Thread(target=beat, name="evomerge-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and remove the lease (best effort: a failure is logged, and the
        lease then expires after its ttl)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            with self._lock:
                with_retries(lambda: self.store.release_lease(self.owner), "release the run lease", budget_s=10)
        except StorageError as exc:
            logger.warning("could not release the run lease (it expires in at most %.0f s): %s", self.ttl_s, exc)
