"""Candidate evaluation on the task runner a run config names (`runtime.task_runner`).

The evolve flow opens `candidate_runner(cfg.runtime)` for the whole search and maps each
generation's candidates with `map_candidates`: with ``kind: default`` that is `Task.map` on the
flow's own task runner; with ``kind: dask`` the candidates go to a `prefect_dask.DaskTaskRunner`
that lives as long as the search, so every worker process keeps its resident model
(`evomerge_core.kinds.resident`) from one generation to the next. Only candidates go to Dask: the
flow's other tasks (sources, checkpoints, reports) stay in the flow's process.

Each candidate carries the Dask resource annotation of `TaskRunnerConfig.resources` (``GPU: 1``
on GPUs), so a worker never runs two on one GPU. Workers get ``PREFECT_API_URL`` of the API
the flow talks to (also the ephemeral one of a plain ``evomerge evolve``), so their task runs
land in the same flow run.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from evomerge_core.config.schema import RuntimeConfig
from evomerge_core.errors import EvomergeError
from evomerge_core.config.task_runner import TaskRunnerConfig


class CandidateRunError(EvomergeError):
    """A candidate's task did not come back (worker lost, scheduler gone, task crashed)."""


@dataclass
class _DaskPool:
    runner: Any  # prefect_dask.DaskTaskRunner, entered
    resources: dict[str, float]
    api_url: str | None


_ACTIVE: ContextVar[_DaskPool | None] = ContextVar("evomerge_candidate_runner", default=None)


def worker_env(spec: TaskRunnerConfig, api_url: str | None) -> dict[str, str]:
    """Environment of local Dask workers: one BLAS/torch thread per worker thread and the API URL."""
    threads = str(spec.threads_per_worker)
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads}
    if api_url:
        env["PREFECT_API_URL"] = api_url
    for name in ("PREFECT_HOME", "PREFECT_SERVER_ANALYTICS_ENABLED", "EVOMERGE_CACHE"):
        if os.environ.get(name):
            env[name] = os.environ[name]
    return env


def gpu_cluster(*, gpus: list[str], host: str, threads: int, memory_limit: str | None, resources: dict[str, float],
                env: dict[str, str], dashboard_address: str | None) -> Any:
    """A local cluster with one worker per GPU, each seeing only its GPU (``CUDA_VISIBLE_DEVICES``)
    and holding `resources` (dask-cuda's ``LocalCUDACluster`` layout, without needing dask-cuda)."""
    from distributed import Nanny, Scheduler, SpecCluster

    scheduler_options: dict[str, Any] = {"host": host}
    if dashboard_address:
        scheduler_options["dashboard_address"] = dashboard_address
    else:
        scheduler_options["dashboard"] = False
    workers = {}
    for gpu in gpus:
        options: dict[str, Any] = {"host": host, "nthreads": threads, "resources": dict(resources),
                                   "env": {**env, "CUDA_VISIBLE_DEVICES": gpu}, "name": f"gpu-{gpu}"}
        if memory_limit:
            options["memory_limit"] = memory_limit
        workers[f"gpu-{gpu}"] = {"cls": Nanny, "options": options}
    return SpecCluster(scheduler={"cls": Scheduler, "options": scheduler_options}, workers=workers, name="evomerge-gpus")


def build_dask_runner(spec: TaskRunnerConfig, *, device: str, api_url: str | None) -> Any:
    """The `DaskTaskRunner` for `spec` (not started)."""
    from prefect_dask import DaskTaskRunner

    if spec.address is not None:
        return DaskTaskRunner(address=spec.address)
    env = worker_env(spec, api_url)
    resources = spec.resources(device)
    if spec.gpus is not None:
        return DaskTaskRunner(cluster_class=gpu_cluster, cluster_kwargs={
            "gpus": spec.gpus, "host": spec.host, "threads": spec.threads_per_worker, "memory_limit": spec.memory_limit,
            "resources": resources, "env": env, "dashboard_address": spec.dashboard_address})
    kwargs: dict[str, Any] = {
        "n_workers": spec.worker_count(), "threads_per_worker": spec.threads_per_worker, "processes": True,
        "host": spec.host, "dashboard_address": spec.dashboard_address, "env": env,
    }
    if spec.memory_limit:
        kwargs["memory_limit"] = spec.memory_limit
    if resources:  # each worker holds what one candidate needs: one candidate at a time
        kwargs["resources"] = resources
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=kwargs)


def current_api_url() -> str | None:
    """The API URL this flow run talks to (also the ephemeral server's), or None outside a flow run."""
    from prefect.context import FlowRunContext
    from prefect.settings import PREFECT_API_URL

    configured = PREFECT_API_URL.value()
    if configured:
        return str(configured)
    ctx = FlowRunContext.get()
    url = getattr(getattr(ctx, "client", None), "api_url", None) if ctx else None
    return str(url).rstrip("/") if url else None


