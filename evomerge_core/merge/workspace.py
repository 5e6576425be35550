"""Scratch memory of the merge kernels: grow-only buffers, one set per thread, reused across
calls (fresh pages are expensive); `release_workspace` frees them when idle."""

from __future__ import annotations

import threading

import torch


class Workspace:
    """Grow-only scratch buffers, one set per thread (kernel chunks may run on pool threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._per_thread: dict[int, dict[tuple[str, torch.dtype, str], torch.Tensor]] = {}

    def get(self, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        tid = threading.get_ident()
        buffers = self._per_thread.get(tid)
        if buffers is None:
            with self._lock:
                buffers = self._per_thread.setdefault(tid, {})
        key = (name, dtype, str(device))
        buf = buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(max(numel, 1), dtype=dtype, device=device)
            buffers[key] = buf
        return buf[:numel]

    def clear(self) -> None:
        with self._lock:
            self._per_thread.clear()


WS = Workspace()


def release_workspace() -> None:
    """Free the kernels' scratch buffers (kept between calls for speed; call when idle)."""
    WS.clear()
