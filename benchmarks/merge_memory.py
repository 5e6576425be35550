"""Peak memory of `merge_to_dir` on three ~1.1B-parameter bf16 Llama models (TinyLlama shape).

Builds a random base and two fine-tunes (base + noise) under a temp dir in /tmp, tensor by
tensor (the builder holds one tensor at a time), then runs each merge in a fresh child process
that reports its RSS after imports (baseline) and its peak RSS (ru_maxrss). Prints both figures
against the acceptance bound: baseline + 1.5 x one source model. Deletes the models at the end.

    python benchmarks/merge_memory.py [--methods dare_ties,ties,linear] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# TinyLlama-1.1B shape.
SHAPE = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4)


def _tensor_specs() -> list[tuple[str, tuple[int, ...]]]:
    h, i, v, n = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"], SHAPE["num_hidden_layers"]
    kv = h // SHAPE["num_attention_heads"] * SHAPE["num_key_value_heads"]
    specs = [("model.embed_tokens.weight", (v, h))]
    for layer in range(n):
        p = f"model.layers.{layer}."
        specs += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
        ]
    specs += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return specs


def build_model(out: Path, index: int) -> None:
    """Write model `index` (0 = base, k > 0 = base + 0.002 * noise_k), one tensor at a time."""
    import torch
    from transformers import LlamaConfig

    from evomerge_core.io.model_files import PlannedTensor, ShardedWriter

    out.mkdir(parents=True)
    specs = _tensor_specs()
    writer = ShardedWriter(out, [PlannedTensor(n, torch.bfloat16, s) for n, s in specs], shard_size=1 * 10**9)
    for t_idx, (name, shape) in enumerate(specs):
        gen = torch.Generator().manual_seed(1000 + t_idx)
        tensor = torch.randn(shape, generator=gen).mul_(0.02)
        if index:
            noise = torch.randn(shape, generator=torch.Generator().manual_seed(10**6 * index + t_idx))
            tensor.add_(noise, alpha=0.002)
            del noise
        writer.write(name, tensor.to(torch.bfloat16))
        del tensor
    writer.close()
    config = LlamaConfig(**SHAPE, tie_word_embeddings=False, dtype="bfloat16").to_dict()
    config["architectures"] = ["LlamaForCausalLM"]  # mergekit needs it
    (out / "config.json").write_text(json.dumps(config, indent=2))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child_merge(root: Path, method: str, out: Path) -> None:
    """Run one merge in this (fresh) process and print a JSON line with the memory figures."""
    import torch

    from evomerge_core.merge.engine import merge_to_dir
    from evomerge_core.merge.recipe import MergeRecipe

    torch.set_num_threads(2)
    baseline = _rss_bytes()
    names = {"base": str(root / "base"), "m1": str(root / "m1"), "m2": str(root / "m2")}
    if method == "linear":
        recipe = {"merge_method": "linear", "models": [{"model": names[k], "parameters": {"weight": 1.0}} for k in names]}
    else:
        params = {} if method == "task_arithmetic" else {"density": 0.5}
        recipe = {
            "merge_method": method,
            "base_model": names["base"],
            "models": [{"model": names[k], "parameters": {"weight": w, **params}} for k, w in (("m1", 0.6), ("m2", 0.7))],
        }
    start = time.perf_counter()
    merge_to_dir(MergeRecipe.model_validate(recipe), {v: Path(v) for v in names.values()}, out, progress=False)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"method": method, "baseline_rss": baseline, "peak_rss": peak, "seconds": seconds}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="dare_ties,ties,linear")
    parser.add_argument("--keep", type=Path, default=None, help="reuse/keep models in this dir instead of a temp dir")
    parser.add_argument("--_child", nargs=3, metavar=("ROOT", "METHOD", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        child_merge(Path(args._child[0]), args._child[1], Path(args._child[2]))
        return 0
    root = args.keep or Path(tempfile.mkdtemp(prefix="evomerge-bench-", dir="/tmp"))
    try:
        for i, name in enumerate(("base", "m1", "m2")):
            if not (root / name / "config.json").exists():
                t = time.perf_counter()
                subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                                "from merge_memory import build_model; from pathlib import Path; "
                                f"build_model(Path({str(root / name)!r}), {i})"], check=True)
                print(f"built {name} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        model_bytes = sum(f.stat().st_size for f in (root / "base").glob("*.safetensors"))
        n_params = sum(int(__import__("math").prod(s)) for _, s in _tensor_specs())
        print(f"source model: {n_params / 1e9:.3f} B parameters, {model_bytes / 2**30:.2f} GiB bf16 safetensors")
        print(f"{'method':<16}{'seconds':>9}{'baseline RSS':>15}{'peak RSS':>11}{'bound':>9}{'peak - baseline':>17}  ok")
        ok_all = True
        for method in args.methods.split(","):
            out = root / f"out-{method}"
            shutil.rmtree(out, ignore_errors=True)
            res = subprocess.run([sys.executable, __file__, "--_child", str(root), method, str(out)], check=True, capture_output=True, text=True)
            rec = json.loads(res.stdout.strip().splitlines()[-1])
            bound = rec["baseline_rss"] + 1.5 * model_bytes
            ok = rec["peak_rss"] <= bound
            ok_all &= ok
            gib = 2**30
            print(f"{method:<16}{rec['seconds']:>9.1f}{rec['baseline_rss'] / gib:>12.2f} GiB{rec['peak_rss'] / gib:>7.2f} GiB"
                  f"{bound / gib:>6.2f} GiB{(rec['peak_rss'] - rec['baseline_rss']) / gib:>13.2f} GiB  {'yes' if ok else 'NO'}")
            shutil.rmtree(out, ignore_errors=True)
        return 0 if ok_all else 1
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
