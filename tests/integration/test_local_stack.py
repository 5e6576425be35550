"""`infra/local_stack.sh start|status|stop`: Prefect server + UI, SeaweedFS and a Dask cluster,
every listening socket on 127.0.0.1 (checked with psutil over the recorded PIDs and their
children); `evomerge evolve` runs against it with candidates on the stack's Dask workers
(`task_runner.address`) and the run store in its S3 bucket; stop leaves nothing running."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "infra" / "local_stack.sh"


def _free_base(span: int = 20) -> int:
    for base in range(41000, 60000, 97):
        ok = True
        for port in range(base, base + span):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free port range")


def _stack(action: str, env: dict[str, str], timeout: int = 400) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), action], env=env, capture_output=True, text=True, timeout=timeout)


def _pids(state: Path) -> dict[str, int]:
    return {f.stem: int(f.read_text()) for f in (state / "pids").glob("*.pid")}


def _listening(pids: dict[str, int]) -> dict[str, set[tuple[str, int]]]:
    out = {}
    for name, pid in pids.items():
        found = set()
        proc = psutil.Process(pid)
        for p in [proc, *proc.children(recursive=True)]:
            try:
                found |= {(c.laddr.ip, c.laddr.port) for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        out[name] = found
    return out


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    base = _free_base()
    state = tmp_path_factory.mktemp("stack")
    env = {**os.environ, "EVOMERGE_STACK_BASE_PORT": str(base), "EVOMERGE_STACK_DIR": str(state),
           "EVOMERGE_STACK_WORKERS": "2"}
    started = _stack("start", env)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield {"base": base, "state": state, "env": env, "start": started}
    finally:
        stopped = _stack("stop", env)
        assert stopped.returncode == 0, stopped.stderr


def test_every_socket_of_the_stack_is_on_loopback_and_stop_ends_it(stack, tmp_path):
    from distributed import Client

    base, state = stack["base"], stack["state"]
    with Client(f"tcp://127.0.0.1:{base + 1}", timeout=60) as client:
        client.wait_for_workers(2, timeout=180)
        assert len(client.scheduler_info()["workers"]) == 2
    pids = _pids(state)
    assert set(pids) == {"prefect", "seaweedfs", "dask-scheduler", "dask-workers"}
    listening = _listening(pids)
    everything = set().union(*listening.values())
    assert {("127.0.0.1", base), ("127.0.0.1", base + 1), ("127.0.0.1", base + 16)} <= everything
    assert listening["dask-workers"], "the Dask workers listen on nothing"
    assert all(ip == "127.0.0.1" for ip, _ in everything), listening
    status = _stack("status", stack["env"])
    assert status.returncode == 0 and f"http://127.0.0.1:{base}/" in status.stdout
    secret = dict(line.split("=", 1) for line in (state / "s3.env").read_text().split())["AWS_SECRET_ACCESS_KEY"]
    assert secret not in status.stdout + stack["start"].stdout + stack["start"].stderr
    assert oct((state / "s3.env").stat().st_mode & 0o777) == "0o600"


def test_evolve_runs_on_the_stack_dask_workers_and_s3(stack, tmp_path):
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import make_tiny_family

    base, state = stack["base"], stack["state"]
    family = make_tiny_family(tmp_path / "family", n_finetunes=2, seed=0, noise=0.02)
    rows = [{"question": f"what is {i} plus 1? ", "target": str(i + 1)} for i in range(4)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s3 = dict(line.split("=", 1) for line in (state / "s3.env").read_text().split())
    config = {
        "run_key": "stack-run",
        "storage": "s3://evomerge/runs",
        "storage_options": {"endpoint_url": s3["AWS_ENDPOINT_URL"]},
        "sources": [{"model": str(family["base"]), "base": True}, {"model": str(family["ft1"])},
                    {"model": str(family["ft2"])}],
        "space": {"ps": {"method": "dare_ties", "params": ["density", "weight"]}},
        "optimizer": {"popsize": 4, "seed": 3, "generations": 2},
        "fitness": {"dataset": {"path": str(data), "columns": {"prompt": "question", "answer": "target"}},
                    "scorer": "logprob", "accuracy_scorer": "none", "batch_size": 4},
        "runtime": {"task_runner": {"kind": "dask", "address": f"tcp://127.0.0.1:{base + 1}"}},
        "output": {"materialise_best": False},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**stack["env"], "PREFECT_API_URL": f"http://127.0.0.1:{base}/api", "PREFECT_HOME": str(state / "prefect-home"),
           **{k: v for k, v in s3.items() if k.startswith("AWS_") and k != "AWS_ENDPOINT_URL"}}
    done = subprocess.run([sys.executable, "-m", "evomerge.flows.cli", "evolve", str(path)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"candidates run on the Dask cluster at tcp://127.0.0.1:{base + 1}" in done.stdout
    assert s3["AWS_SECRET_ACCESS_KEY"] not in done.stdout + done.stderr

    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with SyncPrefectClient(f"http://127.0.0.1:{base}/api") as client:
        (run,) = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["evolve-stack-run"])))
        assert run.state.is_completed()
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [run.id]}))
    evals = sorted(t.name for t in tasks if t.name.startswith("eval-"))
    assert evals == sorted(f"eval-g{g}-c{i}" for g in range(2) for i in range(4))
    assert all(t.state.is_completed() for t in tasks)

    from evomerge_core.runs.store import RunStore

    store = RunStore("s3://evomerge/runs", "stack-run", storage_options={
        "endpoint_url": s3["AWS_ENDPOINT_URL"], "key": s3["AWS_ACCESS_KEY_ID"], "secret": s3["AWS_SECRET_ACCESS_KEY"]})
    assert len(store.read_json("result.json")["history"]) == 8


def test_stop_ends_every_process_and_frees_the_ports(stack):
    pids = _pids(stack["state"])
    groups = {}
    for name, pid in pids.items():
        groups[name] = [pid, *(p.pid for p in psutil.Process(pid).children(recursive=True))]
    stopped = _stack("stop", stack["env"])
    assert stopped.returncode == 0, stopped.stderr
    for name, members in groups.items():
        alive = [p for p in members if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        assert not alive, f"{name} left {alive}"
    assert not list((stack["state"] / "pids").glob("*.pid"))
    for port in (stack["base"], stack["base"] + 1, stack["base"] + 16):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, port
