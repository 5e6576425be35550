"""Entry points of the deployments in `infra/prefect.yaml` (a deployment's parameters are small
JSON values, so these take a config *path* rather than a config dict):

- `evolve_config(config_path, run_key, storage, resume)`: validate, preflight, then the evolve flow;
- `resume_run(storage, run_key, generations)`: continue a stored run from its frozen config;
- `source_revision_event(...)` / `emit_source_revision(...)`: the event the "new source revision"
  trigger listens to.

Runs on one run key never overlap: each entry point holds the global concurrency limit
``evomerge-run-{run key}`` (limit 1, created on first use, deleted when the run ends and nobody
holds it) for the whole run; a second run of the same key waits for the first (and then finds it
finished, which completes at once, or resumes it). The slot is a lease of Prefect's shortest
duration (60 s) renewed while the run lives; a waiting run that finds the holder dead (its run
store lease names a process that no longer runs, an expired lease, or a flow run in a final state
such as Crashed) frees the slot at once, so after a kill -9 a re-run resumes without waiting.

The evolve search runs inside the deployment's own flow run (not as a child run), so its
artifacts, progress lines (``log_prints``) and evomerge's warnings are on that run's page. At
the end the event ``evomerge.evolve.completed`` is emitted (`completed_event`), on which the
``publish-run`` deployment's trigger can publish the best model.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import re
import time
from collections.abc import Iterator
from typing import Any

from prefect import flow

from evomerge.flows.evolve import evolve
from evomerge.flows.monitoring import slug
from evomerge_core.config.schema import RunConfig, load_run_config, parse_run_config
from evomerge_core.errors import EvomergeError, UsageError, is_bad_input

SOURCE_REVISION_EVENT = "evomerge.source.revision-registered"
COMPLETED_EVENT = "evomerge.evolve.completed"
RUN_KEY_WAIT_S = float(os.environ.get("EVOMERGE_RUN_KEY_WAIT_S", 24 * 3600))
SLOT_LEASE_S = 60.0  # Prefect's shortest slot lease: a killed holder's slot frees itself within ~75 s
SLOT_POLL_S = 10.0  # how often a waiting run looks at the slot and whether its holder is dead
RETRIES = 2  # flow-run retries of evolve-config / resume-run (each resumes from the run store)
RETRY_DELAY_S = int(os.environ.get("EVOMERGE_FLOW_RETRY_DELAY_S", 30))
_RUN_KEY_FIELDS = {"date": "%Y-%m-%d", "datetime": "%Y-%m-%dT%H%M"}
logger = logging.getLogger(__name__)


def slot_name(run_key: str) -> str:
    """The global concurrency limit of a run key."""
    return "evomerge-run-" + slug(run_key)


@contextlib.contextmanager
def run_key_slot(run_key: str, config: RunConfig | None = None) -> Iterator[None]:
    """Hold the concurrency slot of `run_key` (limit 1 per run key, created when missing, deleted
    at the end when free). While waiting, a slot whose holder is dead is freed (`_holder_dead`)."""
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import PrefectException

    name = slot_name(run_key)
    deadline = time.monotonic() + RUN_KEY_WAIT_S
    with contextlib.ExitStack() as held:
        while True:
            if _ensure_limit(name) == 0:  # free: take it (a lost race looks again)
                try:
                    held.enter_context(concurrency(name, occupy=1, timeout_seconds=SLOT_POLL_S, strict=True,
                                                   lease_duration=SLOT_LEASE_S, raise_on_lease_renewal_failure=False))
                    break
                except TimeoutError:
                    continue
                except PrefectException as exc:  # the limit was deleted between the check and the acquire
                    logger.info("run key slot %s: %s; trying again", name, exc)
                    continue
            if config is not None and _holder_dead(config):
                print(f"the run key {run_key!r} was held by a run that is no longer alive (killed?); freeing its "
                      f"concurrency slot {name!r} and resuming", flush=True)
                _delete_limit(name)
                continue
            if time.monotonic() > deadline:
                raise UsageError(f"run key {run_key!r} is busy: another flow run has held the concurrency slot {name!r} "
                                 f"for over {RUN_KEY_WAIT_S:.0f} s (EVOMERGE_RUN_KEY_WAIT_S); wait for it, or run "
                                 "with another run_key parameter")
            time.sleep(SLOT_POLL_S)
        yield
    _delete_limit(name, only_if_free=True)


def _ensure_limit(name: str) -> int:
    """Create the limit when missing; returns its taken slots (polling this instead of waiting in
    Prefect's acquire keeps a waiting run's log free of Prefect's timeout errors)."""
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return client.read_global_concurrency_limit_by_name(name).active_slots
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            return 0


def _delete_limit(name: str, only_if_free: bool = False) -> None:
    """Delete the limit (a stale holder's slot goes with it); with `only_if_free`, only when no
    slot is taken (a run waiting on it recreates it)."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client, contextlib.suppress(ObjectNotFound):
        if only_if_free and client.read_global_concurrency_limit_by_name(name).active_slots > 0:
            return
        client.delete_global_concurrency_limit_by_name(name)


def _holder_dead(config: RunConfig) -> bool:
    """Whether the run holding the run key is gone: its run store lease is expired, names a
    process on this host that no longer runs, or names a flow run in a final state (Crashed,
    Failed, Cancelled, Completed). No lease (the holder is still starting): not known dead."""
    from uuid import UUID

    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    from evomerge_core.runs.layout import open_store
    from evomerge_core.runs.lease import holder_is_gone

    try:
        lease = open_store(config).read_lease()
    except EvomergeError:
        return False
    if lease is None:
        return False
    if lease["expires_at"] <= time.time() or holder_is_gone(lease):
        return True
    owner = str(lease.get("owner") or "")
    if not owner.startswith("flow-run-"):
        return False
    try:
        run_id = UUID(owner.removeprefix("flow-run-"))
    except ValueError:
        return False
    from prefect.runtime import flow_run

    if str(run_id) == str(flow_run.id):  # our own earlier attempt (a retry): its lease is ours
        return True
    with get_client(sync_client=True) as client:
        try:
            state = client.read_flow_run(run_id).state
        except ObjectNotFound:
            return False
    return state is not None and state.is_final()


def expand_run_key(run_key: str, when: dt.datetime | None) -> str:
    """`{date}` / `{datetime}` in a run key parameter -> the flow run's scheduled start (UTC), so
    each scheduled run gets a fresh key and a retry of the same flow run keeps it."""
    fields = set(re.findall(r"{([^{}]*)}", run_key))
    unknown = fields - set(_RUN_KEY_FIELDS)
    if unknown:
        raise UsageError(f"run_key parameter {run_key!r} has unknown field(s) {sorted(unknown)}; use {{date}} or "
                         "{datetime} (the scheduled start, UTC), or a plain key")
    if not fields:
        return run_key
    moment = (when or dt.datetime.now(dt.timezone.utc)).astimezone(dt.timezone.utc)
    return run_key.format(**{k: moment.strftime(f) for k, f in _RUN_KEY_FIELDS.items()})


def _scheduled_start() -> dt.datetime | None:
    from prefect.runtime import flow_run

    when = flow_run.scheduled_start_time
    return when if isinstance(when, dt.datetime) else None


def _load(config_path: str, run_key: str, storage: str) -> RunConfig:
    config = load_run_config(config_path)
    overrides = {k: v for k, v in (("run_key", expand_run_key(run_key, _scheduled_start()) if run_key else ""),
                                   ("storage", storage)) if v}
    if overrides:
        config = parse_run_config({**config.model_dump(mode="json", exclude_unset=True), **overrides}, source=config_path)
    return config


def _evolve_config_run_name() -> str:
    """`evolve-config-{run key}`: the run key the run will use (parameter or config)."""
    from prefect.runtime import flow_run

    params = flow_run.parameters
    try:
        key = _load(params["config_path"], params.get("run_key") or "", params.get("storage") or "").effective_run_key()
    except Exception:  # the flow itself reports a bad config; the name only needs to be readable
        try:
            key = expand_run_key(params.get("run_key") or "", _scheduled_start())
        except UsageError:
            key = params.get("run_key") or ""
        key = key or os.path.splitext(os.path.basename(str(params.get("config_path", ""))))[0]
    return f"evolve-config-{key}"


def _for_deployment(exc: EvomergeError) -> str:
    """An error's hint in deployment terms: its CLI flags named as the deployment's parameters."""
    text = str(exc)
    for flag, param in (("--no-resume", "the parameter resume=false"), ("--run-key", "the parameter run_key"),
                        ("--storage", "the parameter storage")):
        text = text.replace(flag, param)
    return text


def _bad_input(exc: EvomergeError) -> Any:
    """A Failed state for bad input, after setting this flow run's retries to 0: the server retries
    every Failed run that has retries left, and retrying cannot fix the input."""
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext
    from prefect.states import Failed

    context = FlowRunContext.get()
    if context is not None and context.flow_run is not None:
        policy = context.flow_run.empirical_policy.model_copy(update={"retries": 0})
        with get_client(sync_client=True) as client:
            client.update_flow_run(context.flow_run.id, empirical_policy=policy)
    return Failed(message=f"error: {_for_deployment(exc)}")


def _log_evomerge_warnings() -> None:
    """evomerge's own log records (lease and storage warnings) also go to the flow run's Logs tab."""
    from prefect.logging.handlers import APILogHandler

    core = logging.getLogger("evomerge_core")
    if not any(isinstance(h, APILogHandler) for h in core.handlers):
        core.addHandler(APILogHandler())
    if core.level == logging.NOTSET or core.level > logging.INFO:
        core.setLevel(logging.INFO)


def _run_evolve(config: RunConfig, resume: bool, key: str) -> Any:
    """The search in this flow run (idempotent: a finished run completes at once with its result);
    bad input is a Failed state (not retried) whose message names deployment parameters."""
    from evomerge_core.runs.layout import RESULT, open_store

    _log_evomerge_warnings()
    try:
        with run_key_slot(key, config):
            try:
                prepared = _prepare(config, resume)
            except UsageError:
                done = open_store(config).read_json(RESULT) if resume else None
                if done is None:
                    raise
                print(f"run {key} already finished (best fitness {done.get('best_fitness')}); nothing to do. "
                      f"Result: {open_store(config).url(RESULT)}", flush=True)
                return done
            result = evolve.fn(prepared, resume=resume, run_key=key)
    except EvomergeError as exc:
        if not is_bad_input(exc):
            raise  # retried (RETRIES), each retry resuming from the run store
        return _bad_input(exc)
    emit_completed(config, result)
    return result


def _prepare(config: RunConfig, resume: bool) -> RunConfig:
    from evomerge.flows.cmd_evolve import preflight
    from evomerge_core.runs.search import check_run_free

    preflight(config)
    check_run_free(config, resume=resume)
    return config


@flow(name="evolve-config", flow_run_name=_evolve_config_run_name, validate_parameters=True, log_prints=True,
      retries=RETRIES, retry_delay_seconds=RETRY_DELAY_S)
def evolve_config(config_path: str, run_key: str = "", storage: str = "", resume: bool = True) -> Any:
    """`evomerge evolve CONFIG.yaml` as a deployment: the evolve search on a config file (a path on
    the worker), optionally with another run key (`{date}`/`{datetime}` expand to the scheduled
    start) or storage; returns `result.json`'s content. A failure other than bad input is retried
    (RETRIES times, RETRY_DELAY_S apart), each retry resuming from the run store."""
    try:
        config = _load(config_path, run_key, storage)
    except EvomergeError as exc:
        if not is_bad_input(exc):
            raise
        return _bad_input(exc)
    return _run_evolve(config, resume, config.effective_run_key())


@flow(name="resume-run", flow_run_name="resume-{run_key}", validate_parameters=True, log_prints=True,
      retries=RETRIES, retry_delay_seconds=RETRY_DELAY_S)
def resume_run(storage: str, run_key: str, generations: int | None = None) -> Any:
    """Continue the run `run_key` under `storage` from its frozen `config.yaml` (optionally with
    a larger generation budget)."""
    from evomerge_core.runs.store import RunStore

    stored = RunStore(storage, run_key).read_config()
    if stored is None:
        raise UsageError(f"no run {run_key!r} under {storage} (no config.yaml); check the storage URL and run key")
    if generations is not None:
        stored["optimizer"] = {**stored.get("optimizer", {}), "generations": generations, "evaluations": None}
    config = parse_run_config({**stored, "storage": storage, "run_key": run_key}, source=f"{storage}/{run_key}/config.yaml")
    return _run_evolve(config, True, run_key)


def completed_event(config: RunConfig, result: dict[str, Any]) -> dict[str, Any]:
    """The event that says the run `config` names has completed (resource `evomerge.run.<key>`)."""
    from evomerge_core.runs.layout import RESULT, open_store

    store = open_store(config)
    key = config.effective_run_key()
    return {
        "event": COMPLETED_EVENT,
        "resource": {"prefect.resource.id": f"evomerge.run.{slug(key)}", "evomerge.run-key": key,
                     "evomerge.storage": config.storage},
        "payload": {"run_key": key, "storage": config.storage, "best_fitness": result.get("best_fitness"),
                    "best_model": result.get("best_model"), "result": store.url(RESULT),
                    "publish_repo_id": config.output.publish.repo_id or ""},
    }


def emit_completed(config: RunConfig, result: dict[str, Any]) -> Any:
    """Emit `completed_event` to the Prefect API (the run's flow run is the related resource)."""
    from prefect.events import emit_event

    return emit_event(**completed_event(config, result))


@flow(name="publish-run", flow_run_name="publish-run-{run_key}", validate_parameters=True, log_prints=True)
def publish_run(storage: str, run_key: str, repo_id: str = "", private: bool = True,
                dry_run: str | None = None) -> dict[str, Any]:
    """Publish the best model of the finished run `{storage}/{run_key}` to `repo_id` (default:
    the run config's output.publish.repo_id); with `dry_run` a directory, stage it there without
    pushing. A run already pushed with the same content is not pushed again."""
    import tempfile
    from pathlib import Path

    from evomerge.flows.publish import publish
    from evomerge_core.runs.layout import RESULT
    from evomerge_core.runs.store import RunStore

    store = RunStore(storage, run_key)
    stored = store.read_config()
    result = store.read_json(RESULT)
    if stored is None or result is None:
        raise UsageError(f"no finished run {run_key!r} under {storage} (no config.yaml or result.json); check the "
                         "storage and run_key parameters")
    config = parse_run_config({**stored, "storage": storage, "run_key": run_key}, source=store.url("config.yaml"))
    target = repo_id or config.output.publish.repo_id
    if not target:
        raise UsageError("no repository to publish to: pass the repo_id parameter (e.g. in the trigger of "
                         "infra/prefect.yaml) or set output.publish.repo_id in the run config")
    if not result.get("best_model"):
        raise UsageError(f"run {run_key!r} has no best model (output.materialise_best was false); nothing to publish")
    with tempfile.TemporaryDirectory(prefix="evomerge-best-") as tmp:
        model_dir = store.get_dir("best", Path(tmp) / "best")
        return publish(str(model_dir), target, private=private, dry_run=dry_run, run_url=store.url())


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
