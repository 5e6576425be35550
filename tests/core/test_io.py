"""Safetensors reading/writing: compatibility with the safetensors library, sharding,
corrupted-file detection."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from evomerge_core.errors import SourceError
from evomerge_core.io.model_files import SAFETENSORS_INDEX, LazyModelReader, PlannedTensor, ShardedWriter, plan_shards, read_header, write_state_dict


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(16, 8, generator=g),
        "b.weight": torch.randn(32, generator=g).to(torch.bfloat16),
        "c.weight": torch.randn(4, 4, generator=g).to(torch.float16),
        "d.ids": torch.arange(5, dtype=torch.int64),
        "e.empty": torch.zeros(0, 3),
    }


def test_single_file_roundtrip_loads_with_safetensors(tmp_path):
    state = _state()
    write_state_dict(tmp_path, state)
    loaded = load_file(tmp_path / "model.safetensors")
    assert sorted(loaded) == sorted(state)
    assert all(torch.equal(loaded[k], state[k]) and loaded[k].dtype == state[k].dtype for k in state)
    reader = LazyModelReader(tmp_path)
    assert all(torch.equal(reader.get(k), state[k]) for k in state)


def test_sharded_write_and_index(tmp_path):
    state = _state()
    write_state_dict(tmp_path, state, shard_size=300)
    index = json.loads((tmp_path / SAFETENSORS_INDEX).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[0].endswith("-of-%05d.safetensors" % len(files))
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    reader = LazyModelReader(tmp_path)
    assert sorted(reader.names()) == sorted(state)
    assert all(torch.equal(reader.get(k), state[k]) for k in state)
    for f in files:  # every shard is a valid safetensors file on its own
        assert load_file(tmp_path / f)


def test_reads_files_written_by_safetensors(tmp_path):
    state = {k: v for k, v in _state().items()}
    save_file(state, tmp_path / "model.safetensors")
    reader = LazyModelReader(tmp_path)
    assert all(torch.equal(reader.get(k), state[k]) for k in state)


def test_plan_shards_never_exceeds_size_except_single_big_tensor():
    ts = [PlannedTensor(f"t{i}", torch.float32, (10,)) for i in range(5)] + [PlannedTensor("big", torch.float32, (1000,))]
    shards = plan_shards(ts, 100)
    assert [len(s) for s in shards] == [2, 2, 1, 1]
    assert all(sum(t.nbytes for t in s) <= 100 for s in shards[:-1])


def test_writer_rejects_out_of_order_tensor(tmp_path):
    writer = ShardedWriter(tmp_path, [PlannedTensor("x", torch.float32, (2,)), PlannedTensor("y", torch.float32, (2,))])
    with pytest.raises(RuntimeError):
        writer.write("y", torch.zeros(2))


@pytest.mark.parametrize("damage", ["truncate", "header", "empty", "length"])
def test_corrupted_files_are_detected(tmp_path, damage):
    write_state_dict(tmp_path, _state())
    path = tmp_path / "model.safetensors"
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[:-10])
    elif damage == "header":
        path.write_bytes(raw[:8] + b"{not json" + raw[17:])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(struct.pack("<Q", 10**12) + raw[8:])
    with pytest.raises(SourceError, match="corrupted"):
        read_header(path)
    with pytest.raises(SourceError, match="model.safetensors"):
        LazyModelReader(tmp_path)


def test_missing_weights_and_missing_shard(tmp_path):
    with pytest.raises(SourceError, match="no safetensors"):
        LazyModelReader(tmp_path)
    write_state_dict(tmp_path, _state(), shard_size=300)
    index = json.loads((tmp_path / SAFETENSORS_INDEX).read_text())
    (tmp_path / sorted(set(index["weight_map"].values()))[-1]).unlink()
    with pytest.raises(SourceError, match="missing"):
        LazyModelReader(tmp_path)


def test_find_recipe_prefers_recipe_yaml_and_reads_the_old_names(tmp_path):
    from evomerge_core.io.model_dir import find_recipe

    assert find_recipe(tmp_path) is None
    (tmp_path / "evomerge_dfs_recipe.yaml").write_text("dfs: 1\n")  # the DFS export's old name
    assert find_recipe(tmp_path) == tmp_path / "evomerge_dfs_recipe.yaml"
    (tmp_path / "evomerge_recipe.yaml").write_text("merge: 1\n")  # `evomerge merge`'s old name
    assert find_recipe(tmp_path) == tmp_path / "evomerge_recipe.yaml"
    (tmp_path / "recipe.yaml").write_text("merge: 2\n")
    assert find_recipe(tmp_path) == tmp_path / "recipe.yaml"


def test_model_dir_writer_leaves_nothing_on_error_and_swaps_on_commit(tmp_path):
    from evomerge_core.io.model_dir import RECIPE_FILE, ModelDirWriter

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "old.txt").write_text("old")
    state = _state()
    plan = [PlannedTensor(n, t.dtype, tuple(t.shape)) for n, t in state.items()]
    with pytest.raises(RuntimeError, match="boom"):
        with ModelDirWriter(out_dir) as out:
            writer = out.shards(plan, 300)
            writer.write("a.weight", state["a.weight"])
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out_dir / "old.txt").read_text() == "old"
    with ModelDirWriter(out_dir) as out:
        writer = out.shards(plan, 300)
        for name in writer.expected_names():
            writer.write(name, state[name])
        out.write_config({"model_type": "x"})
        out.write_recipe("merge_method: linear\n")
        assert out.commit() == out_dir
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert not (out_dir / "old.txt").exists() and (out_dir / RECIPE_FILE).read_text() == "merge_method: linear\n"
    assert json.loads((out_dir / "config.json").read_text()) == {"model_type": "x"}
    reader = LazyModelReader(out_dir)
    assert all(torch.equal(reader.get(n), t) for n, t in state.items()) and (out_dir / SAFETENSORS_INDEX).is_file()


def test_pid_alive_counts_a_zombie_as_gone():
    import os
    import subprocess
    import sys
    import time

    from evomerge_core.io.host import pid_alive

    assert pid_alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while pid_alive(child.pid) and time.monotonic() < deadline:  # exited, not yet reaped: a zombie
        time.sleep(0.05)
    assert not pid_alive(child.pid) and child.poll() == 0
    assert not pid_alive(child.pid)  # reaped: no such process
