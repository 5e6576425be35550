"""The generation engine used to score candidates (continuous batching, preallocated KV slots,
on-device stop detection, CUDA graphs on CUDA), and the choice between it and the reference loop.

- `engine_generate(model, tokenizer, prompts, ...)`: what `evomerge_core.generation.hf_loop.greedy_generate`
  calls when the engine is chosen; the engine of a model is kept per model object (weakly), so its
  buffers, graphs and length history live as long as the resident model.
- `choose_backend(name, model)`: ``runtime.generation`` (``auto`` | ``engine`` | ``hf``) resolved
  for a model: ``auto`` is the engine on CUDA and the reference loop elsewhere.
- `generation_backend(name)`: a context in which `greedy_generate` uses that choice (the evaluator
  wraps scoring in it).

Modules: `kv_cache` (slots), `masks` (4D masks per attention layout), `stops` (device stop
automata), `scheduler` (longest-expected-first), `runner` (the loop), `streaming` (pinned source
residency for in-place merging on CUDA). See docs/engine.md.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import os
import weakref
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from evomerge_core.generation.engine.masks import SUPPORTED_ATTENTION
from evomerge_core.generation.engine.runner import GenerationEngine

BACKENDS = ("auto", "engine", "hf")

_CHOICE: contextvars.ContextVar[str] = contextvars.ContextVar("evomerge_generation_backend", default="auto")
_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class GenerationBackend(Protocol):
    """What a generation backend provides (the engine here; a vLLM-class server could be another):
    greedy continuations of `prompts`, one cap per prompt, cut at the first stop string, with
    ``stats["row_tokens"]`` filled when a stats dict is given. It must not keep any state of one
    candidate's weights into the next call."""

    def __call__(self, model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: Sequence[int],
                 stop_strings: Sequence[str], batch_size: int, stats: dict | None) -> list[str]: ...


@contextlib.contextmanager
def generation_backend(name: str) -> Iterator[None]:
    """Within this block `greedy_generate` uses backend `name` (``auto``, ``engine`` or ``hf``)."""
    if name not in BACKENDS:
        raise ValueError(f"generation backend must be one of {list(BACKENDS)}, got {name!r}")
    token = _CHOICE.set(name)
    try:
        yield
    finally:
        _CHOICE.reset(token)


def choose_backend(name: str | None, model: Any) -> str:
    """``engine`` or ``hf`` for `model` (`name` None: the surrounding `generation_backend`)."""
    name = name or _CHOICE.get()
    if name == "auto":  # EVOMERGE_GENERATION=engine|hf overrides auto (e.g. to compare the demo on both)
        name = os.environ.get("EVOMERGE_GENERATION", "auto") or "auto"
    if name not in BACKENDS:
        raise ValueError(f"generation backend must be one of {list(BACKENDS)}, got {name!r} "
                         "(runtime.generation, the backend argument or EVOMERGE_GENERATION)")
    if name == "hf":
        return name
    why = unsupported_reason(model)
    if name == "engine":
        if why:
            raise ValueError(f"runtime.generation is 'engine' but {why}; use runtime.generation: hf (or auto)")
        return name
    # auto. On CPU the reference loop stays the default: float32 results then match earlier runs
    # bit for bit (the engine's differently shaped matmuls may round differently on near ties).
    # Only plain causal LMs by default: a VLM or a DFS layer path keeps the reference loop unless asked.
    causal_lm = type(model).__name__.endswith("ForCausalLM")
    return "engine" if why is None and causal_lm and next(model.parameters()).device.type == "cuda" else "hf"


def unsupported_reason(model: Any) -> str | None:
    """Why the engine cannot drive `model` (None when it can): it needs a transformers causal LM
    whose forward takes a cache object, 4D masks and `logits_to_keep` (SDPA or eager attention)."""
    config = getattr(model, "config", None)
    forward = getattr(model, "forward", None)
    if config is None or forward is None or not hasattr(model, "get_output_embeddings"):
        return f"{type(model).__name__} is not a transformers causal language model"
    params = inspect.signature(forward).parameters
    if "logits_to_keep" not in params or not ({"cache", "past_key_values"} & set(params)):
        return f"{type(model).__name__}.forward takes no cache object or logits_to_keep"
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl not in SUPPORTED_ATTENTION:
        return f"the model uses attention {impl!r} (the engine drives {list(SUPPORTED_ATTENTION)})"
    if next(model.parameters(), None) is None:
        return "the model has no parameters"
    return None


def engine_for(model: Any) -> GenerationEngine:
    """The engine bound to `model` (created on first use, dropped with the model)."""
    engine = _ENGINES.get(model)
    if engine is None:
        engine = _ENGINES[model] = GenerationEngine(model)
    return engine


def engine_generate(model: Any, tokenizer: Any, prompts: Sequence[str], encoded: Sequence[Sequence[int]], *,
                    caps: Sequence[int], stop_strings: Sequence[str], batch_size: int, pad_id: int,
                    eos_id: int | None) -> tuple[list[list[int]], list[bool]]:
    """Token ids per prompt from the model's engine (see `GenerationEngine.generate`)."""
    return engine_for(model).generate(model, tokenizer, prompts, encoded, caps=caps, stop_strings=stop_strings,
                                      slots=batch_size, pad_id=pad_id, eos_id=eos_id)


__all__ = ["BACKENDS", "GenerationBackend", "GenerationEngine", "choose_backend", "engine_for", "engine_generate",
           "generation_backend", "unsupported_reason"]
