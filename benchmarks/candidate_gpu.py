"""One whole paper-shaped candidate on a GPU: four 7B-shaped sources (a base and three
fine-tunes), DARE-TIES merged in place into the engine's weights, greedy generation of 1069
prompts with realistic output lengths, scoring; the time split into source transfer, merge,
generation and scoring, for both source residencies:

- ``device``: the sources live on the GPU (only when they fit beside the model and the KV cache);
- ``pinned``: the sources live in pinned host memory and are streamed tensor by tensor on a side
  stream while the merge runs (`evomerge_core.generation.engine.streaming`), the path an 80 GB card takes.

Output lengths are forced as in `generation_speed.py` (count-down hook: log-normal, median 300,
cap 1024). "transfer" is the time to stream every source to the device alone; "merge" is the
in-place merge including its (overlapped) transfers; both are measured.

    python benchmarks/candidate_gpu.py --json out.json [--residency pinned,device] [--items 1069]
    python benchmarks/candidate_gpu.py --tiny      # CPU smoke run of the script (not a measurement)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from generation_speed import SHAPES, CountDown, build_model, build_tokenizer, draw_items  # noqa: E402


def make_sources(model, device: str, residency: str, n_finetunes: int = 3, seed: int = 0):
    """{"base", "ft1".."ftN"} state dicts: the base is the model's current weights, each fine-tune
    the base plus seeded noise (drawn on the device); on the device or in pinned host memory."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    sources: dict[str, dict[str, torch.Tensor]] = {"base": {}}
    sources.update({f"ft{k}": {} for k in range(1, n_finetunes + 1)})
    for name, p in model.state_dict().items():
        base = p.detach()
        for ref in sources:
            t = base if ref == "base" else base + 0.002 * torch.randn(base.shape, generator=gen, device=device,
                                                                      dtype=base.dtype)
            if residency == "device":
                sources[ref][name] = t.clone()
            else:  # straight into page-locked memory on CUDA (no pageable copy first)
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=device != "cpu")
                sources[ref][name] = host.copy_(t)
    return sources


def recipe(n_finetunes: int):
    from evomerge_core.merge.recipe import MergeRecipe

    return MergeRecipe(merge_method="dare_ties", base_model="base", seed=1,
                       models=[{"model": f"ft{k}", "parameters": {"weight": 0.3 + 0.1 * k, "density": 0.5}}
                               for k in range(1, n_finetunes + 1)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["1b", "7b"], default="7b")
    parser.add_argument("--items", type=int, default=1069)
    parser.add_argument("--slots", type=int, default=256)
    parser.add_argument("--cap", type=int, default=1024)
    parser.add_argument("--median", type=int, default=300)
    parser.add_argument("--residency", default="pinned,device")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny model, few short items")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import torch

    from evomerge_core.generation.engine.streaming import stream_sources
    from evomerge_core.fitness.text import answer_number, last_number, numbers_equal
    from evomerge_core.generation.hf_loop import greedy_generate
    from evomerge_core.merge.engine import _merge_planned
    from evomerge_core.merge.params import plan_recipe

    shape, prompt_range = args.shape, (100, 400)
    if args.tiny:
        shape, prompt_range, args.device = "tiny", (10, 40), "cpu"
        args.items, args.cap, args.median, args.slots = min(args.items, 24), 64, 20, 8
        torch.set_num_threads(1)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA device; run with --tiny for a CPU smoke run", file=sys.stderr)
        return 2
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    name = torch.cuda.get_device_name() if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    vocab = SHAPES[shape]["vocab_size"]
    tok = build_tokenizer(vocab)
    model = build_model(shape, args.device, dtype)
    countdown = CountDown(vocab, args.cap, args.device)
    model.register_forward_hook(countdown, with_kwargs=True)
    items = draw_items(args.items, seed=0, vocab=vocab, cap=args.cap, median=args.median, prompt_range=prompt_range,
                       countdown=countdown)
    prompts = [" ".join(f"w{i}" for i in ids) for ids, _ in items]
    answers = [str(n) for _, n in items]
    plan = plan_recipe(recipe(3))
    layers = model.config.num_hidden_layers
    targets = dict(model.state_dict(keep_vars=True))
    results = {"device": name, "shape": shape, "items": len(items), "slots": args.slots, "runs": [],
               "torch": torch.__version__, "tiny_smoke": args.tiny}
    for residency in args.residency.split(","):
        if residency == "device" and cuda:
            need = 4 * sum(t.numel() * t.element_size() for t in targets.values())
            free, _ = torch.cuda.mem_get_info()
            if need > free * 0.8:
                print(f"device residency: 4 sources need {need / 1e9:.0f} GB, {free / 1e9:.0f} GB free: does not fit")
                results["runs"].append({"residency": residency, "skipped": "sources do not fit on the device"})
                continue
        sources = make_sources(model, args.device, residency)
        sync()
        t = time.perf_counter()
        for _, tensors in stream_sources(sources, list(targets), torch.device(args.device)):
            pass  # transfer alone (no merge)
        sync()
        transfer = time.perf_counter() - t if residency == "pinned" else 0.0
        sync()
        t = time.perf_counter()
        stream = stream_sources(sources, list(targets), torch.device(args.device)) if residency == "pinned" else (
            (n, {ref: sd[n] for ref, sd in sources.items()}) for n in targets)
        with torch.inference_mode():
            for tname, tensors in stream:
                _merge_planned(plan, tname, tensors, layers, out=targets[tname].data)
        sync()
        merge = time.perf_counter() - t
        sync()
        t = time.perf_counter()
        stats: dict = {}
        outputs = greedy_generate(model, tok, prompts, max_new_tokens=args.cap, stop_strings=(), batch_size=args.slots,
                                  stats=stats, backend="engine")
        sync()
        generation = time.perf_counter() - t
        t = time.perf_counter()
        correct = sum(numbers_equal(last_number(o), answer_number(a)) for o, a in zip(outputs, answers))
        scoring = time.perf_counter() - t
        lengths_ok = stats["row_tokens"] == [n for _, n in items]
        total = merge + generation + scoring
        run = {"residency": residency, "transfer_alone_s": transfer, "merge_s": merge, "generation_s": generation,
               "scoring_s": scoring, "total_s": total, "merge_fraction": merge / total,
               "generated_tokens": stats["generated_tokens"], "lengths_match": lengths_ok, "correct": correct}
        results["runs"].append(run)
        print(f"{name} {residency:>7}: transfer alone {transfer:6.2f} s | merge (incl. transfers) {merge:6.2f} s | "
              f"generation {generation:7.2f} s ({stats['generated_tokens'] / generation:.0f} tok/s) | scoring "
              f"{scoring:5.2f} s | total {total:7.2f} s, merge {100 * merge / total:.1f}% | lengths match: {lengths_ok}",
              flush=True)
        del sources
        if cuda:
            torch.cuda.empty_cache()
        if args.json:  # after every residency, so a timeout keeps what was measured
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2))
    return 0 if all(r.get("lengths_match", True) for r in results["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
