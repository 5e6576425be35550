"""The temporary Prefect API of `evomerge evolve` (flows/local_server.py): a kill -9 of the
command leaves no server behind, an offline run logs no telemetry ERROR, and the start-up limit
is a setting with one clear error when exceeded."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from evomerge.flows.local_server import START_TIMEOUT_ENV, LocalServer, ServerStartError, start_timeout_s

pytestmark = pytest.mark.timeout(300)
REPO = Path(__file__).resolve().parents[2]


def _config(family, data, storage: Path) -> dict:
    return {
        "storage": f"file://{storage}",
        "sources": [{"model": str(family["base"]), "base": True}, {"model": str(family["ft1"])}],
        "optimizer": {"popsize": 3, "seed": 3, "generations": 200},  # long enough to be killed mid-run
        "fitness": {"dataset": {"path": str(data["train"]), "columns": {"prompt": "question", "answer": "target"}},
                    "scorer": "logprob", "accuracy_scorer": "none"},
        "runtime": {"torch_threads": 1},
        "output": {"materialise_best": False},
    }


def _servers(pid: int) -> list[psutil.Process]:
    """The Prefect API server processes among `pid`'s descendants."""
    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if "prefect.server.api.server:create_app" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


def test_kill_9_of_evolve_leaves_no_server_and_no_telemetry_error(tiny_family, tiny_dataset, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(_config(tiny_family, tiny_dataset, tmp_path / "runs")))
    # a new user's environment: no PREFECT_* settings at all (telemetry on by default), no network
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), OMP_NUM_THREADS="1")
    out = tmp_path / "out.log"
    with open(out, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "evomerge.flows.cli", "evolve", str(cfg), "--run-key", "orphan"],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while "generation 1/" not in out.read_text():
            assert proc.poll() is None, out.read_text()[-3000:]
            assert time.monotonic() < deadline, out.read_text()[-3000:]
            time.sleep(0.5)
        servers = _servers(proc.pid)
        assert len(servers) == 1, [s.cmdline() for s in proc.children(recursive=True)]
        server = servers[0]
        assert {c.laddr.ip for c in server.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN} == {"127.0.0.1"}
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        gone, alive = psutil.wait_procs([server], timeout=15)
        assert not alive, f"the temporary Prefect server (pid {server.pid}) outlived the killed command"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = out.read_text()
    assert "Beginning flow run 'evolve-orphan'" in text
    assert "ERROR" not in text and "telemetry" not in text.lower(), text[-3000:]


def test_start_timeout_setting(monkeypatch):
    monkeypatch.delenv(START_TIMEOUT_ENV, raising=False)
    assert start_timeout_s() == 300.0
    monkeypatch.setenv(START_TIMEOUT_ENV, "45")
    assert start_timeout_s() == 45.0
    for bad in ("0", "-3", "soon"):
        monkeypatch.setenv(START_TIMEOUT_ENV, bad)
        with pytest.raises(ServerStartError, match=f"{START_TIMEOUT_ENV}=.*positive number of seconds"):
            start_timeout_s()


def test_a_server_that_does_not_start_in_time_is_one_clear_error_and_is_stopped():
    server = LocalServer()
    try:
        with pytest.raises(ServerStartError) as info:
            server.wait_ready(timeout_s=0.01)
        message = str(info.value)
        assert "did not start within 0 s" in message and START_TIMEOUT_ENV in message and "PREFECT_API_URL" in message
        assert Path(server.log.name).is_file()  # named in the error, so kept
    finally:
        server.stop()
    assert server.proc.poll() is not None
    os.unlink(server.log.name)
