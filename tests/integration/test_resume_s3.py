"""Interrupted evolutions on S3 (SeaweedFS): SIGKILL at several points, a damaged checkpoint,
a failed flow run retried with `prefect flow-run retry`, a budget increase, `--no-resume`, a
second run on a busy run key, an S3 outage, bad storage settings, and no credential anywhere.

Every run is `evomerge evolve` in a subprocess (as a user runs it) against one Prefect server
started for this module; credentials reach it through AWS_* environment variables only.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import s3fs
import yaml

from evomerge.flows.cli import main

pytestmark = pytest.mark.timeout(600)
REPO = Path(__file__).resolve().parents[2]
HF_SECRET = "hf_plantedSecretToken8c1f2e9a77"
GENERATIONS, POPSIZE = 5, 4
KILLS = {  # scenario -> EVOMERGE_FAULT
    "mid-generation": "kill_after_candidates:6",
    "during-checkpoint": "kill_during_checkpoint:2",
    "between-generations": "kill_after_generation:1",
    "damaged-newest": "kill_after_generation:3",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory) -> Iterator[dict[str, str]]:
    """One Prefect server on 127.0.0.1 for every subprocess of this module (stopped by PID)."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false")
    log = open(home / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/api"
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, (home / "server.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the Prefect server did not start in 180 s"
            time.sleep(0.5)
        yield {"PREFECT_HOME": str(home), "PREFECT_API_URL": url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and its children
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    import torch

    from tiny_models import make_tiny_family

    torch.set_num_threads(1)
    return make_tiny_family(tmp_path_factory.mktemp("family"), n_finetunes=2, seed=0, noise=0.02)


def _config(family: dict[str, Path], data: Path, **over) -> dict:
    config = {
        "sources": [{"model": str(family["base"]), "base": True}, {"model": str(family["ft1"])},
                    {"model": str(family["ft2"])}],
        "space": {"ps": {"method": "dare_ties", "params": ["density", "weight"]}},
        "optimizer": {"popsize": POPSIZE, "seed": 11, "generations": GENERATIONS},
        "fitness": {"dataset": {"path": str(data), "columns": {"prompt": "question", "answer": "target"}},
                    "scorer": "resume_scorers:planted", "accuracy_scorer": "none", "max_new_tokens": 2,
                    "batch_size": 2},
        "runtime": {"torch_threads": 1},
        "output": {"materialise_best": False, "report": False},
    }
    for section, values in over.items():
        config[section] = {**config[section], **values}
    return config


class Runner:
    """Runs `evomerge evolve` in subprocesses against one S3 server and the Prefect server."""

    def __init__(self, root: Path, endpoint: str, key: str, secret: str, bucket: str, prefect: dict[str, str],
                 family: dict[str, Path]) -> None:
        self.root = root
        self.bucket, self.prefix = bucket, f"resume-{os.getpid()}-{int(time.time())}"
        self.storage = f"s3://{bucket}/{self.prefix}"
        self.key, self.secret = key, secret
        data = root / "train.jsonl"
        data.write_text("".join(json.dumps({"question": f"what is {i} plus 1? ", "target": str(i + 1)}) + "\n"
                                for i in range(2)))
        self.family, self.data = family, data
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_", "EVOMERGE_"))}
        env.update(prefect)
        env.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID=key, AWS_SECRET_ACCESS_KEY=secret,
                   HF_TOKEN=HF_SECRET, OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([str(REPO / "tests" / "integration"), str(REPO / "tests")]))
        self.env = env
        self.fs = s3fs.S3FileSystem(key=key, secret=secret, client_kwargs={"endpoint_url": endpoint},
                                    skip_instance_cache=True, use_listings_cache=False)
        self.outputs: list[str] = []

    def config_file(self, name: str, **over) -> Path:
        path = self.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(_config(self.family, self.data, **over), sort_keys=False))
        return path

    def command(self, run_key: str, config: Path | None = None, *args: str) -> list[str]:
        return [sys.executable, "-m", "evomerge.flows.cli", "evolve", str(config or self.config_file("run")),
                "--run-key", run_key, "--storage", self.storage, *args]

    def run(self, cmd: list[str], fault: str | None = None, timeout: float = 300,
            **extra_env: str) -> subprocess.CompletedProcess:
        env = dict(self.env, **extra_env)
        if fault:
            env["EVOMERGE_FAULT"] = fault
        started = time.monotonic()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        proc.seconds = time.monotonic() - started  # type: ignore[attr-defined]
        self.outputs += [proc.stdout, proc.stderr]
        return proc

    def many(self, jobs: list[tuple]) -> list[subprocess.CompletedProcess]:
        """Run ``(cmd, fault)`` jobs, up to 4 at a time (each mostly waits for its imports)."""
        with ThreadPoolExecutor(4) as pool:
            return list(pool.map(lambda job: self.run(*job), jobs))

    def path(self, run_key: str, rel: str = "") -> str:
        return f"{self.bucket}/{self.prefix}/{run_key}" + (f"/{rel}" if rel else "")

    def doc(self, run_key: str, rel: str) -> dict:
        return json.loads(self.fs.cat_file(self.path(run_key, rel)))["payload"]

    def stored_candidates(self, run_key: str) -> int:
        return len(self.fs.ls(self.path(run_key, "candidates"), refresh=True))


def _history(runner: Runner, run_key: str) -> list[dict]:
    return runner.doc(run_key, "result.json")["history"]


def _line(stdout: str, start: str) -> str | None:
    return next((line for line in stdout.splitlines() if line.startswith(start)), None)


def _counts(stdout: str) -> dict[str, int]:
    """The numbers of the final `evaluations: N new, R reused ..., C restored ...` line."""
    line = _line(stdout, "evaluations: ")
    assert line, stdout[-2000:]
    new, reused, restored = re.match(r"evaluations: (\d+) new, (\d+) reused .*, (\d+) restored", line).groups()
    return {"new": int(new), "reused": int(reused), "restored": int(restored)}


@pytest.fixture(scope="module")
def kills(s3_server, prefect_api, family, tmp_path_factory) -> dict:
    """Wave 1: an uninterrupted baseline, each kill, a run failed by an exception; then the
    damaged checkpoint; wave 2: every resume, `prefect flow-run retry`, a budget increase on the
    finished baseline, an uninterrupted run of the larger budget and a `--no-resume` run."""
    r = Runner(tmp_path_factory.mktemp("resume"), s3_server.endpoint_url, s3_server.key, s3_server.secret,
               s3_server.bucket, prefect_api, family)
    wave1 = [(r.command("baseline"), None)] + [(r.command(name), fault) for name, fault in KILLS.items()]
    wave1.append((r.command("retry"), "fail_after_candidates:6"))
    first = dict(zip(["baseline", *KILLS, "retry"], r.many(wave1)))
    assert first["baseline"].returncode == 0, first["baseline"].stderr[-3000:]
    baseline = _history(r, "baseline")  # before the budget increase below extends it
    stored_at_kill = {name: r.stored_candidates(name) for name in KILLS}
    # Damage the newest checkpoint of one run: cut generation 3's file in half.
    newest = r.path("damaged-newest", "generations/00003.json")
    data = r.fs.cat_file(newest)
    r.fs.pipe_file(newest, data[: len(data) // 2])
    bigger = r.config_file("bigger", optimizer={"generations": GENERATIONS + 1})
    bigger_report = r.config_file("bigger-report", optimizer={"generations": GENERATIONS + 1},
                                  output={"materialise_best": True, "report": True})
    retry = [sys.executable, "-m", "prefect", "flow-run", "retry", "evolve-retry", "--entrypoint",
             "flows/evolve.py:evolve"]
    wave2 = [(r.command(name), None) for name in KILLS] + [
        (retry, None),
        (r.command("baseline", bigger), None),
        (r.command("bigger", bigger_report), None),
        (r.command("baseline-again", None, "--no-resume"), None),
    ]
    names2 = [*KILLS, "retry", "extend", "bigger", "no-resume"]
    # --no-resume on a run key that holds a finished run: a copy of the baseline's objects
    r.fs.copy(r.path("baseline"), r.path("baseline-again"), recursive=True)
    second = dict(zip(names2, r.many(wave2)))
    return {"runner": r, "first": first, "second": second, "stored_at_kill": stored_at_kill, "baseline": baseline}


@pytest.mark.slow
def test_killed_runs_resume_to_the_uninterrupted_history(kills):
    r, first, second = kills["runner"], kills["first"], kills["second"]
    baseline = kills["baseline"]
    assert len(baseline) == GENERATIONS * POPSIZE
    assert len({tuple(h["genome"]) for h in baseline}) == len(baseline)
    report = {}
    for name, fault in KILLS.items():
        killed, resumed = first[name], second[name]
        assert killed.returncode == -signal.SIGKILL, (name, killed.stderr[-3000:])
        assert "[EVOMERGE_FAULT] killing process" in killed.stderr
        assert not _line(killed.stdout, "evaluations: ")  # it never reached the end
        assert resumed.returncode == 0, (name, resumed.stderr[-3000:])
        assert _line(resumed.stdout, "resuming from generation"), resumed.stdout
        assert _history(r, name) == baseline, name
        counts = _counts(resumed.stdout)
        assert counts["new"] + counts["reused"] + counts["restored"] == len(baseline)
        # Every evaluation finished before the kill is restored or reused, none recomputed.
        lost = kills["stored_at_kill"][name] - counts["restored"] - counts["reused"]
        report[name] = {"fault": fault, "stored_before_kill": kills["stored_at_kill"][name], **counts,
                        "finished_evaluations_recomputed": lost,
                        "killed_s": round(killed.seconds, 1), "resume_s": round(resumed.seconds, 1)}
        assert lost == 0, report[name]
    # the kill during the checkpoint: generation 2 was written but not committed; all reused
    assert report["during-checkpoint"]["restored"] == 2 * POPSIZE
    assert report["during-checkpoint"]["reused"] == POPSIZE
    assert report["mid-generation"]["restored"] == POPSIZE and report["mid-generation"]["reused"] >= 2
    print("\nkill report:", json.dumps(report, indent=1))


@pytest.mark.slow
def test_damaged_newest_checkpoint_falls_back_one_generation_with_a_warning(kills):
    r, resumed = kills["runner"], kills["second"]["damaged-newest"]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    named = f"{r.storage}/damaged-newest/generations/00003.json"
    assert named in resumed.stderr and "latest.json names generation 3" in resumed.stderr
    assert "fell back one generation" in resumed.stdout
    counts = _counts(resumed.stdout)
    assert counts["restored"] == 3 * POPSIZE and counts["reused"] == POPSIZE  # generation 3 from the cache
    assert _history(r, "damaged-newest") == kills["baseline"]
    assert r.doc("damaged-newest", "latest.json")["generation"] == GENERATIONS - 1


@pytest.mark.slow
def test_failed_flow_run_is_retried_with_prefect_flow_run_retry(kills):
    r, failed, retried = kills["runner"], kills["first"]["retry"], kills["second"]["retry"]
    assert failed.returncode != 0 and "injected failure" in failed.stderr
    assert not r.fs.exists(r.path("retry", "lease.json"))  # released when the flow failed
    assert retried.returncode == 0, retried.stderr[-3000:]
    assert _line(retried.stdout, "resuming from generation 2/")
    assert _counts(retried.stdout)["reused"] >= 2  # stored before the failure (more may have finished)
    assert _history(r, "retry") == kills["baseline"]


@pytest.mark.slow
def test_budget_increase_continues_a_finished_run_and_no_resume_starts_over(kills):
    r, second = kills["runner"], kills["second"]
    extend, bigger, again = second["extend"], second["bigger"], second["no-resume"]
    assert bigger.returncode == 0, bigger.stderr[-3000:]
    assert extend.returncode == 0, extend.stderr[-3000:]
    assert _counts(extend.stdout) == {"new": POPSIZE, "reused": 0, "restored": GENERATIONS * POPSIZE}
    assert _history(r, "baseline") == _history(r, "bigger")  # the larger budget, uninterrupted
    assert _history(r, "bigger")[: GENERATIONS * POPSIZE] == kills["baseline"]
    assert yaml.safe_load(r.fs.cat_file(r.path("baseline", "config.yaml")))["optimizer"]["generations"] == 6
    assert again.returncode == 0, again.stderr[-3000:]
    assert _counts(again.stdout) == {"new": GENERATIONS * POPSIZE, "reused": 0, "restored": 0}
    assert _history(r, "baseline-again") == kills["baseline"]


def _s3_env(monkeypatch, endpoint: str, key: str, secret: str) -> None:
    for k in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)


@pytest.fixture
def no_models(monkeypatch):
    """Fail the test if a source is resolved or a model is loaded."""
    import evomerge_core.kinds.resident as resident
    from evomerge_core.kinds import RUN_KINDS

    def refuse(*args, **kwargs):
        raise AssertionError("model work started")

    monkeypatch.setattr(resident.ResidentModel, "__init__", refuse)
    for _, kind in RUN_KINDS.items():
        monkeypatch.setattr(kind, "resolve_sources", refuse)


def test_changed_config_is_refused_with_a_diff(s3_server, family, tmp_path, capsys, monkeypatch, no_models):
    from evomerge_core.config.schema import parse_run_config
    from evomerge_core.runs.search import check_run_free, prepare_run

    _s3_env(monkeypatch, s3_server.endpoint_url, s3_server.key, s3_server.secret)
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"question": "1 plus 1? ", "target": "2"}) + "\n")
    storage = f"s3://{s3_server.bucket}/changed-{os.getpid()}"
    stored = _config(family, data)
    prepare_run(parse_run_config({**stored, "storage": storage, "run_key": "changed"}))
    path = tmp_path / "changed.yaml"
    path.write_text(yaml.safe_dump(_config(family, data, optimizer={"sigma0": 0.25, "seed": 12})))
    rc = main(["evolve", str(path), "--run-key", "changed", "--storage", storage])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "the config differs in optimizer.seed, optimizer.sigma0" in err
    assert "optimizer.seed: 11 -> 12" in err and "optimizer.sigma0: 0.16666666666666666 -> 0.25" in err
    # a larger budget passes the CLI's checks (the flow itself is not run here)
    bigger = {**_config(family, data, optimizer={"generations": 9}), "storage": storage, "run_key": "changed"}
    check_run_free(parse_run_config(bigger), resume=True)


