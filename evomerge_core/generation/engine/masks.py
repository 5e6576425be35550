"""Attention masks the engine hands to a transformers model (4D masks are used as given).

Causal, per-row valid keys, and for sliding-window layers the window; as booleans for SDPA and
as additive float masks for the eager attention. Models that mix full and sliding layers get a
``{"full_attention": ..., "sliding_attention": ...}`` mapping, which their forward accepts.
"""

from __future__ import annotations

import torch

SUPPORTED_ATTENTION = ("sdpa", "eager")


def attention_kind(config) -> str:
    """The model's attention implementation; ValueError when the engine cannot drive it."""
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl not in SUPPORTED_ATTENTION:
        raise ValueError(f"the generation engine supports attention implementations {list(SUPPORTED_ATTENTION)}, "
                         f"this model uses {impl!r}; load it with attn_implementation='sdpa' or use runtime.generation: hf")
    return impl


def window_layout(config) -> tuple[str, int | None]:
    """("full" | "sliding" | "mixed", window) for the model's attention layers."""
    window = getattr(config, "sliding_window", None)
    types = set(getattr(config, "layer_types", None) or [])
    if not window:
        return "full", None
    if not types:  # Mistral-style: one window for every layer
        return "sliding", int(window)
    if types == {"sliding_attention"}:
        return "sliding", int(window)
    if "sliding_attention" in types:
        return "mixed", int(window)
    return "full", None


def _finish(allowed: torch.Tensor, impl: str, dtype: torch.dtype) -> torch.Tensor:
    if impl == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def _layout(full: torch.Tensor, window_ok: torch.Tensor | None, layout: str, impl: str, dtype: torch.dtype):
    if layout == "full" or window_ok is None:
        return _finish(full, impl, dtype)
    sliding = full & window_ok
    if layout == "sliding":
        return _finish(sliding, impl, dtype)
    return {"full_attention": _finish(full, impl, dtype), "sliding_attention": _finish(sliding, impl, dtype)}


def prefill_mask(lengths: torch.Tensor, width: int, *, layout: str, window: int | None, impl: str,
                 dtype: torch.dtype):
    """[n, 1, width, width] for left-padded prompts: causal over each prompt's own tokens.
    A padding query sees only itself (a row with no visible key would give NaN in SDPA)."""
    idx = torch.arange(width, device=lengths.device)
    causal = idx[None, :] <= idx[:, None]  # [q, k]
    valid = idx[None, :] >= (width - lengths)[:, None]  # [n, k]
    allowed = (causal[None] & valid[:, None, :]) | torch.eye(width, dtype=torch.bool, device=lengths.device)[None]
    window_ok = None if window is None else (idx[:, None] - idx[None, :] < window)[None]
    return _layout(allowed[:, None], None if window_ok is None else window_ok[:, None], layout, impl, dtype)


def decode_mask(positions: torch.Tensor, width: int, *, layout: str, window: int | None, impl: str,
                dtype: torch.dtype):
    """[slots, 1, 1, width]: each slot sees its keys at positions 0..its own position."""
    idx = torch.arange(width, device=positions.device)
    allowed = (idx[None, :] <= positions[:, None])[:, None, None, :]
    window_ok = None if window is None else (positions[:, None] - idx[None, :] < window)[:, None, None, :]
    return _layout(allowed, window_ok, layout, impl, dtype)
