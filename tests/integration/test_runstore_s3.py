"""Run store against a real S3 server (SeaweedFS on 127.0.0.1, see conftest.py)."""

from __future__ import annotations

import os
import socket
import threading
import uuid
from pathlib import Path

import pytest
import s3fs

from evomerge_core.errors import StorageError
from evomerge_core.runs.store import RunStore, RunStoreWarning, candidate_key


@pytest.fixture
def prefix(s3_server) -> str:
    return f"s3://{s3_server.bucket}/runs-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def raw(s3_server) -> s3fs.S3FileSystem:
    """A plain s3fs client, to look at and damage objects behind the store's back."""
    return s3fs.S3FileSystem(
        key=s3_server.key,
        secret=s3_server.secret,
        client_kwargs={"endpoint_url": s3_server.endpoint_url},
        skip_instance_cache=True,
        use_listings_cache=False,
    )


def _store(s3_server, prefix: str, run_key: str = "run-1") -> RunStore:
    return RunStore(prefix, run_key, storage_options=s3_server.storage_options())


def test_full_run_layout_on_s3(s3_server, prefix, raw, tmp_path: Path) -> None:
    store = _store(s3_server, prefix)
    assert not store.exists() and store.read_latest() is None
    config = {"seed": 3, "optimizer": {"sigma0": 0.1 + 0.2}}
    store.write_config(config)
    key = candidate_key([0.5, 0.25], {"m": "rev"}, {"task": "t"})
    store.put_candidate(key, {"fitness": 0.5})
    for g in range(2):
        store.write_generation(g, {"generation": g, "candidates": [{"fitness": g / 3}]})
        store.write_latest({"generation": g, "best_fitness": g / 3})
    store.write_json("result.json", {"best_fitness": 1 / 3})
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(os.urandom(50_000))
    (model / "config.json").write_text("{}")
    store.put_dir(model, "best")
    png = tmp_path / "fitness.png"
    png.write_bytes(b"\x89PNG-bytes")
    store.put_file(png, "report/fitness.png")

    reopened = _store(s3_server, prefix)
    assert reopened.exists()
    assert reopened.read_config() == config
    assert reopened.read_latest() == {"generation": 1, "best_fitness": 1 / 3}
    assert reopened.read_generation(0)["candidates"] == [{"fitness": 0.0}]
    assert reopened.get_candidate(key) == {"fitness": 0.5}
    assert reopened.read_json("result.json") == {"best_fitness": 1 / 3}
    out = reopened.get_dir("best", tmp_path / "out")
    assert (out / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()

    root = prefix.removeprefix("s3://") + "/run-1/"
    keys = sorted(k[len(root):] for k in raw.find(root))
    assert keys == sorted([
        "config.yaml", "latest.json", "result.json", f"candidates/{key}.json",
        "generations/00000.json", "generations/00001.json", "best/_manifest.json",
        "best/model.safetensors", "best/config.json", "report/fitness.png"])
    for k in keys:  # no credential ends up in any object
        data = raw.cat_file(root + k)
        assert s3_server.secret.encode() not in data and s3_server.key.encode() not in data

    reopened.acquire_lease("me", ttl_s=60)
    assert reopened.clear() == len(keys)
    assert [k[len(root):] for k in raw.find(root)] == ["lease.json"]
    assert not reopened.exists() and reopened.read_latest() is None


def test_credentials_from_environment(s3_server, prefix, monkeypatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret)
    store = RunStore(prefix, "env-run")
    store.write_generation(0, {"ok": True})
    assert store.read_generation(0) == {"ok": True}


def test_damaged_objects_fall_back_to_previous_generation(s3_server, prefix, raw) -> None:
    store = _store(s3_server, prefix)
    for g in range(3):
        store.write_generation(g, {"generation": g})
    store.write_latest({"generation": 2})
    root = prefix.removeprefix("s3://") + "/run-1/"
    raw.pipe_file(root + "generations/00002.json", b'{"format":"evomerge-runstore/1","sha256')
    with pytest.warns(RunStoreWarning, match="latest.json names generation 2"):
        assert store.read_latest() == {"generation": 1, "recovered": True}
    raw.pipe_file(root + "latest.json", b"garbage")
    raw.rm_file(root + "generations/00001.json")
    with pytest.warns(RunStoreWarning, match="not valid JSON"):
        assert store.read_latest() == {"generation": 0, "recovered": True}


def test_bad_credentials_give_a_redacted_storage_error(s3_server, prefix) -> None:
    wrong = "wrong-secret-value-123456"
    store = RunStore(prefix, "r", storage_options={
        "endpoint_url": s3_server.endpoint_url, "key": s3_server.key, "secret": wrong})
    with pytest.raises(StorageError) as err:
        store.write_generation(0, {"v": 1})
    assert prefix in str(err.value) and "check the credentials" in str(err.value)
    assert wrong not in str(err.value)


def test_missing_bucket_is_a_storage_error(s3_server) -> None:
    store = RunStore("s3://no-such-bucket-here/x", "r", storage_options=s3_server.storage_options())
    with pytest.raises(StorageError, match="no-such-bucket-here.*create the bucket"):
        store.write_generation(0, {"v": 1})


def test_unreachable_endpoint_is_a_storage_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "k" * 8, "secret": "s" * 12,
               "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2}}
    store = RunStore("s3://bucket/p", "r", storage_options=options)
    with pytest.raises(StorageError, match="check AWS_ENDPOINT_URL") as err:
        store.write_generation(0, {"v": 1})
    assert "s" * 12 not in str(err.value)


def test_lease_refusal_takeover_and_release_on_s3(s3_server, prefix) -> None:
    a, b = _store(s3_server, prefix, "leased"), _store(s3_server, prefix, "leased")
    now = [5000.0]
    a._clock = b._clock = lambda: now[0]
    a.acquire_lease("owner-a", ttl_s=30)
    with pytest.raises(StorageError, match="held by owner 'owner-a'"):
        b.acquire_lease("owner-b", ttl_s=30)
    now[0] += 20
    a.renew_lease("owner-a")
    now[0] += 20  # still within the renewed ttl
    with pytest.raises(StorageError, match="already in progress"):
        b.acquire_lease("owner-b", ttl_s=30)
    now[0] += 31
    with pytest.warns(RunStoreWarning, match="took over"):
        b.acquire_lease("owner-b", ttl_s=30)
    with pytest.raises(StorageError, match="lost its lease"):
        a.renew_lease("owner-a")
    b.release_lease("owner-b")
    assert b.read_lease() is None
    a.acquire_lease("owner-a", ttl_s=30)


def test_concurrent_acquires_on_s3_have_exactly_one_winner(s3_server, prefix) -> None:
    n = 6
    stores = [_store(s3_server, prefix, "race") for _ in range(n)]
    results: list[str] = []
    barrier = threading.Barrier(n)

    def contend(i: int) -> None:
        barrier.wait()
        try:
            stores[i].acquire_lease(f"owner-{i}", ttl_s=60)
            results.append("won")
        except StorageError:
            results.append("refused")

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(results) == ["refused"] * (n - 1) + ["won"]


def test_takeover_race_of_an_expired_lease_has_one_winner(s3_server, prefix) -> None:
    """Two runs that both saw the same expired lease: the conditional write lets one win."""
    first = _store(s3_server, prefix, "stale")
    first._clock = lambda: 0.0
    first.acquire_lease("dead-owner", ttl_s=1)
    backend = first._backend
    data, token = backend.read_versioned("lease.json")
    assert backend.replace_if_version("lease.json", b"one", token) is True
    assert backend.replace_if_version("lease.json", b"two", token) is False
    assert backend.read_bytes("lease.json") == b"one"
    assert backend.create_exclusive("lease.json", b"three") is False