BAD_STORAGE = {
    "wrong credentials": ("check the credentials", lambda s: (s.endpoint_url, s.key, "wrong-secret-4f1e0d9c"), None),
    "missing bucket": ("bucket 'no-such-bucket-x1' does not exist; create the bucket",
                       lambda s: (s.endpoint_url, s.key, s.secret), "s3://no-such-bucket-x1/runs"),
    "unreachable endpoint": ("check AWS_ENDPOINT_URL", lambda s: (f"http://127.0.0.1:{_free_port()}", s.key, s.secret),
                             None),
}


@pytest.mark.parametrize("case", sorted(BAD_STORAGE))
def test_bad_storage_is_one_clear_error_before_model_work(case, s3_server, family, tmp_path, capsys, monkeypatch,
                                                          no_models):
    expected, settings, storage = BAD_STORAGE[case]
    endpoint, key, secret = settings(s3_server)
    _s3_env(monkeypatch, endpoint, key, secret)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"question": "1 plus 1? ", "target": "2"}) + "\n")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_config(family, data)))
    rc = main(["evolve", str(path), "--run-key", "bad", "--storage", storage or f"s3://{s3_server.bucket}/bad"])
    err = capsys.readouterr().err
    assert rc == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot use s3://") and expected in lines[0], err
    assert secret not in err and s3_server.secret not in err


