"""Tiny random models of several families for the generation-engine parity tests.

Built so greedy decoding is a meaningful comparison: the output head is scaled up, so the top
logit leads the next by far more than float32 rounding of differently shaped matmuls, and the EOS
row copies a frequent character's row (times 1.05), so some answers end with EOS on their own.
Mistral and Gemma get a short sliding window, so windowed attention is exercised too.
"""

from __future__ import annotations

import torch

FAMILIES = ("llama", "mistral", "qwen2", "gemma2", "gemma3")
VOCAB = 64
PROMPTS = ["what is 2 plus 3?", "hello there", "a", "the quick brown fox jumps over", "xyz 123", "why?",
           "one two three four five six", "z", "ab cd ef", "99 bottles", "q", "seven, eight; nine"]
CAPS = [20, 5, 30, 12, 25, 8, 40, 3, 30, 30, 30, 17]
PAD, EOS = 3, 2  # the tiny tokenizer's (tests/tiny_models.py)


def family_config(family: str):
    """A tiny config of `family` (bos=1, eos=2, pad=3)."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    if family == "llama":
        return tf.LlamaConfig(**common)
    if family == "mistral":
        return tf.MistralConfig(**common, sliding_window=12)
    if family == "qwen2":
        return tf.Qwen2Config(**common)
    if family == "gemma2":
        return tf.Gemma2Config(**common, head_dim=16, sliding_window=12, final_logit_softcapping=None,
                               layer_types=["sliding_attention", "full_attention"])
    if family == "gemma3":
        return tf.Gemma3TextConfig(**common, head_dim=16, sliding_window=12, final_logit_softcapping=None,
                                   layer_types=["sliding_attention", "full_attention"])
    raise ValueError(family)


def make_family_model(family: str, seed: int = 0, *, eos_like: int = 44, head_scale: float = 20.0):
    """A random `family` model in eval mode (see module docstring)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = family_config(family)
    cfg._attn_implementation = "eager" if family == "gemma2" else "sdpa"  # Gemma 2 has no SDPA path
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        if head.data_ptr() == model.get_input_embeddings().weight.data_ptr():  # tied: give the head its own
            model.lm_head = torch.nn.Linear(head.shape[1], head.shape[0], bias=False)
            model.config.tie_word_embeddings = False
            model.lm_head.weight.copy_(head)
            head = model.lm_head.weight
        head.mul_(head_scale)
        head[2] = head[eos_like] * 1.05
    return model


def hf_reference(model, encoded, caps) -> list[list[int]]:
    """Greedy `generate`, one prompt at a time (no padding), new tokens only."""
    out = []
    for ids, cap in zip(encoded, caps):
        x = torch.tensor([ids], device=model.device)
        gen = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=cap, do_sample=False,
                             eos_token_id=EOS, pad_token_id=PAD)
        out.append(gen[0, len(ids):].tolist())
    return out
