"""Resume logic on file:// storage: retries, fault hook, lease takeover of a dead process,
config and budget checks, the state a run continues from."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from evomerge_core.runs import faults
from evomerge_core.runs import lease as leases
from evomerge_core.runs import resume, retries
from evomerge_core.errors import ConfigError, StorageError, UsageError
from evomerge_core.runs.layout import RESULT, stored_config
from evomerge_core.runs.store import CorruptObjectError, RunStore, RunStoreWarning


def _config(tmp_path, **optimizer):
    from evomerge_core.config.schema import parse_run_config

    return parse_run_config({
        "run_key": "r1",
        "storage": f"file://{tmp_path / 'runs'}",
        "sources": [{"model": "org/base", "base": True}, {"model": "org/ft"}],
        "optimizer": {"popsize": 4, "generations": 3, **optimizer},
        "fitness": {"dataset": {"path": "data.jsonl", "columns": {"prompt": "q", "answer": "a"}}},
    })


def _write_generations(store: RunStore, n: int, popsize: int = 4) -> None:
    for g in range(n):
        cands = [{"generation": g, "index": i, "genome": [g + i / 10], "fitness": float(g + i)} for i in range(popsize)]
        store.write_generation(g, {"generation": g, "summary": {"generation": g}, "candidates": cands,
                                   "optimizer_state": {"popsize": popsize, "generation": g + 1}})
        store.write_latest({"generation": g})


def test_transient_errors_are_retried_others_raised_at_once(monkeypatch):
    monkeypatch.setattr(time, "sleep", lambda s: None)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise StorageError('cannot write s3://b/k: EndpointConnectionError: Could not connect to "http://x"')
        return "ok"

    assert retries.with_retries(flaky, "write", budget_s=60) == "ok" and len(calls) == 3
    for exc in (StorageError("cannot read s3://b/k: PermissionError: Forbidden; check the credentials"),
                CorruptObjectError("s3://b/k fails its sha256 check (timed out)")):
        calls.clear()

        def bad(exc=exc):
            calls.append(1)
            raise exc

        with pytest.raises(StorageError):
            retries.with_retries(bad, "read", budget_s=60)
        assert len(calls) == 1
    calls.clear()

    def down():
        calls.append(1)
        raise StorageError("cannot write s3://b/k: EndpointConnectionError: Could not connect")

    with pytest.raises(StorageError, match="Could not connect"):  # the budget runs out
        retries.with_retries(down, "write", budget_s=0)
    assert len(calls) == 1


def test_fault_hook_parsing_and_failure(monkeypatch):
    monkeypatch.setenv(faults.ENV, "kill_after_candidatez:3")
    with pytest.raises(ConfigError, match="malformed"):
        faults.candidate_stored()
    monkeypatch.setenv(faults.ENV, "fail_during_checkpoint:2")
    faults.at("during_checkpoint", 1)  # another generation: nothing happens
    with pytest.raises(faults.InjectedFault, match="during checkpoint 2"):
        faults.at("during_checkpoint", 2)


def test_fault_kills_the_process_at_the_named_candidate(tmp_path):
    code = ("from evomerge_core.runs import faults\n"
            "for i in range(5):\n    print(i, flush=True)\n    faults.candidate_stored()\n")
    proc = subprocess.run([sys.executable, "-c", code], env={"EVOMERGE_FAULT": "kill_after_candidates:3",
                                                              "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9 and proc.stdout.split() == ["0", "1", "2"]


def test_lease_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
    store = RunStore(f"file://{tmp_path}", "leased")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store.acquire_lease("old-owner", ttl_s=600)
    lease = store.read_lease()
    assert leases.holder_is_gone({**lease, "pid": dead.pid})
    assert not leases.holder_is_gone(lease)  # this very process
    assert not leases.holder_is_gone({**lease, "pid": 1, "host": "another-host"})
    with pytest.raises(StorageError, match="run is already in progress"):
        store.acquire_lease("new-owner", ttl_s=600, takeover_if=leases.holder_is_gone)
    # the same lease as written by the (now dead) child process
    store._backend.write_bytes("lease.json", store._encode({**lease, "pid": dead.pid}, "lease.json"))
    leases.ensure_lease_free(store)  # a dead holder does not block a start
    with pytest.warns(RunStoreWarning, match="unexpired lease of owner 'old-owner'.*process is gone"):
        store.acquire_lease("new-owner", ttl_s=600, takeover_if=leases.holder_is_gone)
    assert store.read_lease()["owner"] == "new-owner"


def test_open_run_refuses_a_second_live_run(tmp_path):
    config = _config(tmp_path)
    run = resume.open_run(config, resume=True, owner="first")
    try:
        with pytest.raises(StorageError, match="already in progress.*owner 'first'"):
            resume.open_run(config, resume=True, owner="second")
        with pytest.raises(StorageError, match="already in progress"):
            resume.check_before_start(config, resume=True)
    finally:
        run.close()
    assert run.store.read_lease() is None
    resume.open_run(config, resume=True, owner="second").close()


def test_resume_state_budget_and_config_checks(tmp_path):
    config = _config(tmp_path)
    run = resume.open_run(config, resume=True, owner="a")
    _write_generations(run.store, 2)
    run.close()
    state = resume.check_resumable(run.store, config)
    assert state.next_generation == 2 and [c["index"] for c in state.history] == [0, 1, 2, 3] * 2
    assert state.optimizer_state == {"popsize": 4, "generation": 2}
    with pytest.raises(ConfigError, match=r"differs in optimizer.sigma0(.|\n)*optimizer.sigma0: 0.1666"):
        resume.check_resumable(run.store, _config(tmp_path, sigma0=0.3))
    with pytest.raises(UsageError, match="already completed 2 generations, more than the 1"):
        resume.check_resumable(run.store, _config(tmp_path, generations=1))
    assert resume.check_resumable(run.store, _config(tmp_path, generations=None, evaluations=40)).next_generation == 2
    _write_generations(run.store, 3)
    run.store.write_json(RESULT, {"history": []})
    with pytest.raises(UsageError, match="already finished.*raise optimizer.generations"):
        resume.check_resumable(run.store, config)
    assert resume.check_resumable(run.store, _config(tmp_path, generations=5)).next_generation == 3
    # an older schema's config (a setting added since) still resumes
    old = stored_config(config)
    old["fitness"].pop("batch_size")  # as if batch_size had been added since
    run.store.write_config(old)
    assert resume.check_resumable(run.store, _config(tmp_path, generations=5)).next_generation == 3


def test_damaged_older_generation_is_a_clear_error(tmp_path):
    store = RunStore(f"file://{tmp_path}", "r")
    _write_generations(store, 3)
    (tmp_path / "r" / "generations" / "00000.json").write_text("{")
    with pytest.raises(StorageError, match=r"generations/00000.json is not valid JSON.*--no-resume"):
        resume.load_state(store)


def test_candidate_keys_depend_on_genome_sources_and_evaluation_config(tmp_path):
    src = tmp_path / "m"
    src.mkdir()
    (src / "w.safetensors").write_bytes(b"1234")
    revs = resume.source_revisions({"m": str(src)})
    config = _config(tmp_path)
    k1 = resume.candidate_keys(config, revs, [[0.1, 0.2]])
    assert k1 == resume.candidate_keys(config, revs, [[0.1, 0.2]])
    assert k1 != resume.candidate_keys(config, revs, [[0.1, 0.2000001]])
    assert k1 == resume.candidate_keys(_config(tmp_path, generations=9), revs, [[0.1, 0.2]])  # budget: same
    from evomerge_core.config.schema import parse_run_config

    other = parse_run_config({**config.model_dump(mode="json"), "runtime": {"dtype": "bfloat16"}})
    assert k1 != resume.candidate_keys(other, revs, [[0.1, 0.2]])
    (src / "w.safetensors").write_bytes(b"12345")
    assert k1 != resume.candidate_keys(config, resume.source_revisions({"m": str(src)}), [[0.1, 0.2]])


@pytest.mark.parametrize("popsize", [4, None])
def test_optimizer_state_round_trip_continues_identically(popsize):
    """A small population makes `cma` keep a `range` in its state; it must load (regression)."""
    import json

    from evomerge_core.optim.cmaes import CMAES

    def f(v):
        return -sum((x - 0.3) ** 2 for x in v)

    a = CMAES([0.5] * 4, sigma0=1 / 6, lower=[0] * 4, upper=[1] * 4, popsize=popsize, seed=11)
    straight, resumed, b = [], [], None
    for g in range(6):
        if g == 2:
            b = CMAES.from_state_dict(json.loads(json.dumps(a.state_dict())))
        xs = a.ask()
        a.tell(xs, [f(x) for x in xs])
        straight.append(xs)
        if b is not None:
            ys = b.ask()
            b.tell(ys, [f(y) for y in ys])
            resumed.append(ys)
    assert straight[2:] == resumed