@pytest.mark.slow
def test_no_credential_in_any_object_log_or_output(kills):
    r = kills["runner"]
    secrets = [r.key, r.secret, HF_SECRET]
    objects = r.fs.find(f"{r.bucket}/{r.prefix}")
    assert len(objects) > 100 and any(o.endswith(".safetensors") for o in objects)
    assert any(o.endswith("report/report.md") for o in objects)
    for obj in objects:
        data = r.fs.cat_file(obj)
        for s in secrets:
            assert s.encode() not in data, obj
    for text in r.outputs:
        for s in secrets:
            assert s not in text
    # Prefect's database and logs (flow-run parameters, task results, log lines)
    home = Path(r.env["PREFECT_HOME"])
    files = [p for p in home.rglob("*") if p.is_file()]
    assert files
    for path in files:
        data = path.read_bytes()
        for s in secrets:
            assert s.encode() not in data, path


@pytest.mark.slow
def test_s3_outage_is_ridden_out_and_a_second_run_is_refused(restartable_s3, prefect_api, family, kills,
                                                             tmp_path):
    server, bucket = restartable_s3
    r = Runner(tmp_path, server.endpoint_url, server.key, server.secret, bucket, prefect_api, family)
    env = dict(r.env, EVOMERGE_TEST_SCORER_SLEEP="3")  # ~12 s a generation: the outage hits mid-run
    log_out, log_err = open(tmp_path / "a.out", "w+"), open(tmp_path / "a.err", "w+")
    a = subprocess.Popen(r.command("outage"), cwd=REPO, env=env, stdout=log_out, stderr=log_err, text=True)
    try:
        deadline = time.monotonic() + 240

        def wait_for(rel: str) -> None:
            while not r.fs.exists(r.path("outage", rel)):
                assert a.poll() is None and time.monotonic() < deadline, (tmp_path / "a.err").read_text()[-3000:]
                time.sleep(0.5)

        wait_for("lease.json")
        b = r.run(r.command("outage"))  # the same run key while the first run holds the lease
        assert b.returncode == 1 and "run is already in progress" in b.stderr, b.stderr[-2000:]
        wait_for("latest.json")  # at least one generation committed before the outage
        assert a.poll() is None, "the first run ended before the outage; make its candidates slower"
        server.stop()
        time.sleep(20)
        server.start()
        assert a.wait(timeout=300) == 0, (tmp_path / "a.err").read_text()[-3000:]
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()
        log_out.close()
        log_err.close()
    out, err = (tmp_path / "a.out").read_text(), (tmp_path / "a.err").read_text()
    r.outputs += [out, err]
    assert "storage unavailable" in err and "retrying" in err
    assert _history(r, "outage") == kills["baseline"]
    assert not r.fs.exists(r.path("outage", "lease.json"))
    for text in r.outputs:
        assert server.secret not in text and server.key not in text
