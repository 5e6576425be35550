"""Tiny, seeded Hugging Face models and tokenizers for tests (offline, seconds).

`make_tiny_llama(path, seed)` writes a saved LlamaForCausalLM directory (safetensors, config,
generation config, and a char-level tokenizer that AutoTokenizer loads offline). With
`base=<dir>` it writes a "fine-tune": the base's weights plus seeded Gaussian noise.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
CHARS = " " + string.ascii_lowercase + string.digits + ".,?!'"


def tiny_llama_config(*, vocab_size: int = 64, hidden: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2):
    """A LlamaConfig for a tiny model (bos=1, eos=2, pad=3; untied embeddings)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )


def save_tiny_tokenizer(path: Path | str) -> Path:
    """Save a char-level tokenizer (46 tokens: 4 specials, space, a-z, 0-9, punctuation)
    as a PreTrainedTokenizerFast that `AutoTokenizer.from_pretrained` loads offline."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + list(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(path)
    return path


def make_tiny_llama(
    path: Path | str,
    seed: int,
    *,
    vocab_size: int = 64,
    hidden: int = 32,
    layers: int = 2,
    dtype: torch.dtype = torch.float32,
    base: Path | str | None = None,
    noise: float = 0.01,
    tokenizer: bool = True,
) -> Path:
    """Write a tiny random LlamaForCausalLM to `path` and return it.

    Without `base`: random init from `seed`. With `base`: the base model's weights plus
    `noise * N(0, 1)` drawn from `seed` (a fine-tune sharing the base's shapes).
    """
    from transformers import LlamaForCausalLM

    if tokenizer and vocab_size < len(SPECIAL_TOKENS) + len(CHARS):
        raise ValueError(f"vocab_size must be >= {len(SPECIAL_TOKENS) + len(CHARS)} to hold the tiny tokenizer")
    path = Path(path)
    if base is not None:
        model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn(param.shape, generator=gen) * noise)
    else:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_llama_config(vocab_size=vocab_size, hidden=hidden, layers=layers))
    model = model.to(dtype)
    model.save_pretrained(path)
    if tokenizer:
        save_tiny_tokenizer(path)
    return path


def make_tiny_family(root: Path | str, *, n_finetunes: int = 2, seed: int = 0, noise: float = 0.01, **kwargs) -> dict[str, Path]:
    """A base model and `n_finetunes` fine-tunes (base + seeded noise) under `root`:
    {"base": ..., "ft1": ..., "ft2": ...}."""
    root = Path(root)
    family = {"base": make_tiny_llama(root / "base", seed, **kwargs)}
    for i in range(1, n_finetunes + 1):
        family[f"ft{i}"] = make_tiny_llama(root / f"ft{i}", seed + 100 * i, base=family["base"], noise=noise, tokenizer=kwargs.get("tokenizer", True))
    return family
