"""Dtype names: the ones configs, recipes and the CLI accept, and their torch dtypes."""

from __future__ import annotations

import torch

from evomerge_core.errors import ConfigError, MergeError

DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
}


def parse_dtype(name: str) -> torch.dtype:
    """A torch dtype from its name (float32, float16, bfloat16, ...)."""
    try:
        return DTYPE_NAMES[str(name).lower().removeprefix("torch.")]
    except KeyError:
        raise MergeError(f"unknown dtype {name!r}; use one of float32, float16, bfloat16") from None


def check_dtype_name(field: str, name: str) -> None:
    """ConfigError naming `field` unless `name` is a dtype the merge engine knows."""
    try:
        parse_dtype(name)
    except MergeError as exc:
        raise ConfigError(f"{field}: {exc}") from None
