"""Candidates on Dask workers (`runtime.task_runner`): the same seed gives the same history as
Prefect's default runner; every worker keeps one resident model; the local cluster listens on
127.0.0.1 only; a lost worker or an unreachable scheduler fails the run with one clear error."""

from __future__ import annotations

import os

import pytest
from prefect import flow, unmapped

from test_evolve import make_config

from evomerge_core.config.schema import parse_run_config
from evomerge_core.errors import EvomergeError
from evomerge_core.kinds.cache import clear_model_cache

pytestmark = pytest.mark.timeout(420)

LOCAL_DASK = {"kind": "dask", "workers": 2, "threads_per_worker": 1}


def _run(family, data, storage, run_key: str, task_runner: dict | None):
    from evomerge.flows.evolve import evolve

    clear_model_cache()
    runtime = {"torch_threads": 1}  # the same BLAS thread count in both runners: bitwise-equal sums
    if task_runner is not None:
        runtime["task_runner"] = task_runner
    cfg = make_config(family, data, storage, run_key, runtime=runtime,
                      output={"materialise_best": False, "report": False})
    return evolve(cfg, run_key=run_key)


def _strip(history):
    return [{k: h[k] for k in ("generation", "index", "genome", "fitness")} for h in history]


def test_same_history_default_runner_and_two_dask_workers(tiny_family, tiny_dataset, tmp_path):
    default = _run(tiny_family, tiny_dataset, tmp_path, "default-runner", None)
    dask = _run(tiny_family, tiny_dataset, tmp_path, "dask-runner", LOCAL_DASK)
    assert len(default["history"]) == 8
    assert _strip(dask["history"]) == _strip(default["history"])
    assert dask["best_fitness"] == default["best_fitness"]
    assert all(h.get("error") is None for h in dask["history"])


def test_dask_task_runs_are_named_and_belong_to_the_flow_run(tiny_family, tiny_dataset, tmp_path):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName, TaskRunFilter, TaskRunFilterName

    _run(tiny_family, tiny_dataset, tmp_path, "dask-names", LOCAL_DASK)
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["evolve-dask-names"])))
        assert len(runs) == 1
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [runs[0].id]}),
                                      task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="eval-g")))
    names = sorted(t.name for t in tasks)
    assert names == sorted(f"eval-g{g}-c{i}" for g in range(2) for i in range(4))
    assert all(t.state.is_completed() for t in tasks)


def test_batched_candidates_on_dask_give_the_same_history_in_one_task_run_per_worker(tiny_family, tiny_dataset,
                                                                                      tmp_path):
    """candidates_per_task: auto splits each generation of 4 over the 2 workers: two task runs
    of two candidates each, the same history as one task run per candidate."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName, TaskRunFilter, TaskRunFilterName

    single = _run(tiny_family, tiny_dataset, tmp_path, "dask-single", LOCAL_DASK)
    batched = _run(tiny_family, tiny_dataset, tmp_path, "dask-batched", {**LOCAL_DASK, "candidates_per_task": "auto"})
    assert _strip(batched["history"]) == _strip(single["history"])
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["evolve-dask-batched"])))
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [runs[0].id]}),
                                      task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="eval-g")))
    assert sorted(t.name for t in tasks) == sorted(f"eval-g{g}-c{s}" for g in range(2) for s in ("0-1", "2-3"))
    assert all(t.state.is_completed() for t in tasks)


def _probe() -> dict:
    """Run on each worker: its pid, torch threads and resident model(s)."""
    import torch

    from evomerge_core.kinds.cache import CACHE, MODEL

    held = CACHE.held(MODEL)
    return {"pid": os.getpid(), "threads": torch.get_num_threads(), "resident": [] if held is None else [id(held)]}


@flow(name="dask-probe")
def probe_flow(config: dict, paths: dict) -> tuple:
    """Two rounds of 4 candidates on the configured runner, probing the workers after each."""
    import psutil

    from evomerge.flows.runners import _ACTIVE, candidate_runner, map_candidates
    from evomerge.tasks.evolve import merge_and_evaluate

    with candidate_runner(parse_run_config(config).runtime):
        client = _ACTIVE.get().runner.client
        rounds = []
        for generation in range(2):
            futures = map_candidates(merge_and_evaluate, unmapped(config), unmapped(paths), [[0.5] * 4] * 4,
                                     generation=unmapped(generation), index=list(range(4)))
            records = [f.result() for f in futures]
            rounds.append((records, client.run(_probe)))
        pids = {w["pid"] for w in client.run(_probe).values()}
        listening = _listening(psutil, pids | {os.getpid()})
    return rounds, pids, listening


def test_local_cluster_workers_resident_models_threads_and_loopback(tiny_family, tiny_dataset, tmp_path):
    """Each worker process builds its resident model once and reuses it; torch uses one thread;
    scheduler and workers listen on 127.0.0.1 only."""
    from evomerge_core.kinds import run_kind

    cfg = parse_run_config(make_config(tiny_family, tiny_dataset, tmp_path, "direct",
                                       runtime={"task_runner": LOCAL_DASK}))
    rounds, pids, listening = probe_flow(cfg.model_dump(mode="json"), run_kind(cfg).resolve_sources(cfg)["paths"])
    assert len(pids) == 2
    for records, probes in rounds:
        assert all(r["error"] is None for r in records)
        assert len({r["fitness"] for r in records}) == 1  # the same genome scores the same on every worker
        assert all(p["threads"] == 1 for p in probes.values())
    first, second = rounds[0][1], rounds[1][1]
    for address, info in second.items():
        assert len(info["resident"]) <= 1
        if first[address]["resident"]:  # a worker that held a model keeps the same one
            assert info["resident"] == first[address]["resident"]
    assert sum(bool(info["resident"]) for info in second.values()) >= 1
    assert listening, "no listening sockets found"
    assert all(ip == "127.0.0.1" for ip, _ in listening), listening


def _listening(psutil, pids: set[int]) -> list[tuple[str, int]]:
    out = []
    for pid in pids:
        for proc in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
            try:
                conns = proc.net_connections(kind="inet")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            out += [(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    return out


def test_unreachable_scheduler_fails_with_one_clear_error(tiny_family, tiny_dataset, tmp_path):
    from evomerge.flows.evolve import evolve

    cfg = make_config(tiny_family, tiny_dataset, tmp_path, "no-scheduler",
                      runtime={"task_runner": {"kind": "dask", "address": "tcp://127.0.0.1:9"}})
    import dask

    with dask.config.set({"distributed.comm.timeouts.connect": "3s"}):
        with pytest.raises(EvomergeError, match=r"could not reach the Dask scheduler at tcp://127.0.0.1:9"):
            evolve(cfg)
