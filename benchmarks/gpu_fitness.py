"""Fitness throughput of a 1B-shaped model on a GPU: evomerge's generation loop vs Hugging Face
`generate` (what lm-eval's HF backend calls) on the same batches, prompts and greedy settings.

A TinyLlama-shaped random Llama (hidden 2048, 22 layers, 32 heads, 4 KV heads, MLP 5632, vocab
32000) in bf16 on the device, a 32000-word offline tokenizer, N prompts of 24-160 words. Both
tools sort prompts by length, left-pad, use the KV cache and batch size B, and stop a row at
the stop string or after max_new_tokens; a random model rarely emits the stop string, so rows
mostly run the full length (a pure throughput measurement). Outputs are compared item by item.

    python benchmarks/gpu_fitness.py [--items 512] [--batch-size 64] [--max-new-tokens 32] [--json out.json]

`--layers 2 --hidden 256 --device cpu` is a CPU smoke test of the script.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path


def build_tokenizer(vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "\n": 4}
    for i in range(len(words), vocab):
        words[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def stop_criteria(tok, stop: list[str], prompt_width: int, batch: int):
    """lm-eval's `MultiTokenEOSCriteria`: decode the last few new tokens of every row each step."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class MultiTokenStop(StoppingCriteria):
        def __init__(self, sequence: str) -> None:
            self.sequence = sequence
            self.done = [False] * batch
            self.lookback = len(tok.encode(sequence, add_special_tokens=False)) + 2

        def __call__(self, input_ids, scores, **kwargs) -> bool:
            texts = tok.batch_decode(input_ids[:, prompt_width:][:, -self.lookback:])
            for i, done in enumerate(self.done):
                if not done:
                    self.done[i] = self.sequence in texts[i]
            return False not in self.done

    return StoppingCriteriaList([MultiTokenStop(s) for s in stop])


def hf_generate(model, tok, prompts: list[str], *, batch_size: int, max_new_tokens: int, stop: list[str]) -> list[str]:
    """lm-eval's HF `generate_until` in essence: length-sorted left-padded batches, `generate`
    with greedy decoding and stop strings, outputs cut at the first stop string."""
    import torch

    from evomerge_core.generation.hf_loop import truncate_at_stop

    tok.padding_side = "left"
    order = sorted(range(len(prompts)), key=lambda i: -len(tok(prompts[i])["input_ids"]))
    out = [""] * len(prompts)
    for s in range(0, len(order), batch_size):
        idx = order[s: s + batch_size]
        enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        with torch.inference_mode():
            width = enc["input_ids"].shape[1]
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                                 stopping_criteria=stop_criteria(tok, stop, width, len(idx)))
        for row, i in enumerate(idx):
            text = tok.decode(gen[row, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            out[i] = truncate_at_stop(text, stop)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--items", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from evomerge_core.generation.hf_loop import greedy_generate

    from gpu_device import open_device

    opened = open_device(args.device)
    if opened is None:
        return 2
    device, sync, name = opened
    vocab = 32000
    tok = build_tokenizer(vocab)
    config = LlamaConfig(vocab_size=vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                         num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                         num_key_value_heads=max(1, args.hidden // 512), pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16 if device.type == "cuda" else torch.float32).eval()
    params = sum(p.numel() for p in model.parameters())
    rng = random.Random(0)
    prompts = [" ".join(f"w{rng.randrange(5, vocab)}" for _ in range(rng.randint(24, 160))) for _ in range(args.items)]
    settings = dict(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    stop = ["\n"]
    runs = {
        "evomerge greedy_generate": lambda ps: greedy_generate(model, tok, ps, stop_strings=stop, **settings),
        "HF generate (lm-eval's loop)": lambda ps: hf_generate(model, tok, ps, stop=stop, **settings),
    }
    results = {"device": name, "parameters": params, "items": args.items, **settings, "tools": {}}
    outputs = {}
    for label, fn in runs.items():  # warm-up on every prompt (the first pass over new shapes is slow)
        fn(prompts)
    best: dict[str, float] = {}
    for rnd in range(2):  # alternating, best of two per tool
        for label, fn in runs.items():
            sync()
            t = time.perf_counter()
            outputs[label] = fn(prompts)
            sync()
            best[label] = min(best.get(label, float("inf")), time.perf_counter() - t)
    for label, seconds in best.items():
        results["tools"][label] = {"seconds": seconds, "items_per_second": args.items / seconds}
        print(f"{name}: {label:<30} {args.items / seconds:8.1f} items/s ({seconds:.2f} s, {params / 1e9:.2f} B params)",
              flush=True)
    # Where the time goes: the same runs again with every model call timed (synchronised).
    import functools

    plain_forward = model.forward
    spent = {"forward": 0.0, "calls": 0}

    @functools.wraps(plain_forward)
    def timed_forward(*a, **kw):
        sync()
        t0 = time.perf_counter()
        r = plain_forward(*a, **kw)
        sync()
        spent["forward"] += time.perf_counter() - t0
        spent["calls"] += 1
        return r

    model.forward = timed_forward
    for label, fn in runs.items():
        spent.update(forward=0.0, calls=0)
        t = time.perf_counter()
        fn(prompts)
        sync()
        total = time.perf_counter() - t
        results["tools"][label].update(profiled_seconds=total, forward_seconds=spent["forward"], forward_calls=spent["calls"])
        print(f"  {label}: forward {spent['forward']:.2f} s in {spent['calls']} calls, the rest {total - spent['forward']:.2f} s",
              flush=True)
    model.forward = plain_forward
    a, b = outputs.values()
    results["outputs_differ"] = sum(x != y for x, y in zip(a, b))
    results["mean_output_words"] = sum(len(x.split()) for x in a) / len(a)
    print(f"outputs differing: {results['outputs_differ']} / {args.items}; mean output length "
          f"{results['mean_output_words']:.1f} words", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
