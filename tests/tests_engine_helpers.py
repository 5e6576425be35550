"""A tiny in-memory Llama for engine unit tests (no files)."""

from __future__ import annotations

import torch


def tiny_llama(seed: int = 0):
    """A 2-layer LlamaForCausalLM with a 64-token vocabulary, SDPA attention, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).eval()
