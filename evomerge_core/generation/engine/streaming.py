"""Source residency for merging a candidate into the engine's weights on CUDA.

Sources that fit on the GPU beside the model live there (`evomerge_core.kinds.resident`); otherwise
they stay in pinned host memory and `stream_sources` copies them tensor by tensor on a side CUDA
stream, `depth` tensors ahead of the merge, so the transfers overlap the merge kernels. Pinned
memory is what makes the copies asynchronous (a pageable copy blocks the host and runs at a
fraction of the link's speed).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Mapping

import torch


def pin_sources(state_dicts: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """The same tensors in page-locked host memory (one tensor at a time, so the peak is one
    extra tensor)."""
    pinned: dict[str, dict[str, torch.Tensor]] = {}
    for ref, sd in state_dicts.items():
        pinned[ref] = {}
        for name in list(sd):
            t = sd[name]
            pinned[ref][name] = t if t.device.type != "cpu" or t.is_pinned() else t.pin_memory()
    return pinned


def stream_sources(state_dicts: Mapping[str, Mapping[str, torch.Tensor]], names: Iterable[str],
                   device: torch.device, *, depth: int = 2) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """(name, {source: tensor on `device`}) for each name in order. On CUDA the copies of the
    next `depth` names run on a side stream while the caller merges the current one; elsewhere
    the tensors are handed over as they are."""
    names = list(names)
    if device.type != "cuda":
        for name in names:
            yield name, {ref: sd[name] for ref, sd in state_dicts.items()}
        return
    compute = torch.cuda.current_stream(device)
    copier = torch.cuda.Stream(device)
    pending: deque = deque()

    def issue(name: str) -> None:
        with torch.cuda.stream(copier):
            tensors = {ref: sd[name].to(device, non_blocking=True) for ref, sd in state_dicts.items()}
            done = torch.cuda.Event()
            done.record(copier)
        pending.append((name, tensors, done))

    upcoming = iter(names)
    for name in upcoming:
        issue(name)
        if len(pending) >= depth:
            break
    while pending:
        name, tensors, done = pending.popleft()
        compute.wait_event(done)
        for t in tensors.values():
            t.record_stream(compute)  # the allocator must not reuse it before the merge ran
        nxt = next(upcoming, None)
        if nxt is not None:
            issue(nxt)
        yield name, tensors
