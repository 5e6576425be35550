"""Generation speed for fitness evaluation: evomerge's engine against today's loop, Hugging Face
`generate` and transformers' continuous batching (`generate_batch`), side by side in one run, with
the fraction of a roofline measured on the same device.

Random-weight bf16 models of a 1B shape (TinyLlama: hidden 2048, 22 layers, 32/4 heads, MLP 5632)
or a 7B shape (Mistral: hidden 4096, 32 layers, 32/8 heads, MLP 14336), vocabulary 32000.
Prompts of 100-400 tokens. Random weights never stop on their own, so every tool gets the same
forced output lengths: a forward hook replaces the logits by a one-hot "count-down" (each prompt
ends with token c_k, c_j is followed by c_(j-1), c_0 by EOS), so item i emits exactly n_i tokens
including EOS, n_i drawn from a seeded log-normal (median 300, capped at 1024). The full model
still runs every step; only the argmax is decided. Every tool's token counts are checked.

Roofline: measured copy bandwidth and bf16 matmul rate; the ideal time of the workload is the
larger of (all FLOPs: 2 x parameters x tokens + attention) / matmul rate and (weights read once
per decode step at the largest batch + every generated token's KV reads) / bandwidth.

    python benchmarks/generation_speed.py --shape 1b --items 256 --slots 256 --json out.json
    python benchmarks/generation_speed.py --tiny     # CPU smoke run of the script (not a measurement)
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

SHAPES = {
    "1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
               intermediate_size=5632, vocab_size=32000, family="llama"),
    "7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336, vocab_size=32000, family="mistral"),
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=256, vocab_size=2048, family="llama"),
}
EOS, PAD = 2, 0


def build_tokenizer(vocab: int):
    """A word-level tokenizer: token i is the word ``w{i}`` (no model files needed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for i in range(len(words), vocab):
        words[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def build_model(shape: str, device: str, dtype):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

    spec = dict(SHAPES[shape])
    family = spec.pop("family")
    cls = MistralConfig if family == "mistral" else LlamaConfig
    cfg = cls(**spec, max_position_embeddings=4096, bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD,
              tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


class CountDown:
    """The forward hook that forces output lengths (see module docstring)."""

    def __init__(self, vocab: int, cap: int, device):
        import torch

        self.first = vocab - cap - 1  # c_j = first + j
        table = torch.full((vocab,), EOS, dtype=torch.long)
        table[self.first + 1: self.first + cap + 1] = torch.arange(self.first, self.first + cap)
        table[self.first] = EOS
        self.table = table.to(device)

    def token(self, n_out: int) -> int:
        """The last prompt token that makes the model emit n_out tokens (EOS included)."""
        return self.first + n_out - 1

    def __call__(self, module, args, kwargs, output):
        ids = kwargs.get("input_ids", args[0] if args else None)
        logits = output.logits
        keep = kwargs.get("logits_to_keep", 0)
        if logits.shape[-2] == ids.shape[-1]:
            src = ids
        elif hasattr(keep, "shape") and keep.numel() == logits.shape[-2]:
            src = ids[..., keep]
        else:
            src = ids[..., -logits.shape[-2]:]
        logits.zero_().scatter_(-1, self.table[src][..., None], 1.0)
        return output


def draw_items(n: int, *, seed: int, vocab: int, cap: int, median: int, prompt_range, countdown: CountDown):
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        n_out = max(2, min(cap, int(round(rng.lognormvariate(math.log(median), 0.6)))))
        plen = rng.randint(*prompt_range)
        ids = [rng.randrange(4, countdown.first) for _ in range(plen - 1)] + [countdown.token(n_out)]
        items.append((ids, n_out))
    return items


def measure_device(device: str, dtype, sync) -> dict:
    """Copy bandwidth (bytes/s, read + write) and matmul rate (FLOP/s) of the device."""
    import torch

    n = (1 << 28) if device != "cpu" else (1 << 24)
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    sync()
    t = time.perf_counter()
    for _ in range(5):
        b.copy_(a)
    sync()
    bw = 2 * n * 5 / (time.perf_counter() - t)
    k = 8192 if device != "cpu" else 512
    x = torch.randn(k, k, device=device, dtype=dtype)
    y = x @ x
    sync()
    t = time.perf_counter()
    for _ in range(5):
        y = x @ x
    sync()
    del y
    return {"bandwidth_Bps": bw, "matmul_flops": 2 * k ** 3 * 5 / (time.perf_counter() - t)}


def roofline_seconds(model, items, slots: int, hw: dict) -> float:
    """Ideal seconds of the workload on this device (see module docstring)."""
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())
    wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    head = cfg.hidden_size // cfg.num_attention_heads
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head * 2  # K and V, bf16
    prompt = sum(len(ids) for ids, _ in items)
    gen = sum(n for _, n in items)
    ctx = sum(len(ids) * n + n * (n - 1) // 2 for ids, n in items)  # keys read by generated tokens
    flops = 2 * params * (prompt + gen) + 4 * cfg.num_hidden_layers * cfg.hidden_size * ctx
    steps = math.ceil(gen / max(1, min(slots, len(items))))
    bytes_ = steps * wbytes + ctx * kv_per_token
    return max(flops / hw["matmul_flops"], bytes_ / hw["bandwidth_Bps"])


def run_tool(name: str, model, tok, items, args, sync) -> dict:
    import torch

    from evomerge_core.generation.hf_loop import greedy_generate

    prompts = [" ".join(f"w{i}" for i in ids) for ids, _ in items]
    want = [n for _, n in items]
    counts: list[int] = []
    sync()
    t = time.perf_counter()
    if name in ("engine", "loop"):
        stats: dict = {}
        greedy_generate(model, tok, prompts, max_new_tokens=args.cap, stop_strings=(), stats=stats,
                        batch_size=args.slots if name == "engine" else args.batch_size,
                        backend="engine" if name == "engine" else "hf")
        counts = stats["row_tokens"]
        if name == "engine":  # free its KV slots for the next tool
            from evomerge_core.generation import engine as engine_pkg

            engine_pkg._ENGINES.pop(model, None)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    elif name == "generate":
        order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))
        counts = [0] * len(items)
        for s in range(0, len(order), args.batch_size):
            batch = order[s: s + args.batch_size]
            width = max(len(items[i][0]) for i in batch)
            ids = torch.full((len(batch), width), PAD, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, i in enumerate(batch):
                ids[r, width - len(items[i][0]):] = torch.tensor(items[i][0])
                mask[r, width - len(items[i][0]):] = 1
            with torch.inference_mode():
                out = model.generate(ids.to(model.device), attention_mask=mask.to(model.device), do_sample=False,
                                     max_new_tokens=args.cap, eos_token_id=EOS, pad_token_id=PAD)
            for r, i in enumerate(batch):
                row = out[r, width:].tolist()
                counts[i] = row.index(EOS) + 1 if EOS in row else len(row)
    elif name == "generate_batch":
        from transformers import GenerationConfig

        cfg = GenerationConfig(max_new_tokens=args.cap, do_sample=False, eos_token_id=EOS, pad_token_id=PAD)
        with torch.inference_mode():
            res = model.generate_batch([ids for ids, _ in items], generation_config=cfg, progress_bar=False)
        by_prompt = {tuple(r.prompt_ids): len(r.generated_tokens) for r in res.values()}
        counts = [by_prompt.get(tuple(ids), -1) for ids, _ in items]
    sync()
    seconds = time.perf_counter() - t
    gen = sum(counts)
    return {"tool": name, "seconds": seconds, "generated_tokens": gen, "tokens_per_s": gen / seconds,
            "items_per_s": len(items) / seconds, "lengths_match": counts == want,
            "mismatched_items": sum(a != b for a, b in zip(counts, want))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["1b", "7b"], default="1b")
    parser.add_argument("--items", type=int, default=256)
    parser.add_argument("--slots", type=int, default=256, help="engine slots (concurrent sequences)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch of the loop and of generate")
    parser.add_argument("--cap", type=int, default=1024)
    parser.add_argument("--median", type=int, default=300)
    parser.add_argument("--tools", default="engine,generate_batch,loop,generate")
    parser.add_argument("--baseline-items", type=int, default=0,
                        help="run the loop and generate on the first N items only (0: all; they are slow)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny model, short prompts and answers")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import torch

    shape, prompt_range = args.shape, (100, 400)
    if args.tiny:
        shape, prompt_range, args.device = "tiny", (10, 40), "cpu"
        args.items, args.cap, args.median, args.slots, args.batch_size = min(args.items, 24), 64, 20, 8, 8
        torch.set_num_threads(1)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA device; run with --tiny for a CPU smoke run", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if args.device != "cpu" else torch.float32
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    tok = build_tokenizer(SHAPES[shape]["vocab_size"])
    model = build_model(shape, args.device, dtype)
    countdown = CountDown(SHAPES[shape]["vocab_size"], args.cap, args.device)
    model.register_forward_hook(countdown, with_kwargs=True)
    items = draw_items(args.items, seed=args.seed, vocab=SHAPES[shape]["vocab_size"], cap=args.cap,
                       median=args.median, prompt_range=prompt_range, countdown=countdown)
    hw = measure_device(args.device, dtype, sync)
    ideal = roofline_seconds(model, items, args.slots, hw)
    lengths = sorted(n for _, n in items)
    print(f"{name}: {shape}-shaped, {len(items)} items, prompts {prompt_range}, output median "
          f"{lengths[len(lengths) // 2]} (cap {args.cap}), {sum(lengths)} tokens; bandwidth "
          f"{hw['bandwidth_Bps'] / 1e9:.0f} GB/s, matmul {hw['matmul_flops'] / 1e12:.1f} TFLOP/s, roofline {ideal:.2f} s",
          flush=True)
    results = {"device": name, "shape": shape, "items": len(items), "slots": args.slots, "batch_size": args.batch_size,
               "cap": args.cap, "hardware": hw, "roofline_seconds": ideal, "tools": [], "torch": torch.__version__,
               "tiny_smoke": args.tiny}
    for tool in args.tools.split(","):
        subset = items[: args.baseline_items] if args.baseline_items and tool in ("loop", "generate") else items
        try:
            r = run_tool(tool, model, tok, subset, args, sync)
        except Exception as exc:  # one tool failing must not hide the others' figures
            r = {"tool": tool, "error": f"{type(exc).__name__}: {exc}"[:300]}
            print(f"{tool:<15} error: {r['error']}", flush=True)
        else:
            r["items"] = len(subset)
            r["roofline_fraction"] = (ideal if subset is items else roofline_seconds(model, subset, args.slots, hw)) / r["seconds"]
            print(f"{tool:<15} {len(subset):5d} items {r['seconds']:8.2f} s {r['tokens_per_s']:10.0f} tok/s {r['items_per_s']:8.2f} items/s "
                  f"{100 * r['roofline_fraction']:5.1f}% of roofline  lengths match: {r['lengths_match']}", flush=True)
        results["tools"].append(r)
        if args.json:  # after every tool, so a timeout keeps what was measured
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2))
    return 0 if all(r.get("lengths_match") for r in results["tools"] if "error" not in r) else 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
