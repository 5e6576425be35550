"""Resuming an evolve run from its run store (Prefect-free; the flow and the CLI call these).

A run is resumable because everything it needs is in the run store:

- each completed generation: its candidates, summary and the optimizer state after its `tell`
  (``generations/{g:05d}.json``, committed by ``latest.json``);
- each finished evaluation of the generation in progress: ``candidates/{key}.json``, keyed by
  the genome, the sources' revisions and the evaluation config, reused instead of evaluated
  again;
- ``lease.json``: one writer per run key (acquired at start, renewed every generation and by a
  heartbeat thread, released at the end; runs/lease.py).

Storage reads and writes here are retried on transient failures (runs/retries.py).

:func:`open_run` checks storage access, takes the lease, checks the stored config against the
new one (only a budget change is allowed) and loads the state to continue from.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evomerge_core.runs import faults
from evomerge_core.config.schema import RunConfig, parse_run_config
from evomerge_core.errors import ConfigError, StorageError, UsageError
from evomerge_core.runs.layout import RESULT, open_store, stored_config
from evomerge_core.runs.lease import LeaseKeeper, ensure_lease_free
from evomerge_core.runs.retries import with_retries
from evomerge_core.runs.store import (
    CorruptObjectError,
    RunStore,
    candidate_key,
    ensure_same_config,
)

logger = logging.getLogger(__name__)

# What a resume may change: the budget (more generations or evaluations), and how the storage
# URL is spelled (the run was found there, so it is the same place).
ALLOWED_CHANGES = frozenset({"optimizer.generations", "optimizer.evaluations", "storage", "runtime.task_runner"})


# Candidate cache keys -----------------------------------------------------------------------
def evaluation_config(config: RunConfig) -> dict[str, Any]:
    """What, besides the genome and the sources, decides a candidate's fitness."""
    return config.model_dump(mode="json", include={"space", "fitness", "runtime"},
                             exclude={"runtime": {"task_runner"}})  # where it runs: no effect on fitness


def source_revisions(paths: dict[str, str]) -> dict[str, str]:
    """A revision per source: a sha256 of the resolved directory path and of its files' names,
    sizes and modification times. A Hub snapshot's path holds its commit; a local directory
    whose weights are rewritten gets a new revision, so its candidates are evaluated again."""
    out = {}
    for ref, path in sorted(paths.items()):
        root = Path(path)
        digest = hashlib.sha256(str(root.resolve()).encode())
        for f in sorted(p for p in root.rglob("*") if p.is_file()):
            st = f.stat()
            digest.update(f"\0{f.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}".encode())
        out[ref] = digest.hexdigest()
    return out


def candidate_keys(config: RunConfig, revisions: dict[str, str], genomes: Sequence[Sequence[float]]) -> list[str]:
    """The candidate-cache key of each genome."""
    fitness = evaluation_config(config)
    return [candidate_key(g, revisions, fitness) for g in genomes]


_STORES: dict[tuple[str, str, str], RunStore] = {}
_STORES_LOCK = threading.Lock()


def store_for(config: RunConfig) -> RunStore:
    """A per-process cached run store of ``config`` (tasks store one candidate each)."""
    key = (config.storage, config.effective_run_key(), json.dumps(config.storage_options, sort_keys=True, default=str))
    with _STORES_LOCK:
        if key not in _STORES:
            _STORES[key] = open_store(config)
        return _STORES[key]


def store_candidate(config: RunConfig, key: str, record: dict[str, Any]) -> None:
    """Store one finished evaluation (retrying transient failures), then count it for the
    ``EVOMERGE_FAULT`` testing hook."""
    store = store_for(config)
    with_retries(lambda: store.put_candidate(key, record), f"store candidate g{record.get('generation')}"
                 f"-c{record.get('index')}")
    faults.candidate_stored()


# State to continue from ---------------------------------------------------------------------
@dataclass
class RunState:
    """What a run continues from: nothing (fresh) or its completed generations."""

    next_generation: int = 0
    optimizer_state: dict[str, Any] | None = None
    generations: list[dict[str, Any]] = field(default_factory=list)  # generation records, in order
    recovered: bool = False  # latest.json or the newest generation was damaged: fell back

    @property
    def history(self) -> list[dict[str, Any]]:
        """Every candidate record of the completed generations, in order."""
        return [c for g in self.generations for c in g["candidates"]]

    @property
    def summaries(self) -> list[dict[str, Any]]:
        return [g["summary"] for g in self.generations]


