"""The fault matrix (issue 11): what a run does when a Dask worker dies mid-candidate, a
candidate runs out of memory, a merged model gives NaN/inf logits, a generation never emits its
stop string, the disk fills up while a model dir is written, the Prefect API is unreachable at
start, a publish is interrupted, or the flow process gets SIGTERM. Each test checks the run
either continues or stops with one clear message, that no finished evaluation is lost or redone,
and that a resume completes with the uninterrupted run's history. Expected and observed outcomes
are listed in docs/reliability.md ("Fault matrix").

Runs are in process against one Prefect test server for this module (fast); the SIGTERM and
disk-full cases run `evomerge` in a subprocess, as a user would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

# Prefect reads PREFECT_HOME when its settings load: set it before anything imports prefect.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="evomerge-prefect-home-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from test_faults_helpers import LOG_ENV, read_log, run_config, strip, write_data  # noqa: E402

pytestmark = pytest.mark.timeout(300)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def prefect_api():
    """A Prefect test server for this module; yields its API URL (for subprocesses too)."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama base and two fine-tunes of it."""
    import torch

    from tiny_models import make_tiny_family

    torch.set_num_threads(1)
    return make_tiny_family(tmp_path_factory.mktemp("family"), n_finetunes=2, seed=0, noise=0.02)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("data") / "train.jsonl")


@pytest.fixture(scope="module")
def baseline(prefect_api, family, data, tmp_path_factory) -> list[dict]:
    """The uninterrupted run's history (default runner) every faulted run is compared with."""
    from evomerge.flows.evolve import evolve
    from evomerge_core.kinds.cache import clear_model_cache

    clear_model_cache()
    result = evolve(run_config(family, data, tmp_path_factory.mktemp("baseline"), "baseline"))
    assert len(result["history"]) == 8 and all(h.get("error") is None for h in result["history"])
    return strip(result["history"])


@pytest.fixture
def eval_log(tmp_path, monkeypatch) -> Path:
    """Every finished evaluation of this test (flow process and Dask workers) is logged here."""
    path = tmp_path / "evaluations.jsonl"
    monkeypatch.setenv(LOG_ENV, str(path))
    return path


