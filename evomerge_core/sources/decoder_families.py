"""Decoder families for DFS: where a decoder-only causal LM family keeps its layers, embeddings,
head and each layer's last write into the residual stream, and which config keys two models must
share for one's layers to run inside the other's residual stream."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from evomerge_core.errors import SourceError


@dataclass(frozen=True)
class DecoderFamily:
    """Where things live in a decoder-only causal LM family (transformers names)."""

    model_type: str
    layers_prefix: str = "model.layers."
    embed_tensor: str = "model.embed_tokens.weight"
    head_tensor: str = "lm_head.weight"
    # The module (inside a decoder layer) whose output is the layer's last write into the
    # residual stream; scaling its weight and bias scales exactly that write.
    output_module: str = "mlp.down_proj"

    @property
    def output_tensors(self) -> tuple[str, str]:
        """Tensor suffixes (inside a layer) that a scale is folded into."""
        return (f"{self.output_module}.weight", f"{self.output_module}.bias")


# Pre-norm decoders whose layer is `h = x + attn(norm(x)); out = h + mlp(norm(h))`.
FAMILIES: dict[str, DecoderFamily] = {t: DecoderFamily(t) for t in ("llama", "mistral", "qwen2", "qwen3")}

# Config keys that must agree between A and B: they fix a layer's shapes and its arithmetic
# (the exported model runs B's layers under A's config). hidden_size first: the commonest clash.
_PAIR_KEYS = (
    "hidden_size",
    "model_type",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "rms_norm_eps",
    "attention_bias",
    "mlp_bias",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "sliding_window",
)


def family_of(config: Mapping[str, Any], name: str = "model") -> DecoderFamily:
    """The decoder family of a config.json dict; SourceError for unsupported architectures."""
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        arch = (config.get("architectures") or [model_type])[0]
        raise SourceError(
            f"{name} is a {arch} (model_type {model_type!r}), which DFS does not support: it runs one model's "
            "layers inside another's residual stream and scales each layer's last write (mlp.down_proj), which is "
            f"implemented and tested for the {', '.join(sorted(FAMILIES))} decoder families only; choose two models "
            "of one of these families"
        )
    if not isinstance(config.get("num_hidden_layers"), int):
        raise SourceError(f"{name} has no num_hidden_layers in its config.json; it is not a decoder model DFS can use")
    return FAMILIES[model_type]


def check_pair(config_a: Mapping[str, Any], config_b: Mapping[str, Any], *, name_a: str = "model A", name_b: str = "model B") -> DecoderFamily:
    """Check that B's layers can run inside A's model (same family and layer shapes)."""
    family = family_of(config_a, name_a)
    family_of(config_b, name_b)
    for key in _PAIR_KEYS:
        va, vb = config_a.get(key), config_b.get(key)
        if va != vb:
            raise SourceError(
                f"{name_a} has {key}={va!r} but {name_b} has {key}={vb!r}; DFS can only combine layers of models "
                "with the same layer shapes (use two fine-tunes of one base model)"
            )
    return family
