"""The engine on CUDA (run by benchmarks/device/run_engine_bench.sh; skipped without a GPU):
token-for-token parity with HF `generate` on tiny float32 models with CUDA graphs on, and graphs
that stay valid when another model's weights are copied into the same parameters."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine_models import make_family_model  # noqa: E402
from test_engine_parity import CAPS, EOS, PAD, PROMPTS, hf_reference, tokenizer  # noqa: E402,F401

from evomerge_core.engine import engine_for, engine_generate  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma2", "gemma3"])
def test_engine_on_cuda_with_graphs(family, tokenizer):  # noqa: F811
    model = make_family_model(family, seed=0).to("cuda")
    other = make_family_model(family, seed=7).to("cuda")
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    got, _ = engine_generate(model, tokenizer, PROMPTS, encoded, caps=CAPS, stop_strings=(), batch_size=4,
                             pad_id=PAD, eos_id=EOS)
    engine = engine_for(model)
    assert engine.use_graphs and engine.last_stats["graphs"] >= 1
    assert got == hf_reference(model, encoded, CAPS)
    with torch.inference_mode():
        for p, q in zip(model.parameters(), other.parameters()):
            p.copy_(q)  # an in-place merge: same storage, so the captured graphs read the new weights
    graphs = dict(engine._graphs)
    swapped, _ = engine_generate(model, tokenizer, PROMPTS, encoded, caps=CAPS, stop_strings=(), batch_size=4,
                                 pad_id=PAD, eos_id=EOS)
    assert swapped == hf_reference(other, encoded, CAPS)
    assert all(engine._graphs[w] is g for w, g in graphs.items())  # reused, not re-captured
