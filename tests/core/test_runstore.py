"""Run store on the local filesystem (file:// and plain paths)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import threading
from pathlib import Path

import pytest

from evomerge_core.errors import ConfigError, StorageError
from evomerge_core.runs.store import (
    CorruptObjectError,
    RunStore,
    RunStoreWarning,
    candidate_key,
    diff_configs,
    ensure_same_config,
)
from evomerge_core.runs.storage import parse_storage_url


@pytest.fixture
def store(tmp_path: Path) -> RunStore:
    return RunStore(f"file://{tmp_path}", "run-1")


def _run_dir(store: RunStore) -> Path:
    return Path(store.url().removeprefix("file://"))


# URLs ----------------------------------------------------------------------------------------
def test_urls_for_file_plain_path_and_s3(tmp_path: Path) -> None:
    assert RunStore(f"file://{tmp_path}", "k").url("a/b.json") == f"file://{tmp_path}/k/a/b.json"
    assert RunStore(str(tmp_path), "k").url() == f"file://{tmp_path}/k"
    assert RunStore(f"file://{tmp_path}/", "k").url() == f"file://{tmp_path}/k"
    s3 = RunStore("s3://bucket/some/prefix/", "k", storage_options={"anon": True})
    assert s3.url("latest.json") == "s3://bucket/some/prefix/k/latest.json"
    assert RunStore("s3://bucket", "k").url() == "s3://bucket/k"


@pytest.mark.parametrize(
    "url",
    ["", "gs://bucket/x", "http://host/x", "file://relative/x", "s3://", "s3:///x",
     "s3://Bad_Bucket/x", "s3://b/x?versionId=1", "ftp:foo"],
)
def test_bad_urls_are_refused_with_accepted_forms(url: str) -> None:
    with pytest.raises(StorageError) as err:
        parse_storage_url(url)
    assert repr(url) in str(err.value)
    assert "s3://bucket[/prefix]" in str(err.value) and "file:///" in str(err.value)


@pytest.mark.parametrize("key", ["", "a/b", "..", ".hidden", "x" * 129, "bad key"])
def test_bad_run_keys_are_refused(tmp_path: Path, key: str) -> None:
    with pytest.raises(StorageError, match="run key"):
        RunStore(str(tmp_path), key)


def test_storage_options_are_refused_for_local_storage_without_echoing_them(tmp_path: Path) -> None:
    with pytest.raises(StorageError) as err:
        RunStore(str(tmp_path), "k", storage_options={"secret": "hunter2-very-secret"})
    assert "hunter2-very-secret" not in str(err.value)


# Config --------------------------------------------------------------------------------------
def test_config_roundtrip_is_exact_and_marks_the_run_existing(store: RunStore) -> None:
    config = {"seed": 7, "optimizer": {"sigma0": 0.1 + 0.2, "popsize": 8},
              "sources": [{"model": "a", "revision": "abc"}], "name": "ünï"}
    assert store.read_config() is None and not store.exists()
    store.write_config(config)
    assert store.exists()
    assert store.read_config() == config
    assert store.read_config()["optimizer"]["sigma0"] == 0.30000000000000004
    text = (_run_dir(store) / "config.yaml").read_text()
    assert text.startswith("# evomerge run config (frozen); sha256=")


def test_edited_config_is_detected(store: RunStore) -> None:
    store.write_config({"seed": 7})
    path = _run_dir(store) / "config.yaml"
    path.write_text(path.read_text().replace("seed: 7", "seed: 8"))
    with pytest.raises(CorruptObjectError, match="sha256"):
        store.read_config()
    path.write_text("seed: 8\n")
    with pytest.raises(CorruptObjectError, match="checksum header"):
        store.read_config()


def test_config_with_unrepresentable_value_is_refused_and_nothing_written(store: RunStore) -> None:
    with pytest.raises(StorageError, match="YAML cannot represent"):
        store.write_config({"path": object()})
    assert not store.exists()


# Generations and latest ----------------------------------------------------------------------
def _gen_record(g: int) -> dict:
    return {"generation": g, "candidates": [{"genome": [0.1 * g, 1 / 3], "fitness": 0.5 + g,
            "seconds": 1.25}, {"genome": [2.0, -0.0], "fitness": float("-inf")}],
            "optimizer_state": {"format": "cma", "blob": "aGVsbG8="}}


def test_generation_roundtrip_keeps_floats_exact(store: RunStore) -> None:
    store.write_generation(3, _gen_record(3))
    got = store.read_generation(3)
    assert got == _gen_record(3)
    assert got["candidates"][0]["genome"] == [0.30000000000000004, 1 / 3]
    assert got["candidates"][1]["fitness"] == float("-inf")
    assert (_run_dir(store) / "generations" / "00003.json").is_file()
    assert store.generations() == [3]


def test_envelope_checksum_is_sha256_of_canonical_payload(store: RunStore) -> None:
    store.write_generation(0, {"b": 1, "a": [1.5]})
    doc = json.loads((_run_dir(store) / "generations" / "00000.json").read_text())
    canonical = json.dumps({"a": [1.5], "b": 1}, sort_keys=True, separators=(",", ":"))
    assert doc["sha256"] == hashlib.sha256(canonical.encode()).hexdigest()
    assert doc["payload"] == {"a": [1.5], "b": 1}


def test_missing_and_corrupt_generations_raise(store: RunStore) -> None:
    with pytest.raises(StorageError, match="does not exist"):
        store.read_generation(1)
    store.write_generation(1, _gen_record(1))
    path = _run_dir(store) / "generations" / "00001.json"
    path.write_text(path.read_text().replace('"seconds":1.25', '"seconds":9.25'))
    with pytest.raises(CorruptObjectError, match="sha256"):
        store.read_generation(1)
    path.write_bytes(path.read_bytes()[:40])  # truncated, as after a torn write
    with pytest.raises(CorruptObjectError, match="not valid JSON"):
        store.read_generation(1)


@pytest.mark.parametrize("bad", [-1, 1.0, True, "3"])
def test_bad_generation_numbers_are_refused(store: RunStore, bad) -> None:
    with pytest.raises(StorageError, match="generation must be"):
        store.write_generation(bad, {})


def test_read_latest_without_anything_is_none(store: RunStore) -> None:
    assert store.read_latest() is None


def test_read_latest_returns_pointer_and_ignores_uncommitted_generations(store: RunStore) -> None:
    for g in range(3):
        store.write_generation(g, _gen_record(g))
    store.write_latest({"generation": 1, "best_fitness": 1.5})
    assert store.read_latest() == {"generation": 1, "best_fitness": 1.5}


def test_corrupt_latest_falls_back_to_newest_valid_generation(store: RunStore) -> None:
    for g in range(3):
        store.write_generation(g, _gen_record(g))
    store.write_latest({"generation": 2, "best_fitness": 2.5})
    (_run_dir(store) / "latest.json").write_text('{"format": "evomerge-runstore/1", "sha')
    with pytest.warns(RunStoreWarning, match="not valid JSON"):
        assert store.read_latest() == {"generation": 2, "recovered": True}


def test_corrupt_pointed_generation_falls_back_to_previous_one(store: RunStore) -> None:
    for g in range(3):
        store.write_generation(g, _gen_record(g))
    store.write_latest({"generation": 2})
    gens = _run_dir(store) / "generations"
    (gens / "00002.json").write_bytes(b"\x00" * 10)
    with pytest.warns(RunStoreWarning, match="latest.json names generation 2"):
        assert store.read_latest() == {"generation": 1, "recovered": True}
    (gens / "00001.json").unlink()
    with pytest.warns(RunStoreWarning):
        assert store.read_latest() == {"generation": 0, "recovered": True}
    (gens / "00000.json").write_text("{}")
    with pytest.warns(RunStoreWarning, match="no valid generation"):
        assert store.read_latest() is None


def test_missing_latest_with_generation_files_warns_and_uses_them(store: RunStore) -> None:
    store.write_generation(0, _gen_record(0))
    with pytest.warns(RunStoreWarning, match="latest.json is missing"):
        assert store.read_latest() == {"generation": 0, "recovered": True}


def test_latest_without_generation_is_refused(store: RunStore) -> None:
    with pytest.raises(StorageError, match="generation must be"):
        store.write_latest({"best": 1.0})
    assert not (_run_dir(store) / "latest.json").exists()


def test_failed_publish_keeps_old_object_and_leaves_no_temp_file(store: RunStore, monkeypatch) -> None:
    store.write_generation(0, {"v": 1})

    def crash(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(StorageError, match="No space left"):
        store.write_generation(0, {"v": 2})
    monkeypatch.undo()
    assert store.read_generation(0) == {"v": 1}
    assert [p.name for p in (_run_dir(store) / "generations").iterdir()] == ["00000.json"]


def test_loading_never_unpickles(store: RunStore, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    store.write_generation(0, {"v": 1})
    (_run_dir(store) / "generations" / "00000.json").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(CorruptObjectError):
        store.read_generation(0)
    assert not marker.exists()


def test_non_json_records_are_refused_with_a_hint(store: RunStore) -> None:
    with pytest.raises(StorageError, match="not JSON-serialisable"):
        store.write_generation(0, {"state": b"raw bytes"})
    assert store.generations() == []


# Candidates ----------------------------------------------------------------------------------
def test_candidate_key_is_stable_and_sensitive() -> None:
    genome, revs, fit = [0.1, 0.2], {"a": "r1", "b": "r2"}, {"task": "arith", "n": 32}
    key = candidate_key(genome, revs, fit)
    doc = {"fitness": fit, "genome": ["0.1", "0.2"], "sources": revs}
    expected = hashlib.sha256(
        json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
    assert key == expected
    assert candidate_key((0.1, 0.2), {"b": "r2", "a": "r1"}, {"n": 32, "task": "arith"}) == key
    assert candidate_key([0.1, 0.2 + 1e-16], revs, fit) != key
    assert candidate_key(genome, {"a": "r1", "b": "r3"}, fit) != key
    assert candidate_key(genome, revs, {"task": "arith", "n": 64}) != key


def test_candidate_cache_roundtrip_and_corruption(store: RunStore) -> None:
    key = candidate_key([1.0], {"a": "r"}, {})
    assert store.get_candidate(key) is None
    store.put_candidate(key, {"fitness": 0.75, "seconds": 2.0})
    assert store.get_candidate(key) == {"fitness": 0.75, "seconds": 2.0}
    path = _run_dir(store) / "candidates" / f"{key}.json"
    path.write_text(path.read_text().replace("0.75", "0.95"))
    with pytest.warns(RunStoreWarning, match="evaluated again"):
        assert store.get_candidate(key) is None


@pytest.mark.parametrize("key", ["../latest", "a/b", "", ".x"])
def test_bad_candidate_keys_are_refused(store: RunStore, key: str) -> None:
    with pytest.raises(StorageError, match="candidate key"):
        store.put_candidate(key, {})


# Documents, files, directories ---------------------------------------------------------------
def test_json_documents_roundtrip_and_verify(store: RunStore) -> None:
    assert store.read_json("result.json") is None
    store.write_json("result.json", {"best_fitness": 0.9, "history": []})
    assert store.read_json("result.json") == {"best_fitness": 0.9, "history": []}
    (_run_dir(store) / "result.json").write_text('{"format":"evomerge-runstore/1","sha256":"0",'
                                                 '"payload":{"best_fitness":1.0}}')
    with pytest.raises(CorruptObjectError):
        store.read_json("result.json")


@pytest.mark.parametrize("relpath", ["../escape.json", "/abs.json", "a//b", "latest.json",
                                     "generations/00001.json", "lease.json", "config.yaml", ""])
def test_reserved_or_escaping_paths_are_refused(store: RunStore, relpath: str) -> None:
    with pytest.raises(StorageError, match="path"):
        store.write_json(relpath, {})


def _make_dir(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "config.json").write_text('{"a": 1}')
    (root / "sub" / "model.safetensors").write_bytes(os.urandom(4096))
    return root


def test_put_dir_get_dir_roundtrip_and_replacement(store: RunStore, tmp_path: Path) -> None:
    src = _make_dir(tmp_path / "src")
    store.put_dir(src, "best")
    out = store.get_dir("best", tmp_path / "out")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "config.json", "sub/model.safetensors"]
    assert (out / "sub" / "model.safetensors").read_bytes() == (
        src / "sub" / "model.safetensors").read_bytes()
    (src / "sub" / "model.safetensors").unlink()
    (src / "README.md").write_text("v2")
    store.put_dir(src, "best")
    out2 = store.get_dir("best", tmp_path / "out2")
    assert sorted(p.name for p in out2.rglob("*") if p.is_file()) == ["README.md", "config.json"]
    assert not (_run_dir(store) / "best" / "sub" / "model.safetensors").exists()


def test_get_dir_detects_tampering_and_incomplete_uploads(store: RunStore, tmp_path: Path) -> None:
    store.put_dir(_make_dir(tmp_path / "src"), "best")
    (_run_dir(store) / "best" / "config.json").write_text('{"a": 2}')
    with pytest.raises(CorruptObjectError, match="config.json fails its sha256"):
        store.get_dir("best", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    (_run_dir(store) / "best" / "_manifest.json").unlink()
    with pytest.raises(StorageError, match="not a complete directory"):
        store.get_dir("best", tmp_path / "out")


def test_get_dir_refuses_non_empty_target_and_escaping_manifest(store: RunStore, tmp_path: Path) -> None:
    store.put_dir(_make_dir(tmp_path / "src"), "best")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(StorageError, match="not an empty directory"):
        store.get_dir("best", busy)
    assert (busy / "keep.txt").read_text() == "mine"
    store._write_doc("report/_manifest.json", {"files": {"../../evil": {"sha256": "0"}}})
    with pytest.raises(StorageError, match="invalid inside a run"):
        store.get_dir("report", tmp_path / "out")
    assert not (tmp_path / "evil").exists()


def test_put_file_publishes_bytes(store: RunStore, tmp_path: Path) -> None:
    src = tmp_path / "fitness.png"
    src.write_bytes(b"\x89PNG" + os.urandom(100))
    store.put_file(src, "report/fitness.png")
    assert (_run_dir(store) / "report" / "fitness.png").read_bytes() == src.read_bytes()
    with pytest.raises(StorageError, match="not a file"):
        store.put_file(tmp_path / "missing.png", "report/x.png")


# Secrets -------------------------------------------------------------------------------------
def test_credentials_never_reach_storage(store: RunStore, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-do-not-store")
    fresh = RunStore(str(tmp_path), "run-2")
    with pytest.raises(StorageError, match="contains a credential") as err:
        fresh.write_config({"storage": {"secret": "s3cr3t-value-do-not-store"}})
    assert "s3cr3t-value-do-not-store" not in str(err.value)
    assert not fresh.exists()
    with pytest.raises(StorageError, match="contains a credential"):
        fresh.write_json("result.json", {"note": "key=s3cr3t-value-do-not-store"})


# Leases --------------------------------------------------------------------------------------
def test_second_owner_is_refused_while_lease_is_fresh(tmp_path: Path) -> None:
    a, b = RunStore(str(tmp_path), "r"), RunStore(str(tmp_path), "r")
    a.acquire_lease("owner-a", ttl_s=60)
    with pytest.raises(StorageError, match="already in progress") as err:
        b.acquire_lease("owner-b", ttl_s=60)
    assert "owner-a" in str(err.value) and f"pid {os.getpid()}" in str(err.value)
    a.acquire_lease("owner-a", ttl_s=60)  # re-acquiring one's own lease renews it
    lease = a.read_lease()
    assert lease["owner"] == "owner-a" and lease["expires_at"] > lease["acquired_at"]
    with pytest.raises(StorageError, match="held by 'owner-a'"):
        b.release_lease("owner-b")
    a.release_lease("owner-a")
    assert a.read_lease() is None
    b.acquire_lease("owner-b", ttl_s=60)
    assert b.read_lease()["owner"] == "owner-b"


def test_expired_lease_is_taken_over_and_old_owner_cannot_renew(tmp_path: Path) -> None:
    a, b = RunStore(str(tmp_path), "r"), RunStore(str(tmp_path), "r")
    now = [1000.0]
    a._clock = b._clock = lambda: now[0]
    a.acquire_lease("owner-a", ttl_s=10)
    now[0] += 5
    a.renew_lease("owner-a")
    assert a.read_lease()["expires_at"] == 1015.0
    now[0] += 11
    with pytest.warns(RunStoreWarning, match="took over the expired lease of owner 'owner-a'"):
        b.acquire_lease("owner-b", ttl_s=10)
    with pytest.raises(StorageError, match="lost its lease"):
        a.renew_lease("owner-a")
    assert b.read_lease()["owner"] == "owner-b"


def test_concurrent_acquires_have_exactly_one_winner(tmp_path: Path) -> None:
    results: list[str] = []
    barrier = threading.Barrier(6)

    def contend(i: int) -> None:
        st = RunStore(str(tmp_path), "r")
        barrier.wait()
        try:
            st.acquire_lease(f"owner-{i}", ttl_s=60)
            results.append("won")
        except StorageError:
            results.append("refused")

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(results) == ["refused"] * 5 + ["won"]


# Config comparison ---------------------------------------------------------------------------
def test_diff_configs_lists_changed_dotted_keys() -> None:
    old = {"seed": 1, "budget": {"generations": 10}, "space": {"kind": "ps", "groups": 4},
           "sources": [{"model": "a"}, {"model": "b"}], "gone": True}
    new = {"seed": 1, "budget": {"generations": 20}, "space": {"kind": "ps", "groups": "4"},
           "sources": [{"model": "a"}, {"model": "c"}], "added": 3}
    assert diff_configs(old, new, set()) == [
        "added", "budget.generations", "gone", "sources[1].model", "space.groups"]
    assert diff_configs(old, new, {"budget", "added", "gone"}) == ["sources[1].model", "space.groups"]
    assert diff_configs(old, new, {"budget.generations", "sources", "space", "gone", "added"}) == []
    assert diff_configs(old, old, set()) == []


def test_ensure_same_config_explains_the_difference() -> None:
    old, new = {"optimizer": {"sigma0": 0.1}}, {"optimizer": {"sigma0": 0.2}}
    ensure_same_config(old, dict(old), set())
    with pytest.raises(ConfigError) as err:
        ensure_same_config(old, new, {"budget"})
    assert "optimizer.sigma0" in str(err.value) and "0.1 -> 0.2" in str(err.value)


def test_clear_removes_everything_but_the_lease(tmp_path: Path) -> None:
    store, other = RunStore(str(tmp_path), "r"), RunStore(str(tmp_path), "other")
    store.acquire_lease("me", ttl_s=60)
    store.write_config({"a": 1})
    store.write_generation(0, {"g": 0})
    store.write_latest({"generation": 0})
    store.put_dir(_make_dir(tmp_path / "src"), "best")
    other.write_config({"b": 2})
    assert store.clear() == 6
    assert not store.exists() and store.read_latest() is None and store.generations() == []
    assert store.read_lease()["owner"] == "me"
    assert other.read_config() == {"b": 2}
