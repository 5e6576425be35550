"""Operating evomerge through Prefect, in a real `prefect server` + process worker (both on
127.0.0.1, per-module PREFECT_HOME, analytics off, stopped by PID), deployed with infra/deploy.sh:

- a flow process killed with SIGKILL mid-run: its run is marked Crashed, and a re-run of the
  deployment frees the dead run's concurrency slot and resumes within a minute, no manual step;
- the deployment's own flow run carries the progress: artifacts (progress, candidate table, best
  recipe with an inline fitness chart), the progress lines in its logs, a name with the run key;
- a `{date}` run key gives each scheduled run its own key;
- a duplicate run of a finished key completes at once (not red), and the slot limit is deleted;
- the evolve-completed event is emitted and the shipped publish-on-completion trigger runs the
  publish-run deployment (switched on here, staging as a dry run);
- configured flow-run retries: a failure is retried and the retry resumes from the run store.

`infra/check_deployment.sh` is the same deployment check as a script for operators.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

# serial: a killed run's slot lease (60 s) must outlive the re-run's start, which CPU contention
# from a parallel test worker can stretch past it (`make test` runs serial tests alone, at the end)
pytestmark = [pytest.mark.slow, pytest.mark.serial, pytest.mark.timeout(900)]
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """TERM the process group started for `proc`, KILL after 20 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Server, work pool, deployments + automations (infra/deploy.sh), one process worker."""
    import httpx

    work = tmp_path_factory.mktemp("prefect-ops")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(work / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_API_URL=api,
               OMP_NUM_THREADS="1", EVOMERGE_REPO=str(REPO), EVOMERGE_FLOW_RETRY_DELAY_S="2")
    procs = []
    try:
        server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                  env=env, stdout=open(work / "server.log", "w"), stderr=subprocess.STDOUT,
                                  start_new_session=True)
        procs.append(server)
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{api}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, (work / "server.log").read_text()[-3000:]
            time.sleep(1)
        subprocess.run([str(BIN / "prefect"), "work-pool", "create", "evomerge-local", "--type", "process"], env=env,
                       check=True, capture_output=True, timeout=120)
        deployed = subprocess.run(["bash", str(REPO / "infra" / "deploy.sh")], env=env, capture_output=True, text=True,
                                  timeout=300)
        assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
        assert "evolve-gpu skipped (set EVOMERGE_IMAGE" in deployed.stdout
        worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "evomerge-local", "--limit", "3"],
                                  env=env, cwd=work, stdout=open(work / "worker.log", "w"), stderr=subprocess.STDOUT,
                                  start_new_session=True)
        procs.append(worker)
        yield {"api": api, "env": env, "work": work, "family": _tiny_world(work)}
    finally:
        for proc in reversed(procs):
            _stop(proc)


def _tiny_world(work: Path) -> Path:
    """A tiny run config (3 generations of 4) on tiny Llama models; returns its path."""
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import make_tiny_family

    family = make_tiny_family(work / "family", n_finetunes=2, seed=0, noise=0.02)
    for model in family.values():  # a license on the card (publish refuses unknown ones)
        (Path(model) / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny test model\n")
    rows = [{"question": f"what is {i} plus 1? ", "target": str(i + 1)} for i in range(4)]
    (work / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = work / "run.yaml"
    path.write_text(yaml.safe_dump({
        "storage": f"file://{work}/runs",
        "sources": [{"model": str(family["base"]), "base": True}, {"model": str(family["ft1"])},
                    {"model": str(family["ft2"])}],
        "space": {"ps": {"method": "dare_ties", "params": ["density", "weight"]}},
        "optimizer": {"popsize": 4, "seed": 1, "generations": 3},
        "fitness": {"dataset": {"path": str(work / "train.jsonl"), "columns": {"prompt": "question", "answer": "target"}},
                    "scorer": "logprob", "accuracy_scorer": "none", "batch_size": 4},
        "runtime": {"torch_threads": 1},
        "output": {"materialise_best": True, "report": True},
    }))
    return path


def _client(api: str):
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(api)


def _run(api: str, deployment: str, parameters: dict, env: dict | None = None, scheduled: dt.datetime | None = None):
    from prefect.states import Scheduled

    with _client(api) as client:
        dep = client.read_deployment_by_name(deployment)
        state = Scheduled(scheduled_time=scheduled) if scheduled else None
        return client.create_flow_run_from_deployment(dep.id, parameters=parameters, state=state,
                                                      job_variables={"env": env} if env else None)


def _wait(api: str, run_id, timeout_s: float = 300, final: bool = True):
    with _client(api) as client:
        deadline = time.monotonic() + timeout_s
        while True:
            run = client.read_flow_run(run_id)
            if run.state is not None and (run.state.is_final() if final else not run.state.is_scheduled()):
                return run
            assert time.monotonic() < deadline, f"flow run {run.name} still {run.state}"
            time.sleep(1)


def _logs(api: str, run_id) -> list:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    with _client(api) as client:
        return client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])), sort=LogSort.TIMESTAMP_ASC)


def _wait_for_log(api: str, run_id, text: str, timeout_s: float = 60) -> None:
    """A run's log line containing `text` (a finished flow process ships its last logs at exit,
    so they may reach the API a moment after the final state)."""
    deadline = time.monotonic() + timeout_s
    while True:
        logs = _logs(api, run_id)
        if any(text in log.message for log in logs):
            return
        assert time.monotonic() < deadline, [log.message for log in logs]
        time.sleep(2)


def _artifacts(api: str, run_id) -> list:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with _client(api) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))


def _limits(api: str) -> list[str]:
    with _client(api) as client:
        return [limit.name for limit in client.read_global_concurrency_limits(limit=200)]


def _enable_publish_on_completion(api: str, dry_run: Path) -> None:
    """The shipped trigger of publish-run, switched on, with a target repo and a dry run."""
    from prefect.events.schemas.automations import AutomationCore

    with _client(api) as client:
        (automation,) = [a for a in client.read_automations() if "publish-run" in a.name]
        assert automation.enabled is False  # shipped off
        assert automation.trigger.expect == {"evomerge.evolve.completed"}
        (action,) = automation.actions
        assert action.parameters["run_key"] == "{{ event.payload.run_key }}"
        action.parameters.update(repo_id="test-org/evomerge-ops", dry_run=f"{dry_run}/{{{{ event.payload.run_key }}}}")
        spec = AutomationCore.model_validate({**automation.model_dump(exclude={"id", "created", "updated", "owner_resource"}),
                                              "enabled": True, "actions": [action]})
        client.update_automation(automation.id, spec)


def test_operating_evomerge_through_prefect(stack):
    api, work, cfg = stack["api"], stack["work"], str(stack["family"])
    _enable_publish_on_completion(api, work / "published")
    # 0. configured retries (alongside the rest): a failure after generation 1, retried, resumes
    fault = {"EVOMERGE_FAULT": "fail_after_generation:0", "EVOMERGE_FAULT_ONCE": str(work / "fired")}
    retried = _run(api, "evolve-config/evolve", {"config_path": cfg, "run_key": "ops-retry"}, env=fault)
    monday = dt.datetime(2026, 12, 7, 3, 0, tzinfo=dt.timezone.utc)
    params = {"config_path": cfg, "run_key": "ops-{date}"}
    key = "ops-2026-12-07"
    # 1. the flow process kills itself (SIGKILL) after 5 candidates: generation 1 is checkpointed
    killed = _run(api, "evolve-config/evolve", params, env={"EVOMERGE_FAULT": "kill_after_candidates:5"},
                  scheduled=monday)
    killed = _wait(api, killed.id)
    assert killed.state.type.value in {"CRASHED", "FAILED"}, killed.state
    assert killed.name == f"evolve-config-{key}"
    assert f"evomerge-run-{key}" in _limits(api)  # the dead run's slot, still taken
    # 2. a re-run of the same key: frees the dead run's slot and resumes, within a minute
    rerun = _run(api, "evolve-config/evolve", params, scheduled=monday)
    rerun = _wait(api, rerun.id)
    assert rerun.state.is_completed(), rerun.state
    logs = _logs(api, rerun.id)
    resumed = [log for log in logs if "resuming from generation 2/3" in log.message]
    assert resumed, [log.message for log in logs]
    assert (resumed[0].timestamp - rerun.start_time).total_seconds() < 60
    assert any("no longer alive" in log.message and "freeing its concurrency slot" in log.message for log in logs)
    progress = [log.message for log in logs if log.message.startswith("generation ")]
    assert [line.split()[1] for line in progress] == ["2/3", "3/3"]
    # 3. the deployment's own run carries the artifacts, with keys of this run and an inline chart
    arts = {a.key: a for a in sorted(_artifacts(api, rerun.id), key=lambda a: a.created)}  # newest version per key
    tags = {k.rsplit("-", 1)[1] for k in arts}
    assert {"progress", "candidates", "best", "plot"} <= tags, sorted(arts)
    assert all(k.startswith(f"{key}-") for k in arts)
    best = next(a for k, a in arts.items() if k.endswith("-best"))
    assert "generation 3 of 3" in best.data and "](data:image/png;base64," in best.data
    # 4. the slot limit is gone; a duplicate run completes at once and does nothing
    assert f"evomerge-run-{key}" not in _limits(api)
    duplicate = _run(api, "evolve-config/evolve", params, scheduled=monday)
    # 5. another week is a new run key (here with a missing config: a Failed run named with its key)
    other_week = _run(api, "evolve-config/evolve", {**params, "config_path": str(work / "missing.yaml")},
                      scheduled=monday - dt.timedelta(days=7))
    duplicate = _wait(api, duplicate.id)
    assert duplicate.state.is_completed(), duplicate.state
    _wait_for_log(api, duplicate.id, "already finished")
    # 6. the evolve-completed event ran the publish-run deployment (a dry run into work/published)
    with _client(api) as client:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

        deadline = time.monotonic() + 180
        while not (runs := client.read_flow_runs(flow_run_filter=FlowRunFilter(
                name=FlowRunFilterName(any_=[f"publish-run-{key}"])))):
            assert time.monotonic() < deadline, "the publish-on-completion trigger did not run publish-run"
            time.sleep(2)
    assert len(runs) == 1  # one completion event (the duplicate emitted none)
    published = _wait(api, runs[0].id)
    assert published.state.is_completed(), published.state
    staged = work / "published" / key
    assert (staged / "README.md").is_file() and list(staged.glob("*.safetensors"))
    other_week = _wait(api, other_week.id)
    assert other_week.name == "evolve-config-ops-2026-11-30"
    assert other_week.state.is_failed() and "missing.yaml" in other_week.state.message
    assert other_week.run_count == 1  # bad input is not retried
    # 7. the retried run: failed once, retried in the same flow run, resumed and completed
    retried = _wait(api, retried.id)
    assert retried.state.is_completed(), retried.state
    assert retried.run_count == 2  # the failed attempt and one retry
    messages = [log.message for log in _logs(api, retried.id)]
    assert any("InjectedFault" in m for m in messages)
    assert any("resuming from generation 2/3" in m for m in messages)
    assert not [name for name in _limits(api) if name.startswith("evomerge-run-")]  # no limit left behind
