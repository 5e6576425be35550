"""fastio: the direct writer produces the same files as io.ShardedWriter; mapped reads match."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from evomerge_core.io.model_files import LazyModelReader, PlannedTensor, ShardedWriter
from evomerge_core.merge.fastio import DirectShardedWriter, MappedModel


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(1000, 3, generator=g).to(torch.bfloat16),
        "mask": torch.rand(7, generator=g) > 0.5,  # 7 bytes: what follows is unaligned
        "b.weight": torch.randn(513, generator=g),
        "c.bias": torch.randn(3, generator=g).to(torch.float16),
        "empty": torch.empty(0, 4),
        "ids": torch.arange(5),
        "d.weight": torch.randn(4096, generator=g).to(torch.bfloat16),
    }


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.mark.parametrize("shard_size", [10**9, 6000])
@pytest.mark.parametrize("where", ["disk", "shm"])
def test_direct_writer_writes_the_same_bytes_as_sharded_writer(tmp_path, shard_size, where):
    if where == "shm":
        if not Path("/dev/shm").is_dir():
            pytest.skip("no /dev/shm")
        root = Path(tempfile.mkdtemp(dir="/dev/shm"))  # tmpfs: O_DIRECT is refused, buffered path
    else:
        root = tmp_path
    tensors = _tensors()
    plan = [PlannedTensor(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    (root / "ref").mkdir()
    (root / "direct").mkdir()
    ref = ShardedWriter(root / "ref", plan, shard_size)
    for name, t in tensors.items():
        ref.write(name, t)
    ref.close()
    writer = DirectShardedWriter(root / "direct", plan, shard_size)
    for i, (name, t) in enumerate(tensors.items()):
        if i % 2:
            writer.write(name, t)
        else:
            writer.buffer(name).copy_(t)
            writer.commit(name)
    writer.close()
    assert _files(root / "direct") == _files(root / "ref")
    reader = LazyModelReader(root / "direct")
    assert all(torch.equal(reader.get(n), t) for n, t in tensors.items())
    if where == "disk":
        assert len(_files(root / "ref")) == (1 if shard_size > 10**6 else len(writer.files) + 1)


def test_direct_writer_refuses_out_of_order_and_early_close(tmp_path):
    tensors = _tensors()
    plan = [PlannedTensor(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    writer = DirectShardedWriter(tmp_path, plan)
    with pytest.raises(RuntimeError, match="expected a.weight"):
        writer.buffer("b.weight")
    writer.write("a.weight", tensors["a.weight"])
    with pytest.raises(RuntimeError, match="closed before tensor mask"):
        writer.close()


def test_mapped_model_matches_lazy_reader_and_survives_release(tmp_path):
    tensors = _tensors()
    plan = [PlannedTensor(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    writer = DirectShardedWriter(tmp_path, plan, 6000)
    for name, t in tensors.items():
        writer.write(name, t)
    writer.close()
    mapped = MappedModel(tmp_path)
    assert mapped.names() == LazyModelReader(tmp_path).names()
    for name, t in tensors.items():
        mapped.prefetch(name)
        got = mapped.get(name)
        assert got.dtype == t.dtype and torch.equal(got, t)
        mapped.release(name)
        assert torch.equal(got, t)  # released pages come back from the page cache
    del got
    mapped.close()


def test_a_failed_background_write_surfaces_and_abort_closes(tmp_path, monkeypatch):
    import errno
    import os

    from evomerge_core.merge import fastio

    real_write = os.write
    written = []

    def limited_write(fd, data):
        if sum(written) > 4096:
            raise OSError(errno.EFBIG, "File too large")
        n = real_write(fd, data)
        written.append(n)
        return n

    monkeypatch.setattr(fastio.os, "write", limited_write)
    g = torch.Generator().manual_seed(1)
    tensors = {f"t{i}": torch.randn(3000, generator=g) for i in range(4)}
    plan = [PlannedTensor(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    writer = DirectShardedWriter(tmp_path, plan)
    with pytest.raises(OSError, match="File too large"):
        for name, t in tensors.items():
            writer.write(name, t)
        writer.close()
    writer.abort()
    assert writer._fd is None
