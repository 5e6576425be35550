"""What the generation loops need to know about a causal LM's forward signature."""

from __future__ import annotations

import inspect


def cache_argument(model) -> str:
    """transformers 5 renamed `past_key_values` to `cache`; support both."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"
