"""Run a DFS layer path dynamically over two resident models, without copying weights.

`DataflowModel(model_a, model_b).set_recipe(recipe)` is a causal LM with the Hugging Face
forward signature (``input_ids, attention_mask, position_ids, cache, use_cache,
inputs_embeds, logits_to_keep``) returning ``CausalLMOutputWithPast``, so
`generation.greedy_generate` and `answer_logprobs` score it like any model.

Semantics (docs/dfs.md): with hop k's decoder layer written as
``x -> x + attn_k(x) + mlp_k(x + attn_k(x))``, hop k's input scale ``s_k`` multiplies the
previous hop's MLP output ``m_{k-1}`` (the embeddings for k = 0) before it joins the residual
stream, and stays scaled there for every later hop. In vLLM's layout (``residual += h``) that
is ``h * s_k`` on the layer's input, as in the paper's released model. Here hop k-1 runs with
its output projection (`DecoderFamily.output_module`, ``mlp.down_proj``) scaled by ``s_k``
for that call only (`torch.func.functional_call`, the shared weights are never modified),
computed by `scale_tensor` exactly as `dataflow_export` folds it, so the dynamic path and the
materialised model compute the same thing by construction.

KV cache: every hop gets its own cache slot (hop index), so a layer used twice on the path
keeps two separate caches; the cache and the masks are built from `path_config`, A's config
with ``num_hidden_layers`` = hops, i.e. the config of the materialised model.
"""

from __future__ import annotations

import copy
import threading
from pathlib import Path
from typing import Any

import torch
from torch import nn

from evomerge_core.io.model_files import read_config
from evomerge_core.kinds.cache import cached_model
from evomerge_core.sources.decoder_families import check_pair
from evomerge_core.spaces.dfs import DFSRecipe


def scale_tensor(tensor: torch.Tensor, scale: float) -> torch.Tensor:
    """`tensor * scale` computed in float32 and rounded back to the tensor's dtype; the
    export folds scales with this same function, so both paths see identical weights."""
    return (tensor.to(torch.float32) * scale).to(tensor.dtype)


class _HopCache:
    """A view of a cache that stores every update in one fixed slot (the hop index), so the
    same layer used by two hops keeps two caches."""

    def __init__(self, cache: Any, slot: int) -> None:
        self._cache = cache
        self._slot = slot

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        return self._cache.update(key_states, value_states, self._slot, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cache, name)


def _layer_types(config: Any, n: int) -> list[str]:
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)
    kind = "sliding_attention" if getattr(config, "sliding_window", None) is not None else "full_attention"
    return [kind] * n