def describe(spec: TaskRunnerConfig, device: str) -> str:
    """One line saying where candidates run."""
    if spec.is_default:
        return "candidates run in the flow's process (Prefect's default task runner)"
    resources = spec.resources(device)
    need = f", each candidate needs {resources}" if resources else ""
    if spec.address is not None:
        return f"candidates run on the Dask cluster at {spec.address}{need}"
    if spec.gpus is not None:
        return f"candidates run on {len(spec.gpus)} Dask workers, one per GPU ({', '.join(spec.gpus)}){need}"
    return (f"candidates run on {spec.worker_count()} local Dask workers on {spec.host} "
            f"({spec.threads_per_worker} thread each){need}")


@contextlib.contextmanager
def candidate_runner(runtime: RuntimeConfig) -> Iterator[None]:
    """Open the configured runner for the enclosed search (a no-op for ``kind: default``)."""
    spec = runtime.task_runner
    print(describe(spec, runtime.device), flush=True)
    if spec.is_default:
        yield
        return
    api_url = current_api_url()
    runner = build_dask_runner(spec, device=runtime.device, api_url=api_url)
    with runner:
        try:
            _ = runner.client  # start the cluster / connect now, so a bad address fails before generation 1
        except (OSError, TimeoutError) as exc:
            where = f"the Dask scheduler at {spec.address}" if spec.address else "a local Dask cluster"
            raise CandidateRunError(f"could not reach {where} ({type(exc).__name__}: {exc}); start it or fix "
                                    "runtime.task_runner") from None
        token = _ACTIVE.set(_DaskPool(runner, spec.resources(runtime.device), api_url))
        try:
            yield
        finally:
            _ACTIVE.reset(token)


def candidate_slots() -> int:
    """How many candidates run at once on the open runner: its workers on Dask (asked of the
    scheduler when the cluster is not ours), 1 in the flow's process."""
    pool = _ACTIVE.get()
    if pool is None:
        return 1
    try:
        workers = pool.runner.client.scheduler_info().get("workers", {})
    except Exception:  # an unreachable scheduler fails the mapping itself, with its own message
        return 1
    return max(len(workers), 1)


class CandidateFuture:
    """A candidate's future whose `result()` turns a lost task into one clear error."""

    def __init__(self, future: Any, label: str, on_dask: bool) -> None:
        self.future = future
        self.label = label
        self.on_dask = on_dask

    def result(self) -> Any:
        """The task's record; `CandidateRunError` naming the candidate when it did not finish."""
        try:
            return self.future.result()
        except EvomergeError:
            raise
        except Exception as exc:
            name = type(exc).__name__
            hint = ("its Dask worker died or was lost (out of memory? see runtime.task_runner.memory_limit and "
                    "the worker log)" if name in {"KilledWorker", "CommClosedError", "FutureCancelledError",
                                                   "CancelledError"} else "its task crashed")
            where = " on Dask" if self.on_dask else ""
            raise CandidateRunError(f"candidate {self.label}{where} did not finish: {hint} ({name}: {exc})") from exc


def _expand(parameters: dict[str, Any]) -> list[dict[str, Any]]:
    from prefect.utilities.annotations import unmapped

    mapped = {k: list(v) for k, v in parameters.items() if not isinstance(v, unmapped)}
    static = {k: v.value for k, v in parameters.items() if isinstance(v, unmapped)}
    lengths = {len(v) for v in mapped.values()}
    if len(lengths) != 1:
        raise ValueError(f"mapped parameters must have one common length, got {sorted(lengths)}")
    return [{**static, **{k: v[i] for k, v in mapped.items()}} for i in range(lengths.pop())]


def _label(task: Any, parameters: dict[str, Any]) -> str:
    template = task.task_run_name
    if isinstance(template, str):
        try:
            return template.format(**parameters)
        except (KeyError, IndexError):
            pass
    return task.name


def map_candidates(task: Any, *args: Any, **kwargs: Any) -> list[CandidateFuture]:
    """`task.map(*args, **kwargs)` on the runner `candidate_runner` opened (the flow's own runner
    when none is open or it is the default)."""
    from prefect.utilities.callables import get_call_parameters

    calls = _expand(get_call_parameters(task.fn, args, kwargs, apply_defaults=False))
    labels = [_label(task, c) for c in calls]
    pool = _ACTIVE.get()
    if pool is None:
        return [CandidateFuture(f, label, False) for f, label in zip(task.map(*args, **kwargs), labels)]
    import dask
    from prefect.settings import PREFECT_API_URL, temporary_settings

    settings = temporary_settings({PREFECT_API_URL: pool.api_url}) if pool.api_url else contextlib.nullcontext()
    annotations = dask.annotate(resources=pool.resources) if pool.resources else contextlib.nullcontext()
    futures = []
    with settings, annotations:
        for call in calls:
            futures.append(pool.runner.submit(task, parameters=call))
    return [CandidateFuture(f, label, True) for f, label in zip(futures, labels)]
