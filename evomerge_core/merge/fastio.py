"""Model IO for the streaming merge engine: zero-copy source tensors and a direct writer.

- `MappedModel` hands out source tensors as views of the memory-mapped safetensors files (no
  copy, no fresh memory); `release` drops a tensor's pages from the process again
  (`MADV_DONTNEED`: the page cache keeps them), so resident memory stays near the tensors in
  use, as with `io.LazyModelReader`.
- `DirectShardedWriter` writes the same files as `io.ShardedWriter` (same shard plan, header
  and index) but lets the caller compute each tensor straight into an aligned staging buffer,
  and writes with `O_DIRECT` where the filesystem allows it: no page-cache pages are
  allocated for the output (on some machines, VMs especially, fresh pages cost more than the
  merge arithmetic). Elsewhere (tmpfs, non-Linux) it writes through the page cache. Every
  shard is fsynced before the writer closes.
"""

from __future__ import annotations

import errno
import mmap
import os
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import torch

from evomerge_core.errors import SourceError
from evomerge_core.io.model_files import (
    LazyModelReader,
    PlannedTensor,
    ShardPlan,
    _header_bytes,
)

_ALIGN = 4096
_PAGE = mmap.PAGESIZE


class MappedModel:
    """Tensors of one model directory as read-only views of its mmapped safetensors files."""

    def __init__(self, model_dir: Path | str) -> None:
        self.reader = LazyModelReader(model_dir)  # parses and checks the headers
        self._maps: dict[Path, mmap.mmap | None] = {}

    def names(self) -> list[str]:
        return self.reader.names()

    def _map(self, path: Path) -> mmap.mmap | None:
        if path not in self._maps:
            try:
                with open(path, "rb") as fh:
                    self._maps[path] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError):
                self._maps[path] = None  # e.g. a filesystem without mmap: read instead
        return self._maps[path]

    def get(self, name: str) -> torch.Tensor:
        """The tensor (a view of the mapped file; do not write to it)."""
        info = self.reader.tensors.get(name)
        if info is None:
            raise SourceError(f"tensor {name} not found in {self.reader.model_dir}")
        mm = self._map(info.file)
        numel = info.nbytes // info.dtype.itemsize if info.dtype.itemsize else 0
        if mm is None or numel == 0 or info.start % info.dtype.itemsize:
            return self.reader.get(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # read-only buffer: we never write to it
            flat = torch.frombuffer(mm, dtype=info.dtype, count=numel, offset=info.start)
        return flat.view(info.shape)

    def prefetch(self, name: str) -> None:
        """Ask the kernel to read a tensor's pages ahead (no-op where unsupported)."""
        self._advise(name, getattr(mmap, "MADV_WILLNEED", None))

    def release(self, name: str) -> None:
        """Drop the tensor's pages from this process (they stay in the page cache)."""
        self._advise(name, getattr(mmap, "MADV_DONTNEED", None))

    def _advise(self, name: str, advice: int | None) -> None:
        info = self.reader.tensors.get(name)
        if advice is None or info is None or info.nbytes == 0:
            return
        mm = self._maps.get(info.file)
        if mm is None:
            return
        start = info.start - info.start % _PAGE
        try:
            mm.madvise(advice, start, info.end - start)
        except (OSError, ValueError):
            pass  # advice only

    def close(self) -> None:
        """Unmap the files (tensors handed out must no longer be used)."""
        for mm in self._maps.values():
            if mm is not None:
                try:
                    mm.close()
                except BufferError:
                    pass  # a tensor view is still alive; the map goes when it does
        self._maps.clear()


def _aligned_empty(nbytes: int) -> torch.Tensor:
    raw = torch.empty(nbytes + _ALIGN, dtype=torch.uint8)
    shift = (-raw.data_ptr()) % _ALIGN
    return raw[shift : shift + nbytes]


class DirectShardedWriter(ShardPlan):
    """Streaming (sharded) safetensors writer with caller-filled staging buffers.

    For each planned tensor, in order: `dst = writer.buffer(name)`, fill `dst`, then
    `writer.commit(name)`; or `writer.write(name, tensor)` to copy a finished tensor.
    """

    def __init__(self, out_dir: Path, tensors: Sequence[PlannedTensor], shard_size: int = 5 * 10**9, *, direct: bool = True) -> None:
        super().__init__(out_dir, tensors, shard_size)
        biggest = max((t.nbytes for _, t in self._order), default=0)
        headers = max((len(_header_bytes(s)) for s in self.shards), default=0)
        size = _round_up(max(biggest, headers) + 2 * _ALIGN, _ALIGN)
        # Two stages: one is written out by the writer thread while the next tensor fills the other.
        self._stages = [_aligned_empty(size), _aligned_empty(size)]
        self._writes: list[Future | None] = [None, None]
        self._cur = 0
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="evomerge-writer")
        self._direct_wanted = direct and hasattr(os, "O_DIRECT")
        self.direct_used = False
        self._pos = 0
        self._unaligned: torch.Tensor | None = None
        self._shard = -1
        self._fd: int | None = None
        self._pending = 0  # bytes at the start of the current stage not yet written (< _ALIGN)
        self._size = 0  # final size of the current file

    @property
    def _stage(self) -> torch.Tensor:
        return self._stages[self._cur]

    def _wait(self, i: int) -> None:
        """Wait for the write of stage `i` (raises its error)."""
        fut, self._writes[i] = self._writes[i], None
        if fut is not None:
            fut.result()

    # ------------------------------------------------------------------ public

    def expected_names(self):
        """Tensor names in the order they must be written."""
        return (t.name for _, t in self._order)

    def buffer(self, name: str) -> torch.Tensor:
        """Where to put the values of the next planned tensor (its dtype and shape)."""
        planned = self._next(name)
        self._unaligned = None
        self._wait(self._cur)  # the stage is free once its previous write is done
        if planned.nbytes == 0:
            return torch.empty(planned.shape, dtype=planned.dtype)
        start = self._pending
        if start % planned.dtype.itemsize:  # odd offset after e.g. a bool tensor: stage a copy
            self._unaligned = torch.empty(planned.shape, dtype=planned.dtype)
            return self._unaligned
        return self._stage[start : start + planned.nbytes].view(planned.dtype).view(planned.shape)

    def commit(self, name: str) -> None:
        """The buffer of `name` is filled: write it out."""
        si, planned = self._order[self._pos]
        if planned.name != name:
            raise RuntimeError(f"writer expected {planned.name} but got {name}")
        if self._unaligned is not None:
            raw = self._unaligned.reshape(-1).view(torch.uint8)
            self._stage[self._pending : self._pending + planned.nbytes].copy_(raw)
            self._unaligned = None
        self._pending += planned.nbytes
        self._flush(final=False)
        self._pos += 1

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Copy a finished tensor (planned dtype and shape) and write it."""
        planned = self._order[self._pos][1] if self._pos < len(self._order) else None
        if planned is None or planned.name != name or tuple(tensor.shape) != planned.shape or tensor.dtype != planned.dtype:
            raise RuntimeError(f"writer expected {planned} but got {name} {tuple(tensor.shape)} {tensor.dtype}")
        self.buffer(name).copy_(tensor)
        self.commit(name)

    def close(self) -> None:
        """Finish the last shard and write the index (sharded output only)."""
        self.check_complete(self._pos, self.abort)
        self._finish_file()
        self._io.shutdown(wait=True)
        self.write_index()

    def abort(self) -> None:
        """Close any open file without finishing (the caller removes the directory)."""
        for i in (0, 1):
            try:
                self._wait(i)
            except Exception:  # noqa: BLE001 - the error that made the caller abort, or one after it
                pass
        self._io.shutdown(wait=True)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # ------------------------------------------------------------------ internals

    def _next(self, name: str) -> PlannedTensor:
        if self._pos >= len(self._order):
            raise RuntimeError(f"writer got {name} after the last planned tensor")
        si, planned = self._order[self._pos]
        if planned.name != name:
            raise RuntimeError(f"writer expected {planned.name} but got {name}")
        if si != self._shard:
            self._finish_file()
            self._open(si)
        return planned

    def _open(self, si: int) -> None:
        path = self.out_dir / self.files[si]
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        self._fd = None
        if self._direct_wanted:
            try:
                self._fd = os.open(path, flags | os.O_DIRECT, 0o644)
                self.direct_used = True
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                    raise
        if self._fd is None:
            self._fd = os.open(path, flags, 0o644)
        self._shard = si
        header = _header_bytes(self.shards[si])
        self._size = len(header) + sum(t.nbytes for t in self.shards[si])
        self._stage[: len(header)].copy_(torch.frombuffer(bytearray(header), dtype=torch.uint8))
        self._pending = len(header)
        self._flush(final=False)

    def _flush(self, final: bool) -> None:
        """Write the aligned part of the current stage: in the writer thread, switching stages
        (the unaligned tail moves to the other stage); when `final`, everything, zero-padded,
        here (after the pending writes)."""
        if final:
            self._wait(1 - self._cur)
            self._wait(self._cur)
            end = _round_up(self._pending, _ALIGN)
            if end > self._pending:
                self._stage[self._pending : end].zero_()
            if end:
                self._write_all(self._stage, end)
            self._pending = 0
            return
        end = self._pending - self._pending % _ALIGN
        if not end:
            return
        tail = self._pending - end
        other = 1 - self._cur
        self._wait(other)
        if tail:
            self._stages[other][:tail].copy_(self._stage[end : end + tail])
        self._writes[self._cur] = self._io.submit(self._write_all, self._stage, end)
        self._cur = other
        self._pending = tail

    def _write_all(self, stage: torch.Tensor, end: int) -> None:
        view = memoryview(stage[:end].numpy())
        done = 0
        while done < end:
            done += self._os_write(view[done:])

    def _os_write(self, view: memoryview) -> int:
        try:
            return os.write(self._fd, view)
        except OSError as exc:
            if exc.errno != errno.EINVAL or not self.direct_used:
                raise
            # the filesystem accepted O_DIRECT at open but refuses the write: go buffered
            import fcntl  # deferred: POSIX-only, needed only on this rare fallback

            fl = fcntl.fcntl(self._fd, fcntl.F_GETFL)
            fcntl.fcntl(self._fd, fcntl.F_SETFL, fl & ~os.O_DIRECT)
            self.direct_used = False
            return os.write(self._fd, view)

    def _finish_file(self) -> None:
        if self._fd is None:
            return
        self._flush(final=True)
        os.ftruncate(self._fd, self._size)
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m