def _write_config(path: Path, config: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _cli(capfd, *argv: str) -> tuple[int, str, str]:
    """`evomerge ARGV` in this process: (exit code, stdout, stderr)."""
    from evomerge.flows.cli import main
    from evomerge_core.kinds.cache import clear_model_cache

    clear_model_cache()
    capfd.readouterr()
    rc = main(list(argv))
    out = capfd.readouterr()
    return rc, out.out, out.err


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error: ")]


def _line(text: str, start: str) -> str | None:
    return next((line for line in text.splitlines() if line.startswith(start)), None)


def _result(storage: Path, run_key: str) -> dict:
    return json.loads((storage / run_key / "result.json").read_text())["payload"]


def _each_once(log: list[dict], history: list[dict]) -> None:
    """Every candidate of the history finished exactly once over all runs: nothing redone."""
    finished = sorted(tuple(e["genome"]) for e in log)
    assert finished == sorted(tuple(h["genome"]) for h in history), (len(finished), len(history))


# ----------------------------------------------------------------------------- 1. Dask worker killed



@pytest.fixture(scope="module")
def dask_killed(prefect_api, family, data, tmp_path_factory) -> dict:
    """Default Dask settings: a run on two workers, one SIGKILLed between merging and scoring its
    2nd candidate (``EVOMERGE_FAULT_ONCE``: the restarted worker does not fire again)."""
    from evomerge.flows.evolve import evolve
    from evomerge_core.kinds.cache import clear_model_cache

    root = tmp_path_factory.mktemp("dask-kill")
    mp = pytest.MonkeyPatch()
    mp.setenv(LOG_ENV, str(root / "evaluations.jsonl"))
    mp.setenv("EVOMERGE_FAULT", "kill_during_candidate:2")  # the workers inherit the environment
    mp.setenv("EVOMERGE_FAULT_ONCE", str(root / "fired"))
    try:
        clear_model_cache()
        started = time.monotonic()
        result = evolve(run_config(family, data, root / "runs", "dask-kill",
                                   runtime={"task_runner": {"kind": "dask", "workers": 2}}))
        seconds = time.monotonic() - started
    finally:
        mp.undo()
    return {"result": result, "log": read_log(root / "evaluations.jsonl"), "fired": (root / "fired.during_candidate"),
            "seconds": seconds}


@pytest.fixture(scope="module")
def dask_stopped(prefect_api, family, data, tmp_path_factory) -> dict:
    """``distributed.scheduler.allowed-failures: 0`` (a task whose worker died is not run
    again), one worker killed mid-candidate: `evomerge evolve` stops; then the same command on
    the default runner (a run may change runners) resumes it."""
    import dask

    root = tmp_path_factory.mktemp("dask-stop")
    runs = root / "runs"
    on_dask = _write_config(root / "dask.yaml", run_config(family, data, runs, "dask-stop",
                                                           runtime={"task_runner": {"kind": "dask", "workers": 1}}))
    mp = pytest.MonkeyPatch()
    mp.setenv(LOG_ENV, str(root / "evaluations.jsonl"))
    mp.setenv("EVOMERGE_FAULT", "kill_during_candidate:2")
    mp.setenv("EVOMERGE_FAULT_ONCE", str(root / "fired"))
    try:
        with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
            stop = _cli_plain("evolve", str(on_dask))
        stopped_log = read_log(root / "evaluations.jsonl")
        lease_left = (runs / "dask-stop" / "lease.json").exists()
        mp.delenv("EVOMERGE_FAULT")
        resume = _cli_plain("evolve", str(_write_config(root / "run.yaml", run_config(family, data, runs, "dask-stop"))))
    finally:
        mp.undo()
    return {"stop": stop, "resume": resume, "stopped_log": stopped_log, "lease_left": lease_left,
            "log": read_log(root / "evaluations.jsonl"), "runs": runs}


def _cli_plain(*argv: str) -> tuple[int, str, str]:
    """`evomerge ARGV` in this process, its stdout/stderr captured (for module fixtures, which
    cannot use capfd)."""
    import contextlib
    import io

    from evomerge.flows.cli import main
    from evomerge_core.kinds.cache import clear_model_cache

    clear_model_cache()
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


@pytest.mark.slow
def test_dask_worker_killed_mid_candidate_run_continues_with_the_same_history(dask_killed, baseline):
    """The killed worker's nanny restarts it and the scheduler runs the lost candidate again:
    the run finishes with the uninterrupted history."""
    assert dask_killed["fired"].exists()  # a worker was killed
    assert strip(dask_killed["result"]["history"]) == baseline
    print(f"\ndask kill: {len(dask_killed['log'])} finished evaluations for 8 candidates, "
          f"{dask_killed['seconds']:.1f} s")


@pytest.mark.slow
def test_dask_worker_killed_without_retries_stops_with_one_error_and_resumes(dask_stopped, baseline):
    """The run stops with one `error:` line (CandidateRunError, exit 1) and releases its lease;
    the resume ends with the uninterrupted history."""
    rc, out, err = dask_stopped["stop"]
    assert rc == 1, err[-3000:]
    errors = _error_lines(err)
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err[-3000:]
    assert "on Dask did not finish: its Dask worker died or was lost" in errors[0] and "KilledWorker" in errors[0]
    assert not dask_stopped["lease_left"]
    assert 0 < len(dask_stopped["stopped_log"]) < 8
    rc, out, err = dask_stopped["resume"]
    print(f"\ndask stop: {len(dask_stopped['stopped_log'])} finished before the stop, "
          f"{len(dask_stopped['log'])} in all for 8 candidates; {errors[0][:160]}")
    assert rc == 0, err[-3000:]
    assert "resuming from generation" in out or "reused" in out
    assert strip(_result(dask_stopped["runs"], "dask-stop")["history"]) == baseline


@pytest.mark.slow
def test_dask_worker_killed_no_finished_evaluation_is_redone(dask_killed, dask_stopped):
    _each_once(dask_killed["log"], dask_killed["result"]["history"])
    _each_once(dask_stopped["log"], _result(dask_stopped["runs"], "dask-stop")["history"])


# ----------------------------------------------------------------------------- 2. out of memory


@pytest.mark.parametrize("fault", ["oom", "cpuoom"])
def test_out_of_memory_stops_with_one_error_and_resumes(fault, prefect_api, family, data, baseline, eval_log, tmp_path,
                                                        monkeypatch, capfd):
    """A candidate running out of memory (CUDA's OutOfMemoryError, or a real failed CPU
    allocation) stops the run with one `error:` line naming the candidate and the fix (exit 1);
    it is not recorded as a failed candidate; the resume evaluates it and ends with the
    uninterrupted history, no finished evaluation redone."""
    from evomerge_core.runs import faults

    runs = tmp_path / "runs"
    config = _write_config(tmp_path / "run.yaml", run_config(family, data, runs, f"oom-{fault}"))
    faults.reset_counts()
    monkeypatch.setenv("EVOMERGE_FAULT", f"{fault}_during_candidate:3")
    rc, out, err = _cli(capfd, "evolve", str(config))
    assert rc == 1, err[-3000:]
    errors = _error_lines(err)
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err[-3000:]
    assert " ran out of memory (" in errors[0] and "lower fitness.batch_size" in errors[0]
    assert "run the same command again to resume" in errors[0]
    assert ("OutOfMemoryError" if fault == "oom" else "can't allocate memory") in errors[0]
    assert not (runs / f"oom-{fault}" / "latest.json").exists()  # generation 0 never completed
    stopped = len(read_log(eval_log))
    assert 2 <= stopped < 4  # the others of generation 0 that finished were stored
    monkeypatch.delenv("EVOMERGE_FAULT")
    rc, out, err = _cli(capfd, "evolve", str(config))
    assert rc == 0, err[-3000:]
    with capfd.disabled():
        print(f"\n{fault}: {stopped} finished before the stop; resume: {_line(out, 'evaluations: ')}; {errors[0][:150]}")
    history = _result(runs, f"oom-{fault}")["history"]
    assert strip(history) == baseline
    _each_once(read_log(eval_log), history)


# ----------------------------------------------------------------------------- 3. NaN / inf


@pytest.mark.parametrize("fault", ["nan", "inf"])
def test_nan_or_inf_weights_fail_the_candidate_and_the_run_goes_on(fault, prefect_api, family, data, baseline,
                                                                    tmp_path, monkeypatch):
    """The 2nd candidate's merged output head is overwritten with NaN/inf: it is recorded with
    the scorer's worst fitness (finite) and the error, the next candidate gets clean weights
    again, and CMA-ES only ever sees finite values (it raises otherwise)."""
    import math

    from evomerge.flows.evolve import evolve
    from evomerge_core.runs import faults
    from evomerge_core.kinds.cache import clear_model_cache
    from evomerge_core.runs.store import RunStore

    faults.reset_counts()
    monkeypatch.setenv("EVOMERGE_FAULT", f"{fault}_during_candidate:2")
    clear_model_cache()
    result = evolve(run_config(family, data, tmp_path / "runs", f"poison-{fault}"))
    assert len(result["history"]) == 8 and all(math.isfinite(h["fitness"]) for h in result["history"])
    first = RunStore(f"file://{tmp_path / 'runs'}", f"poison-{fault}").read_generation(0)
    failed = [c for c in first["candidates"] if c["error"]]
    assert len(failed) == 1 and failed[0]["fitness"] == -10.0  # counted.worst_fitness
    assert failed[0]["error"] == "ValueError: the merged model produces NaN/inf logits"
    assert first["summary"]["failed"] == 1
    # the other candidates of generation 0 score exactly as in the uninterrupted run
    clean = [strip([c])[0] for c in first["candidates"] if not c["error"]]
    assert clean and all(c in baseline for c in clean)


def test_non_finite_failure_fitness_is_refused_before_the_run(family, data, tmp_path, capfd):
    """A failed candidate's fitness is told to CMA-ES: `failure_fitness: .nan` is a config error."""
    config = run_config(family, data, tmp_path / "runs", "nan-worst", fitness={"failure_fitness": float("nan")})
    rc, out, err = _cli(capfd, "evolve", str(_write_config(tmp_path / "run.yaml", config)))
    assert rc == 2 and _error_lines(err) == err.strip().splitlines(), err
    assert "fitness.failure_fitness is nan" in err and "finite" in err
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- 4. no stop string


def test_generation_that_never_emits_its_stop_string_is_bounded(prefect_api, family, data, eval_log, tmp_path):
    """A stop string the tiny vocabulary cannot produce ('#' is not in it): every generation
    stops after max_new_tokens forward steps, is scored, and the run finishes."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.flows.evolve import evolve
    from evomerge_core.kinds.cache import clear_model_cache
    from evomerge_core.generation.hf_loop import greedy_generate

    model = AutoModelForCausalLM.from_pretrained(family["ft1"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(family["ft1"])
    steps = []
    forward = model.forward
    model.forward = lambda *a, **k: steps.append(1) or forward(*a, **k)
    for limit in (5, 40):
        steps.clear()
        out = greedy_generate(model, tokenizer, ["what is 1 plus 1? "], max_new_tokens=limit, stop_strings=("###",))
        assert len(steps) == limit and len(out[0]) <= limit  # bounded by max_new_tokens, not by a stop

    clear_model_cache()
    config = run_config(family, data, tmp_path / "runs", "no-stop", scorer="test_faults_helpers:generated",
                        fitness={"stop_strings": ["###"], "max_new_tokens": 6})
    result = evolve(config)
    assert len(result["history"]) == 8
    logged = read_log(eval_log)
    assert len(logged) == 8 and all(len(e["outputs"]) == 2 for e in logged)
    assert all(len(o) <= 6 and "###" not in o for e in logged for o in e["outputs"])
    assert any(o for e in logged for o in e["outputs"])  # something was generated
    first = json.loads((tmp_path / "runs" / "no-stop" / "generations" / "00000.json").read_text())["payload"]
    assert all(c["error"] is None for c in first["candidates"])


# ----------------------------------------------------------------------------- 5. disk full

FILE_LIMIT = 64 * 1024  # bytes: every run-store document fits, a tiny model's weights (92 KB) do not


def _file_size_limit() -> None:
    """In the child before exec: writes beyond FILE_LIMIT fail with EFBIG (SIGXFSZ ignored), as
    a full disk fails them with ENOSPC."""
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT, FILE_LIMIT))


def _subprocess_env(prefect_api: str | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "EVOMERGE_FAULT"))}
    env.update(PREFECT_HOME=os.environ["PREFECT_HOME"], PREFECT_SERVER_ANALYTICS_ENABLED="false", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO / "tests" / "integration"), str(REPO / "tests"),
                                           *filter(None, [os.environ.get("PYTHONPATH")])]), **extra)
    if prefect_api:
        env["PREFECT_API_URL"] = prefect_api
    return env


@pytest.fixture(scope="module")
def merge_disk_full(family, tmp_path_factory) -> dict:
    """`evomerge merge` with writes limited to FILE_LIMIT bytes per file, then again without."""
    import yaml

    root = tmp_path_factory.mktemp("disk-full")
    recipe = {"merge_method": "dare_ties", "base_model": str(family["base"]), "models": [
        {"model": str(family["ft1"]), "parameters": {"density": 0.5, "weight": 0.5}},
        {"model": str(family["ft2"]), "parameters": {"density": 0.5, "weight": 0.5}}]}
    (root / "merge.yaml").write_text(yaml.safe_dump(recipe))
    out_dir = root / "out" / "merged"
    cmd = [sys.executable, "-m", "evomerge.flows.cli", "merge", str(root / "merge.yaml"), str(out_dir), "--no-progress"]
    full = subprocess.run(cmd, cwd=REPO, env=_subprocess_env(), capture_output=True, text=True, timeout=240,
                          preexec_fn=_file_size_limit)
    left = sorted(p.name for p in (root / "out").iterdir()) if (root / "out").exists() else []
    again = subprocess.run(cmd, cwd=REPO, env=_subprocess_env(), capture_output=True, text=True, timeout=240)
    return {"full": full, "left": left, "again": again, "out_dir": out_dir}


def test_disk_full_during_merge_leaves_no_out_dir_and_a_rerun_completes(merge_disk_full):
    full, again, out_dir = merge_disk_full["full"], merge_disk_full["again"], merge_disk_full["out_dir"]
    assert full.returncode != 0
    assert "File too large" in full.stderr  # the failed write
    assert "merged" not in merge_disk_full["left"]  # no half-written OUT_DIR
    print(f"\nmerge, disk full: exit {full.returncode}, left in the parent: {merge_disk_full['left']}, "
          f"last line: {full.stderr.strip().splitlines()[-1][:200]}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out_dir / "model.safetensors").stat().st_size > FILE_LIMIT and (out_dir / "config.json").is_file()


def test_disk_full_during_merge_is_one_clear_error_and_leaves_nothing(merge_disk_full):
    full = merge_disk_full["full"]
    assert "Traceback" not in full.stderr, full.stderr[-3000:]
    errors = _error_lines(full.stderr)
    assert len(errors) == 1 and "File too large" in errors[0], full.stderr[-3000:]
    assert merge_disk_full["left"] == []  # no staging dir left either


@pytest.fixture(scope="module")
def materialise_disk_full(prefect_api, family, data, tmp_path_factory) -> dict:
    """`evomerge evolve` with materialise_best, writes limited to FILE_LIMIT bytes per file:
    every generation completes, writing best/ fails; then the same command (no limit) in this
    process."""
    root = tmp_path_factory.mktemp("materialise-full")
    config = _write_config(root / "run.yaml", run_config(family, data, root / "runs", "full",
                                                         output={"materialise_best": True}))
    log = root / "evaluations.jsonl"
    full = subprocess.run([sys.executable, "-m", "evomerge.flows.cli", "evolve", str(config)], cwd=REPO,
                          env=_subprocess_env(prefect_api, **{LOG_ENV: str(log)}), capture_output=True, text=True,
                          timeout=240, preexec_fn=_file_size_limit)
    before = read_log(log)
    mp = pytest.MonkeyPatch()
    mp.setenv(LOG_ENV, str(log))
    try:
        again = _cli_plain("evolve", str(config))
    finally:
        mp.undo()
    return {"full": full, "again": again, "before": before, "log": read_log(log), "runs": root / "runs"}


@pytest.mark.slow
def test_disk_full_while_materialising_best_loses_no_evaluation_and_resume_completes(materialise_disk_full, baseline):
    full, (rc, out, err) = materialise_disk_full["full"], materialise_disk_full["again"]
    assert full.returncode == 1, full.stderr[-3000:]
    assert "File too large" in full.stderr
    assert len(materialise_disk_full["before"]) == 8  # every evaluation finished before the failure
    assert rc == 0, err[-3000:]
    assert "evaluations: 0 new, 0 reused from the run store, 8 restored from checkpoints" in out
    run = materialise_disk_full["runs"] / "full"
    assert strip(_result(materialise_disk_full["runs"], "full")["history"]) == baseline
    assert (run / "best" / "model.safetensors").stat().st_size > FILE_LIMIT
    _each_once(materialise_disk_full["log"], _result(materialise_disk_full["runs"], "full")["history"])


@pytest.mark.slow
def test_disk_full_while_materialising_best_is_one_clear_error(materialise_disk_full):
    full = materialise_disk_full["full"]
    errors = _error_lines(full.stderr)
    assert len(errors) == 1 and "File too large" in errors[0], full.stderr[-3000:]


# ----------------------------------------------------------------------------- 6. Prefect API unreachable


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_prefect_api_unreachable_at_start_is_one_error_and_writes_nothing(prefect_api, family, data, tmp_path, capfd):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = f"http://127.0.0.1:{_closed_port()}/api"
    config = _write_config(tmp_path / "run.yaml", run_config(family, data, tmp_path / "runs", "no-api"))
    started = time.monotonic()
    with temporary_settings({PREFECT_API_URL: url}):
        rc, out, err = _cli(capfd, "evolve", str(config))
    assert rc == 1, err[-3000:]
    assert _error_lines(err) == err.strip().splitlines(), err[-3000:]
    assert f"cannot reach the Prefect API at {url}" in err
    assert not (tmp_path / "runs").exists()
    assert time.monotonic() - started < 60


# ----------------------------------------------------------------------------- 8. SIGTERM


@pytest.mark.slow
def test_sigterm_stops_the_flow_and_a_resume_completes(prefect_api, family, data, baseline, eval_log, tmp_path, capfd):
    """`evomerge evolve` gets SIGTERM (``EVOMERGE_FAULT=term_after_candidates:6``: after its 6th
    stored evaluation): Prefect marks the flow run crashed, the flow's `finally` releases the
    lease, the process exits by the signal; the resume evaluates only what had not finished."""
    runs = tmp_path / "runs"
    config = _write_config(tmp_path / "run.yaml", run_config(family, data, runs, "sigterm"))
    env = _subprocess_env(prefect_api, EVOMERGE_FAULT="term_after_candidates:6", **{LOG_ENV: str(eval_log)})
    proc = subprocess.run([sys.executable, "-m", "evomerge.flows.cli", "evolve", str(config)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == -signal.SIGTERM, proc.stderr[-3000:]
    assert "[EVOMERGE_FAULT] term: process" in proc.stderr
    assert "Execution was aborted by a termination signal" in proc.stderr
    assert "evaluations: " not in proc.stdout  # it never reached the end
    assert not (runs / "sigterm" / "lease.json").exists()  # released on the way out
    assert (runs / "sigterm" / "latest.json").exists()  # generation 0 was committed
    assert 6 <= len(read_log(eval_log)) <= 8  # the candidates in flight at the signal finish and are stored
    finished = len(read_log(eval_log))
    rc, out, err = _cli(capfd, "evolve", str(config))
    assert rc == 0, err[-3000:]
    with capfd.disabled():
        print(f"\nsigterm: {finished} finished before exit; resume: {_line(out, 'evaluations: ')}")
    assert "resuming from generation 2/2: 4 evaluations restored from checkpoints" in out
    history = _result(runs, "sigterm")["history"]
    assert strip(history) == baseline
    _each_once(read_log(eval_log), history)


# ----------------------------------------------------------------------------- 7. interrupted publish

HUB_TOKEN = "hf_faultsWriteToken0d3c9e21b7a4f5"


@pytest.fixture(scope="module")
def hub():
    from hubstub import HubStub

    stub = HubStub(write_tokens=(HUB_TOKEN,), lfs_threshold=4096).start()  # weights go through LFS
    yield stub
    stub.stop()


@pytest.fixture(scope="module")
def finished_run(prefect_api, family, data, tmp_path_factory) -> dict:
    """A finished run with best/ materialised, and a local copy of best/ to publish."""
    from evomerge.flows.evolve import evolve
    from evomerge_core.kinds.cache import clear_model_cache
    from evomerge_core.runs.store import RunStore

    root = tmp_path_factory.mktemp("finished")
    clear_model_cache()
    evolve(run_config(family, data, root / "runs", "finished", output={"materialise_best": True}))
    store = RunStore(f"file://{root / 'runs'}", "finished")
    model = store.get_dir("best", root / "models" / "best")
    return {"store": store, "url": store.url(), "model": model}


@pytest.fixture
def hub_env(hub, tmp_path, monkeypatch) -> dict[str, str]:
    from huggingface_hub import constants

    env = {"HF_TOKEN": HUB_TOKEN, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home"),
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # read at import: the stub speaks LFS, not Xet
    return env


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _check_complete(hub, repo: str, model: Path, store) -> None:
    """The repo holds the model's weights, config and tokenizer plus the card and recipe, in
    one commit, and the run's published.json records that commit once."""
    files = hub.files(repo)
    for name, data in _tree(model).items():
        if name.endswith((".safetensors", ".json")):
            assert files.get(name) == data, name
    assert {"README.md", "recipe.yaml", "mergekit.yaml", "evomerge_config.yaml"} <= set(files)
    assert hub.commit_count(repo) == 1
    assert [p["commit_sha"] for p in _pushes(store, repo)] == [hub.repos[repo].branches["main"]]


def _pushes(store, repo: str) -> list[dict]:
    """The pushes to `repo` recorded in the run's published.json."""
    return [p for p in (store.read_json("published.json") or {}).get("pushes", []) if p["repo_id"] == repo]


@pytest.mark.slow
def test_publish_killed_mid_upload_is_completed_by_a_rerun(prefect_api, hub, hub_env, finished_run, monkeypatch,
                                                           capfd):
    """`evomerge publish --run` SIGKILLed while the weights are being uploaded (the Hub stand-in
    kills it at the LFS PUT): nothing is committed and published.json is not written; the same
    command then pushes everything in one commit and records it; a third run pushes nothing."""
    import hubstub

    repo, model = "stub-org/killed-upload", finished_run["model"]
    before = _tree(model)
    cmd = ["publish", str(model), "--repo-id", repo, "--run", finished_run["url"], "--license", "mit"]
    victim: dict[str, int] = {}
    put = hubstub._Handler._lfs_put

    def kill_at_put(self, oid):
        if victim.pop("pid", None) is not None:
            os.kill(self.victim_pid, signal.SIGKILL)
            self.close_connection = True  # no answer: the client is gone
            return None
        return put(self, oid)

    proc = subprocess.Popen([sys.executable, "-m", "evomerge.flows.cli", *cmd], cwd=REPO,
                            env=_subprocess_env(prefect_api, **hub_env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    victim["pid"] = proc.pid
    monkeypatch.setattr(hubstub._Handler, "victim_pid", proc.pid, raising=False)
    monkeypatch.setattr(hubstub._Handler, "_lfs_put", kill_at_put)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == -signal.SIGKILL, err[-3000:]
    assert repo in hub.repos and hub.commit_count(repo) == 0  # created, nothing committed
    assert _pushes(finished_run["store"], repo) == []
    leftovers = [p.name for p in model.parent.iterdir() if p.name.startswith("evomerge-publish-")]
    assert len(leftovers) == 1  # the killed run's staging folder (hard links) stays behind
    rc, out, err = _cli(capfd, *cmd)
    assert rc == 0, err[-3000:]
    assert f"published {repo}@main" in out
    _check_complete(hub, repo, model, finished_run["store"])
    rc, out, err = _cli(capfd, *cmd)
    assert rc == 0 and "already holds this run's model" in out and hub.commit_count(repo) == 1
    assert _tree(model) == before  # the model directory is never modified


def test_publish_whose_commit_answer_is_lost_is_completed_by_a_rerun(prefect_api, hub, hub_env, finished_run,
                                                                     monkeypatch, capfd):
    """The Hub applies the commit but the answer never arrives (a 507 instead): the publish
    fails with one `error:` line and published.json is not written; the re-run finds every file
    already on the Hub, makes no second commit, and records the existing one."""
    import hubstub

    repo, model = "stub-org/lost-answer", finished_run["model"]
    cmd = ["publish", str(model), "--repo-id", repo, "--run", finished_run["url"], "--license", "mit"]
    commit = hubstub._Handler._commit
    armed = [True]

    def commit_then_fail(self, repo_id, revision):
        if not armed or repo_id != repo:
            return commit(self, repo_id, revision)
        armed.clear()
        sent = []
        self._json = lambda status, obj, headers=None: sent.append(status)
        try:
            commit(self, repo_id, revision)
        finally:
            del self._json
        assert sent == [200]
        raise hubstub._Error(507, "Insufficient storage (simulated after the commit was applied)")

    monkeypatch.setattr(hubstub._Handler, "_commit", commit_then_fail)
    rc, out, err = _cli(capfd, *cmd)
    assert rc == 1, err[-3000:]
    errors = _error_lines(err)
    assert len(errors) == 1 and "HTTP 507" in errors[0] and "evomerge publish` again" in errors[0], err[-3000:]
    assert hub.commit_count(repo) == 1 and _pushes(finished_run["store"], repo) == []  # committed, not recorded
    rc, out, err = _cli(capfd, *cmd)
    assert rc == 0, err[-3000:]
    files = hub.files(repo)
    assert files["model.safetensors"] == (model / "model.safetensors").read_bytes()
    assert hub.commit_count(repo) == 1  # no second commit
    assert [p["commit_sha"] for p in _pushes(finished_run["store"], repo)] == [hub.repos[repo].branches["main"]]