class DataflowModel(nn.Module):
    """A's embeddings, final norm and head around a path of A's and B's decoder layers.

    Not re-entrant: one forward at a time (a scaled hop swaps its output projection in for
    the duration of its call). Call `set_recipe` before the first forward and whenever the path changes.
    """

    def __init__(self, model_a: nn.Module, model_b: nn.Module) -> None:
        super().__init__()
        cfg_a, cfg_b = model_a.config, model_b.config
        self.family = check_pair(cfg_a.to_dict(), cfg_b.to_dict())
        self.config = cfg_a
        base_a = model_a.model
        self.embed_tokens = base_a.embed_tokens
        self.norm = base_a.norm
        self.rotary_emb = base_a.rotary_emb
        self.lm_head = model_a.lm_head
        self.layers_a = base_a.layers
        self.layers_b = model_b.model.layers
        self._types = {"a": _layer_types(cfg_a, len(self.layers_a)), "b": _layer_types(cfg_b, len(self.layers_b))}
        self.recipe: DFSRecipe | None = None
        self.path_config: Any = None
        self.lock = threading.RLock()  # held by callers from set_recipe until scoring is done
        self._hops: list[tuple[nn.Module, float, str]] = []

    @classmethod
    def from_pretrained(cls, path_a: str | Path, path_b: str | Path, *, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> DataflowModel:
        """Load A and B from local model dirs (B's embeddings and head are not kept)."""
        from transformers import AutoModelForCausalLM  # deferred: transformers is heavy

        check_pair(read_config(Path(path_a)), read_config(Path(path_b)), name_a=str(path_a), name_b=str(path_b))
        model_a = AutoModelForCausalLM.from_pretrained(path_a, dtype=dtype)
        model_b = AutoModelForCausalLM.from_pretrained(path_b, dtype=dtype)
        return cls(model_a, model_b).to(device).eval()

    def _scaled_output(self, layer: nn.Module, scale: float) -> dict[str, torch.Tensor]:
        """Replacement output-projection tensors of `layer`, scaled as the export scales them."""
        name = self.family.output_module
        module = layer.get_submodule(name)
        out = {f"{name}.weight": scale_tensor(module.weight, scale)}
        if getattr(module, "bias", None) is not None:
            out[f"{name}.bias"] = scale_tensor(module.bias, scale)
        return out

    def set_recipe(self, recipe: DFSRecipe) -> DataflowModel:
        """Use `recipe`'s path from now on; returns self."""
        recipe.check_layers(len(self.layers_a), len(self.layers_b))
        layers = {"a": self.layers_a, "b": self.layers_b}
        self._hops = [(layers[h.model][h.layer], float(h.scale), self._types[h.model][h.layer]) for h in recipe.path]
        config = copy.deepcopy(self.config)
        config.num_hidden_layers = len(recipe.path)
        if getattr(config, "layer_types", None):
            config.layer_types = [t for _, _, t in self._hops]
        self.path_config = config
        self.recipe = recipe
        return self

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ):
        """Run the path; same arguments and output type as `LlamaForCausalLM.forward`."""
        from transformers.cache_utils import DynamicCache  # deferred: transformers is heavy
        from transformers.masking_utils import (  # deferred: transformers is heavy
            create_causal_mask,
            create_sliding_window_causal_mask,
        )
        from transformers.modeling_outputs import CausalLMOutputWithPast  # deferred: transformers is heavy

        if self.recipe is None:
            raise RuntimeError("DataflowModel has no path yet; call set_recipe(recipe) first")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.path_config)
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past).unsqueeze(0)
        mask_args = dict(config=self.path_config, inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache, position_ids=position_ids)
        masks: dict[str, Any] = {}
        for kind in {t for _, _, t in self._hops}:
            make = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
            masks[kind] = make(**mask_args)
        first_scale = self._hops[0][1]
        hidden = scale_tensor(inputs_embeds, first_scale) if first_scale != 1.0 else inputs_embeds
        position_embeddings = self.rotary_emb(hidden, position_ids=position_ids)
        for k, (layer, _, kind) in enumerate(self._hops):
            layer_kwargs = dict(
                attention_mask=masks[kind],
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                cache=_HopCache(cache, k) if cache is not None else None,
                use_cache=use_cache,
                **kwargs,
            )
            nxt = self._hops[k + 1][1] if k + 1 < len(self._hops) else 1.0
            if nxt == 1.0:
                hidden = layer(hidden, **layer_kwargs)
            else:
                # Run the layer with its output projection scaled for this call only.
                hidden = torch.func.functional_call(layer, self._scaled_output(layer, nxt), (hidden,), layer_kwargs)
        hidden = self.norm(hidden)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:, :]
        logits = self.lm_head(hidden)
        return CausalLMOutputWithPast(logits=logits, cache=cache)


def get_dataflow_model(path_a: str | Path, path_b: str | Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu") -> DataflowModel:
    """The process-wide `DataflowModel` for these source dirs and settings (loaded on first use;
    one model per worker, `kinds.cache`)."""
    key = ("dfs", str(Path(path_a).resolve()), str(Path(path_b).resolve()), str(dtype), str(device))
    return cached_model(key, lambda: DataflowModel.from_pretrained(path_a, path_b, dtype=dtype, device=device))
