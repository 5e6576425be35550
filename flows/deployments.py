"""Entry points of the deployments in `infra/prefect.yaml` (a deployment's parameters are small
JSON values, so these take a config *path* rather than a config dict):

- `evolve_config(config_path, run_key, storage, resume)`: validate, preflight, then the evolve flow;
- `resume_run(storage, run_key, generations)`: continue a stored run from its frozen config;
- `source_revision_event(...)` / `emit_source_revision(...)`: the event the "new source revision"
  trigger listens to.

Runs on one run key never overlap: each entry point holds the global concurrency limit
``evomerge-run-{run key}`` (limit 1, created on first use) for the whole run; a second run of
the same key waits for the first (and then finds it finished or resumes it).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from prefect import flow

from evomerge.flows.evolve import evolve
from evomerge.flows.monitoring import artifact_key
from evomerge_core.config import RunConfig, load_run_config, parse_run_config
from evomerge_core.errors import UsageError

SOURCE_REVISION_EVENT = "evomerge.source.revision-registered"
RUN_KEY_WAIT_S = float(os.environ.get("EVOMERGE_RUN_KEY_WAIT_S", 24 * 3600))


@contextlib.contextmanager
def run_key_slot(run_key: str) -> Iterator[None]:
    """Hold the concurrency slot of `run_key` (limit 1 per run key, created when missing)."""
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    name = "evomerge-run-" + artifact_key(run_key, "")[:-1]
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
    with concurrency(name, occupy=1, timeout_seconds=RUN_KEY_WAIT_S, strict=True):
        yield


def _prepare(config: RunConfig, resume: bool) -> dict[str, Any]:
    from evomerge.flows.cmd_evolve import preflight
    from evomerge_core.evolution import check_run_free

    preflight(config)
    check_run_free(config, resume=resume)
    return config.model_dump(mode="json")


@flow(name="evolve-config", flow_run_name="evolve-config-{run_key}", validate_parameters=True)
def evolve_config(config_path: str, run_key: str = "", storage: str = "", resume: bool = True) -> dict[str, Any]:
    """`evomerge evolve CONFIG.yaml` as a deployment: the evolve flow on a config file (a path on
    the worker), optionally with another run key or storage; returns `result.json`'s content."""
    config = load_run_config(config_path)
    overrides = {k: v for k, v in (("run_key", run_key), ("storage", storage)) if v}
    if overrides:
        config = parse_run_config({**config.model_dump(mode="json", exclude_unset=True), **overrides}, source=config_path)
    key = config.effective_run_key()
    with run_key_slot(key):
        return evolve(_prepare(config, resume), resume=resume, run_key=key)


@flow(name="resume-run", flow_run_name="resume-{run_key}", validate_parameters=True)
def resume_run(storage: str, run_key: str, generations: int | None = None) -> dict[str, Any]:
    """Continue the run `run_key` under `storage` from its frozen `config.yaml` (optionally with
    a larger generation budget)."""
    from evomerge_core.runstore import RunStore

    stored = RunStore(storage, run_key).read_config()
    if stored is None:
        raise UsageError(f"no run {run_key!r} under {storage} (no config.yaml); check the storage URL and run key")
    if generations is not None:
        stored["optimizer"] = {**stored.get("optimizer", {}), "generations": generations, "evaluations": None}
    config = parse_run_config({**stored, "storage": storage, "run_key": run_key}, source=f"{storage}/{run_key}/config.yaml")
    with run_key_slot(run_key):
        return evolve(_prepare(config, resume=True), resume=True, run_key=run_key)


def source_revision_event(model: str, revision: str, config_path: str, run_key: str = "") -> dict[str, Any]:
    """The event that says `model` has a new `revision`; the trigger in `infra/prefect.yaml`
    runs `evolve-config` on `config_path` for it."""
    return {
        "event": SOURCE_REVISION_EVENT,
        "resource": {"prefect.resource.id": f"evomerge.source.{model}", "evomerge.revision": revision},
        "payload": {"config_path": config_path, "run_key": run_key, "model": model, "revision": revision},
    }


def emit_source_revision(model: str, revision: str, config_path: str, run_key: str = "") -> Any:
    """Emit `source_revision_event` to the Prefect API (PREFECT_API_URL)."""
    from prefect.events import emit_event

    return emit_event(**source_revision_event(model, revision, config_path, run_key))
