"""The device preamble of the GPU benchmarks (`gpu_merge.py`, `gpu_fitness.py`)."""

from __future__ import annotations

import sys
from typing import Callable


def open_device(spec: str) -> tuple[object, Callable[[], None], str] | None:
    """(torch device, a synchronise function, the device's name), or None after saying that
    CUDA was asked for and there is none (nothing was measured)."""
    import torch

    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: not measured", file=sys.stderr)
        return None
    if device.type == "cuda":
        return device, torch.cuda.synchronize, torch.cuda.get_device_name(device)
    return device, (lambda: None), "cpu"
