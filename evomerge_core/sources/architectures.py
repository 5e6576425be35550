"""Where things live in a model, per family: the decoder-layer index of a tensor name, the
number of decoder layers in a config, and which tensors have a vocabulary axis.

Only decoder-only causal LMs (Llama/Mistral/Qwen-style names) are covered now. LLaVA-style
names (`model.language_model.layers.N.` in memory, `language_model.model.layers.N.` on disk)
already parse, because the layer pattern matches `layers.N.` after any prefix; a family table
can be added here when a VLM needs more than that.
"""

from __future__ import annotations

import re
from typing import Any

# `...layers.N.` / `...h.N.` (GPT-2 style) / `...blocks.N.` preceded by a dot or the start.
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")

# Suffixes of tensors whose first axis is the vocabulary (embeddings and output heads).
VOCAB_TENSOR_SUFFIXES: tuple[str, ...] = (
    "embed_tokens.weight",
    "lm_head.weight",
    "wte.weight",
    "embed_out.weight",
    "word_embeddings.weight",
)

# Config keys that may hold the decoder depth, in order of preference.
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def layer_index(tensor_name: str) -> int | None:
    """The decoder-layer index in a tensor name (`model.layers.3.mlp...` -> 3), else None."""
    match = _LAYER_RE.search(tensor_name)
    return int(match.group(1)) if match else None


def num_hidden_layers(config: dict[str, Any]) -> int:
    """Number of decoder layers of a model from its config.json dict (text_config for VLMs)."""
    for key in _LAYER_KEYS:
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    text_config = config.get("text_config")
    if isinstance(text_config, dict):
        return num_hidden_layers(text_config)
    raise ValueError(
        "config.json has no layer count (num_hidden_layers/n_layer); is this a decoder model?"
    )


def is_vision_tensor(tensor_name: str) -> bool:
    """True for a VLM's vision tower / projector tensors (`vision_tower.`, `vision_model.`,
    `visual.`, `multi_modal_projector.` at any depth): their layers are not decoder layers."""
    return _VISION_RE.search(tensor_name) is not None


_VISION_RE = re.compile(r"(?:^|\.)(?:vision_tower|vision_model|visual|multi_modal_projector)\.")


def is_vocab_tensor(tensor_name: str) -> bool:
    """True for tensors whose first axis indexes the vocabulary (embeddings, LM head)."""
    return tensor_name.endswith(VOCAB_TENSOR_SUFFIXES)


def architecture_name(config: dict[str, Any]) -> str:
    """The architecture family of a config: `architectures[0]`, else `model_type`."""
    archs = config.get("architectures")
    if isinstance(archs, list) and archs:
        return str(archs[0])
    model_type = config.get("model_type")
    if model_type:
        return str(model_type)
    raise ValueError("config.json names neither 'architectures' nor 'model_type'")


def vocab_size(config: dict[str, Any]) -> int | None:
    """The vocabulary size in a config (text_config for VLMs), or None when absent."""
    value = config.get("vocab_size")
    if isinstance(value, int):
        return value
    text_config = config.get("text_config")
    if isinstance(text_config, dict):
        return vocab_size(text_config)
    return None