def load_state(store: RunStore) -> RunState:
    """The completed generations up to the last valid checkpoint (see ``read_latest``)."""
    latest = store.read_latest()
    if latest is None:
        return RunState()
    last = int(latest["generation"])
    records = []
    for n in range(last + 1):
        try:
            records.append(store.read_generation(n))
        except StorageError as exc:
            raise StorageError(
                f"cannot resume run {store.run_key!r}: {exc} Restore that object, or start over with "
                "--no-resume."
            ) from None
    state = records[-1].get("optimizer_state")
    if not isinstance(state, dict):
        raise CorruptObjectError(f"{store.url(f'generations/{last:05d}.json')} holds no optimizer state.")
    return RunState(last + 1, state, records, bool(latest.get("recovered")))


def check_resumable(store: RunStore, config: RunConfig) -> RunState:
    """The state to continue from, after checking the stored config allows it; raises
    :class:`~evomerge_core.errors.ConfigError` with a diff for a changed config and
    :class:`UsageError` for a finished run or a budget below what was already done."""
    key = config.effective_run_key()
    stored = store.read_config()
    if stored is None:
        if store.generations():
            raise UsageError(
                f"run {key!r} at {store.url()} has generation files but no config.yaml (damaged or "
                "half cleared); start over with --no-resume, or pick another --run-key"
            )
        return RunState()
    ensure_same_config(_normalised(stored), stored_config(config), set(ALLOWED_CHANGES),
                       where=f"run {key!r} at {store.url()}")
    state = load_state(store)
    if state.optimizer_state is None:
        if _finished(store):  # a run without generations of its own (a chain's top level)
            raise UsageError(_finished_message(key, store))
        return state
    total = config.generations(int(state.optimizer_state["popsize"]))
    done = state.next_generation
    if done > total:
        raise UsageError(
            f"run {key!r} at {store.url()} has already completed {done} generations, more than the "
            f"{total} the config now asks for; keep or raise optimizer.generations/evaluations, or "
            "start over with --no-resume"
        )
    if done == total and _finished(store):
        raise UsageError(_finished_message(key, store))
    return state


def _normalised(stored: dict[str, Any]) -> dict[str, Any]:
    """The stored config with the defaults of settings added since it was written (so a newer
    evomerge can continue an older run); as stored if it no longer validates."""
    try:
        return stored_config(parse_run_config(stored))
    except ConfigError:
        return stored


def _finished_message(key: str, store: RunStore) -> str:
    return (
        f"run {key!r} at {store.url()} has already finished; pick another --run-key, raise "
        "optimizer.generations/evaluations to continue it, or pass --no-resume to start over and "
        "overwrite it"
    )


def _finished(store: RunStore) -> bool:
    try:
        return store.read_json(RESULT) is not None
    except CorruptObjectError as exc:
        logger.warning("%s The end of the run is written again.", exc)
        return False


# Opening a run ------------------------------------------------------------------------------
@dataclass
class Run:
    """An opened run: its store, the state to continue from, and the held lease."""

    store: RunStore
    state: RunState
    lease: LeaseKeeper
    resumed: bool

    def cached(self, keys: Sequence[str]) -> list[dict[str, Any] | None]:
        """The stored evaluation of each key, or None."""
        return [with_retries(functools.partial(self.store.get_candidate, k), "read a stored candidate") for k in keys]

    def close(self) -> None:
        """Release the lease."""
        self.lease.release()


def open_run(config: RunConfig, *, resume: bool, owner: str) -> Run:
    """Check storage access, take the lease, then either clear the run (``resume=False``) or
    check that it may be continued, and write the frozen config. Close the returned run."""
    store = open_store(config)
    store.check_access()
    lease = LeaseKeeper(store, owner)
    lease.acquire()
    try:
        if resume:
            state = check_resumable(store, config)
        else:
            deleted = store.clear()
            if deleted:
                logger.info("--no-resume: deleted %d objects of run %s", deleted, store.url())
            state = RunState()
        store.write_config(stored_config(config))
        lease.start_heartbeat()
    except BaseException:
        lease.release()
        raise
    return Run(store, state, lease, resumed=state.next_generation > 0)


def check_before_start(config: RunConfig, *, resume: bool) -> RunStore:
    """The CLI's checks before anything is loaded: storage access, no live run on the run key,
    and (when resuming) a config that may continue the stored run."""
    store = open_store(config)
    store.check_access()
    ensure_lease_free(store)
    if resume:
        check_resumable(store, config)
    return store
