"""Secrets never reach files or logs (issue 11): a full `evomerge demo` (micro toy world, built
here) and an `evomerge publish` of its evolved model to the local Hub stand-in run with planted,
distinctive values in HF_TOKEN, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY; then every file
written (demo output and run store, toy-world cache, HF home, Prefect home and the Prefect API's
database with its flow-run parameters and logs), every published file and every captured log line
is searched for them. Error messages that would carry a token are checked to be redacted.
"""

from __future__ import annotations

import os
import secrets
import tempfile
import time
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="evomerge-prefect-home-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

pytestmark = pytest.mark.timeout(600)

HF_SECRET = "hf_plantedSecretHub" + secrets.token_hex(12)
AWS_KEY_ID = "AKIAPLANTED" + secrets.token_hex(6).upper()
AWS_SECRET = "plantedAwsSecret/" + secrets.token_hex(16)
PLANTED = (HF_SECRET, AWS_KEY_ID, AWS_SECRET)


@pytest.fixture(scope="module")
def prefect_db():
    """A Prefect test server for this module; yields the directory of its SQLite database."""
    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        url = PREFECT_SERVER_DATABASE_CONNECTION_URL.value()
        yield Path(url.split(":///", 1)[1]).parent


@pytest.fixture(scope="module")
def hub():
    from hubstub import HubStub

    stub = HubStub(write_tokens=(HF_SECRET,)).start()
    yield stub
    stub.stop()


@pytest.fixture
def planted(hub, tmp_path, monkeypatch) -> dict[str, Path]:
    """The secrets in the environment, the Hub stand-in as endpoint, every cache under tmp_path."""
    from huggingface_hub import constants

    dirs = {name: tmp_path / name for name in ("out", "cache", "hf-home")}
    monkeypatch.setenv("HF_TOKEN", HF_SECRET)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", AWS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HOME", str(dirs["hf-home"]))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("EVOMERGE_CACHE", str(dirs["cache"]))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    return dirs


def _cli(*argv: str) -> int:
    from evomerge.flows.cli import main

    return main(list(argv))


def _leaks(roots: list[Path]) -> list[str]:
    """Files under `roots` holding any planted secret."""
    found = []
    for root in roots:
        for path in (p for p in root.rglob("*") if p.is_file()):
            data = path.read_bytes()
            found += [f"{path}: {s[:8]}..." for s in PLANTED if s.encode() in data]
    return found


@pytest.mark.slow
def test_demo_and_publish_with_planted_secrets_leak_nothing(prefect_db, hub, planted, tmp_path, capfd, caplog):
    import torch

    from prefect.logging.handlers import APILogWorker

    torch.set_num_threads(1)
    out = planted["out"]
    started = time.monotonic()
    # the PS and PS+DFS rows (one chained run: a PS stage, then a DFS stage on its model)
    assert _cli("demo", "--size", "micro", "--seeds", "1", "--spaces", "psdfs", "--evaluations", "8",
                "--dfs-evaluations", "8", "--out", str(out)) == 0
    run = out / "runs" / "demo-micro-psdfs-seed0" / "stages" / "0"  # the PS stage
    assert (run / "result.json").is_file() and (out / "results.md").is_file()
    repo = "stub-org/evolved-demo"
    assert _cli("publish", str(out / "evolved" / "ps" / "seed0"), "--repo-id", repo, "--run", run.as_uri(),
                "--license", "apache-2.0") == 0
    assert {"README.md", "model.safetensors", "evomerge_config.yaml"} <= set(hub.files(repo))
    seconds = time.monotonic() - started
    APILogWorker.drain_all()  # the Prefect logs of both flows are in the API's database now

    captured = capfd.readouterr()
    logs = captured.out + captured.err + "\n".join(r.getMessage() for r in caplog.records)
    assert "generation 1/1" in logs and f"published {repo}@main" in logs  # the logs were captured
    assert [s[:8] for s in PLANTED if s in logs] == []
    for name, data in hub.files(repo).items():
        assert not any(s.encode() in data for s in PLANTED), name
    roots = [tmp_path, Path(os.environ["PREFECT_HOME"]), prefect_db]
    assert any(p.name.endswith(".db") for p in prefect_db.iterdir())
    searched = sum(1 for r in roots for p in r.rglob("*") if p.is_file())
    assert searched > 50
    assert _leaks(roots) == []
    print(f"\nsecrets: {searched} files, {len(hub.files(repo))} pushed files and {len(logs.splitlines())} log lines "
          f"searched; none holds a planted secret; demo + publish {seconds:.0f} s")


def test_hub_error_messages_redact_the_token(prefect_db, hub, planted, monkeypatch, capfd, tmp_path):
    """A Hub answer that echoes the bearer token (as some proxies do) and a rejected token:
    the `error:` line shows `***`, never the token."""
    import hubstub

    from tiny_models import make_tiny_llama

    model = make_tiny_llama(tmp_path / "model", seed=1)
    (model / "evomerge_recipe.yaml").write_text("merge_method: linear\nmodels:\n- model: a/b\n  parameters: {weight: 1.0}\n")

    def echo(self, repo_id, revision):
        raise hubstub._Error(400, f"malformed upload from client with token {self._token()}")

    monkeypatch.setattr(hubstub._Handler, "_preupload", echo)
    capfd.readouterr()
    assert _cli("publish", str(model), "--repo-id", "stub-org/echo", "--license", "mit") == 1
    err = capfd.readouterr().err
    line = [x for x in err.splitlines() if x.startswith("error: ")][-1]
    assert "HTTP 400" in line and "with token ***" in line, line
    assert HF_SECRET not in err

    wrong = "hf_plantedWrongToken" + secrets.token_hex(12)
    monkeypatch.setenv("HF_TOKEN", wrong)
    assert _cli("publish", str(model), "--repo-id", "stub-org/echo", "--license", "mit") == 1
    err = capfd.readouterr().err
    assert "rejected the token (HTTP 401)" in err and wrong not in err


def test_run_store_refuses_and_redacts_credentials(planted, tmp_path):
    """A document holding a credential is refused with a message that does not repeat it, and
    storage errors replace credential values by `***`."""
    from evomerge_core.errors import StorageError
    from evomerge_core.runs.store import RunStore
    from evomerge_core.runs.storage import open_backend

    store = RunStore(f"file://{tmp_path / 'runs'}", "guarded")
    with pytest.raises(StorageError) as refused:
        store.write_json("notes.json", {"token": HF_SECRET})
    assert "contains a credential" in str(refused.value) and HF_SECRET not in str(refused.value)
    assert not any(HF_SECRET.encode() in p.read_bytes() for p in (tmp_path / "runs").rglob("*") if p.is_file())
    option = "optionSecret" + secrets.token_hex(8)
    backend = open_backend("s3://no-such-bucket/runs", {"key": "optionKey" + secrets.token_hex(8), "secret": option,
                                                        "endpoint_url": "http://127.0.0.1:9"})
    # an underlying error that echoes credentials (the environment's and the storage options')
    message = str(backend.error("read", "k", OSError(f"denied for {AWS_KEY_ID}:{AWS_SECRET} and {option}")))
    assert AWS_KEY_ID not in message and AWS_SECRET not in message and option not in message
    assert message.count("***") == 3 and message.startswith("cannot read s3://no-such-bucket/runs/k")
