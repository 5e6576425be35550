"""The engine on CUDA: token-for-token parity with HF `generate` on tiny float32 models of five
families with CUDA graphs on, and graphs that stay valid (reused, not re-captured) when another
model's weights are copied into the same parameters. Skipped without a GPU; also runs as a script
(``python tests/core/test_engine_gpu.py``) on a device machine that has no pytest."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine_models import CAPS, EOS, FAMILIES, PAD, PROMPTS, hf_reference, make_family_model  # noqa: E402
from tiny_models import save_tiny_tokenizer  # noqa: E402

from evomerge_core.generation.engine import engine_for, engine_generate  # noqa: E402

try:
    import pytest
except ImportError:  # a device machine without pytest: run as a script
    pytest = None
else:
    pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def check_family(family: str, tokenizer) -> None:
    model = make_family_model(family, seed=0).to("cuda")
    other = make_family_model(family, seed=7).to("cuda")
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    got, _ = engine_generate(model, tokenizer, PROMPTS, encoded, caps=CAPS, stop_strings=(), batch_size=4,
                             pad_id=PAD, eos_id=EOS)
    engine = engine_for(model)
    assert engine.use_graphs and engine.last_stats["graphs"] >= 1, f"{family}: no CUDA graph was used"
    assert got == hf_reference(model, encoded, CAPS), f"{family}: engine differs from generate"
    with torch.inference_mode():
        for p, q in zip(model.parameters(), other.parameters()):
            p.copy_(q)  # an in-place merge: same storage, so the captured graphs read the new weights
    graphs = dict(engine._graphs)
    swapped, _ = engine_generate(model, tokenizer, PROMPTS, encoded, caps=CAPS, stop_strings=(), batch_size=4,
                                 pad_id=PAD, eos_id=EOS)
    assert swapped == hf_reference(other, encoded, CAPS), f"{family}: after the swap, engine differs from generate"
    assert all(engine._graphs[w] is g for w, g in graphs.items()), f"{family}: graphs were re-captured"


def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(save_tiny_tokenizer(Path(tempfile.mkdtemp()) / "tok"))


def test_engine_on_cuda_with_graphs():
    tok = _tokenizer()
    for family in FAMILIES:
        check_family(family, tok)


if __name__ == "__main__":
    if not torch.cuda.is_available():
        print("error: no CUDA device", file=sys.stderr)
        sys.exit(2)
    tok = _tokenizer()
    for fam in FAMILIES:
        check_family(fam, tok)
        print(f"engine on CUDA, {fam}: parity with generate and graphs valid after a weight swap", flush=True)
