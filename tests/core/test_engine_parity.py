"""The generation engine against Hugging Face `generate` (greedy, batch of one, float32) on tiny
random models of five families: token for token, with EOS, per-prompt caps, one-character and
multi-token stop strings, more prompts than slots, and in-place weight swaps."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine_models import CAPS, EOS, FAMILIES, PAD, PROMPTS, hf_reference, make_family_model  # noqa: E402
from tiny_models import save_tiny_tokenizer  # noqa: E402

from evomerge_core.generation.engine import engine_for, engine_generate  # noqa: E402
from evomerge_core.generation.hf_loop import greedy_generate, truncate_at_stop  # noqa: E402



@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    return AutoTokenizer.from_pretrained(save_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


def _encoded(tokenizer) -> list[list[int]]:
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]


def _text(tokenizer, ids) -> str:
    return tokenizer.decode([t for t in ids if t not in (PAD, EOS)], skip_special_tokens=True)


def _pick_stops(texts: list[str]) -> tuple[str, str]:
    """A character and a two-character string that occur inside some reference answers but not
    all, so some rows stop on each and others do not (chosen from the data, the same every run)."""
    chars = Counter(c for t in texts for c in set(t[1:]) if c.strip())
    one = next(c for c, n in sorted(chars.items(), key=lambda kv: (-kv[1], kv[0])) if n < len(texts) - 2)
    pairs = Counter(p for t in texts if one not in t for p in {t[i:i + 2] for i in range(1, len(t) - 1)}
                    if p.strip() == p and len(set(p)) == 2)
    two = sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
    return one, two


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_matches_generate_token_for_token(family, tokenizer):
    model = make_family_model(family, seed=0)
    encoded = _encoded(tokenizer)
    ref = hf_reference(model, encoded, CAPS)
    ref_texts = [_text(tokenizer, r) for r in ref]
    one, two = _pick_stops(ref_texts)
    stops = (one, two)
    tokens, stopped = engine_generate(model, tokenizer, PROMPTS, encoded, caps=CAPS, stop_strings=stops,
                                      batch_size=4, pad_id=PAD, eos_id=EOS)
    for i, (got, want) in enumerate(zip(tokens, ref)):
        assert got == want[: len(got)], f"{family} prompt {i}: engine {got} vs generate {want}"
        if not stopped[i]:  # ended by EOS or its cap: the whole answer
            assert got == want, f"{family} prompt {i} ended early without a stop string"
    expected = [truncate_at_stop(t, stops) for t in ref_texts]
    texts = greedy_generate(model, tokenizer, PROMPTS, max_new_tokens=CAPS, stop_strings=stops, batch_size=4,
                            backend="engine")
    assert texts == expected
    # what this comparison covered: EOS, caps, both stop strings, refills (12 prompts, 4 slots)
    assert any(EOS in r for r in ref)
    assert any(len(r) == c and EOS not in r for r, c in zip(ref, CAPS))
    assert any(one in t and (two not in t or t.index(one) < t.index(two)) for t in ref_texts)
    assert any(two in t and (one not in t or t.index(two) < t.index(one)) for t in ref_texts)
    assert engine_for(model).last_stats["prefills"] >= 2


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_engine_equals_reference_loop(family, tokenizer):
    """`greedy_generate` gives the same texts and token counts on both backends."""
    model = make_family_model(family, seed=1)
    stops = ("?", "ll", "q8")
    a_stats, b_stats = {}, {}
    a = greedy_generate(model, tokenizer, PROMPTS, max_new_tokens=CAPS, stop_strings=stops, batch_size=5,
                        stats=a_stats, backend="hf")
    b = greedy_generate(model, tokenizer, PROMPTS, max_new_tokens=CAPS, stop_strings=stops, batch_size=5,
                        stats=b_stats, backend="engine")
    assert a == b
    assert a_stats["row_tokens"] == b_stats["row_tokens"]
    assert sum(len(t) for t in a) > 0


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_in_place_weight_swap(family, tokenizer):
    """After merging another model's weights into the engine's parameters in place, outputs equal
    those of a freshly built model with those weights; buffers and graphs keep their addresses and
    nothing of the previous candidate (not even poisoned cache contents) leaks in."""
    model = make_family_model(family, seed=0)
    other = make_family_model(family, seed=7)
    encoded = _encoded(tokenizer)
    first, _ = engine_generate(model, tokenizer, PROMPTS, encoded, caps=CAPS, stop_strings=(), batch_size=3,
                               pad_id=PAD, eos_id=EOS)
    engine = engine_for(model)
    addresses = {n: p.data_ptr() for n, p in model.named_parameters()}
    cache_ptrs = [t.data_ptr() for t in engine.cache.keys.values()]
    with torch.inference_mode():  # the engine's buffers are inference tensors
        for (name, p), q in zip(model.named_parameters(), other.parameters()):
            p.copy_(q)  # what the resident model's in-place merge does
        for t in (*engine.cache.keys.values(), *engine.cache.values.values()):
            t.fill_(float("nan"))  # a stale cache would now poison every attended position
    swapped, _ = engine_generate(model, tokenizer, PROMPTS, encoded, caps=CAPS, stop_strings=(), batch_size=3,
                                 pad_id=PAD, eos_id=EOS)
    assert swapped == hf_reference(other, encoded, CAPS)
    assert swapped != first
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == addresses
    assert [t.data_ptr() for t in engine.cache.keys.values()] == cache_ptrs
    assert len(engine.history) == len(PROMPTS)  # output lengths kept for the next candidate's order
    engine.reset()
    assert all(float(t.abs().sum()) == 0.0 for t in engine.cache.keys.values())
