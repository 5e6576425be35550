"""Fitness throughput: evomerge vs lm-evaluation-harness (HF backend) on the same work.

The same model, prompts and greedy settings (`generate_until`: max_new_tokens, stop strings,
no sampling, the same batch size), each tool in a fresh process with the same torch thread
count, model load excluded:

1. per-candidate fitness evaluation (what an evolutionary run repeats for every candidate, the
   model already in memory): evomerge's `Fitness.score` (items loaded and prompts rendered
   once, `exact_match` scorer) vs lm-eval's `simple_evaluate` on the same model wrapped in
   `HFLM` with a `generate_until` task of the same items and an `exact_match` metric (the way
   mergekit-evolve scores candidates); the mean over 5 candidates after one warm-up;
2. the generation loop alone: `evomerge_core.generation.hf_loop.greedy_generate` vs
   `HFLM.generate_until` on the same requests.

Reported: items per second, both scores and (2) how many outputs differ.

Models: the toy world's micro-zoo "lang" model on the UNION test split (400 items, the demo's
settings: max_new_tokens 8, stop "\\n"); and a locally built random Llama ("wide", hidden
512, 8 layers, same tokenizer and prompts, max_new_tokens 16) where the forward pass costs
more than the loop around it (its outputs are noise: score 0 for both).

lm-eval lives in its own virtual environment (it pins its own dependencies); pass its python:

    python benchmarks/fitness_throughput.py --lmeval-python /work/lmeval-venv/bin/python
        [--threads 1] [--batch-size 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def lmeval_child(spec_file: str, out_file: str) -> None:
    """Runs under lm-eval's interpreter (no evomerge imports): generate_until over the prompts."""
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    spec = json.loads(Path(spec_file).read_text())
    torch.set_num_threads(spec["threads"])
    t = time.perf_counter()
    lm = HFLM(pretrained=spec["model"], batch_size=spec["batch_size"], device="cpu", dtype="float32")
    load = time.perf_counter() - t
    gen_kwargs = {"until": spec["stop_strings"], "max_gen_toks": spec["max_new_tokens"], "do_sample": False}
    requests = [Instance(request_type="generate_until", doc={}, arguments=(p, dict(gen_kwargs)), idx=i)
                for i, p in enumerate(spec["prompts"])]
    lm.generate_until(requests[: spec["batch_size"]], disable_tqdm=True)  # warm-up
    t = time.perf_counter()
    outputs = lm.generate_until(requests, disable_tqdm=True)
    seconds = time.perf_counter() - t
    import lm_eval
    import transformers
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=spec["task_dir"])
    candidate_seconds, scores = [], []
    for i in range(spec["candidates"] + 1):
        t = time.perf_counter()
        res = simple_evaluate(model=lm, tasks=[spec["task"]], task_manager=manager, log_samples=False, verbosity="ERROR")
        if i:  # the first call is a warm-up
            candidate_seconds.append(time.perf_counter() - t)
            scores.append(float(res["results"][spec["task"]]["exact_match,none"]))
    Path(out_file).write_text(json.dumps({"outputs": outputs, "seconds": seconds, "load_seconds": load,
                                          "candidate_seconds": candidate_seconds, "candidate_scores": scores,
                                          "versions": {"lm_eval": lm_eval.__version__, "transformers": transformers.__version__,
                                                       "torch": torch.__version__}}))


TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: {until}
  max_gen_toks: {max_new}
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def evomerge_child(spec_file: str, out_file: str) -> None:
    """greedy_generate over the prompts in this (fresh) process."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge_core.generation.hf_loop import greedy_generate

    spec = json.loads(Path(spec_file).read_text())
    torch.set_num_threads(spec["threads"])
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(spec["model"])
    load = time.perf_counter() - t
    kw = dict(max_new_tokens=spec["max_new_tokens"], stop_strings=spec["stop_strings"], batch_size=spec["batch_size"])
    greedy_generate(model, tok, spec["prompts"][: spec["batch_size"]], **kw)  # warm-up
    t = time.perf_counter()
    outputs = greedy_generate(model, tok, spec["prompts"], **kw)
    seconds = time.perf_counter() - t
    from evomerge_core.config.schema import FitnessConfig
    from evomerge_core.fitness.evaluator import Fitness

    fitness = Fitness(FitnessConfig.model_validate({
        "dataset": {"path": spec["data"], "columns": {"prompt": "prompt", "answer": "answer"}}, "scorer": "exact_match",
        "accuracy_scorer": "none", "max_new_tokens": spec["max_new_tokens"], "stop_strings": spec["stop_strings"],
        "batch_size": spec["batch_size"]}))
    candidate_seconds, scores = [], []
    for i in range(spec["candidates"] + 1):
        t = time.perf_counter()
        res = fitness.score(model, tok)
        if i:  # the first call is a warm-up
            candidate_seconds.append(time.perf_counter() - t)
            scores.append(float(res["fitness"]))
    Path(out_file).write_text(json.dumps({"outputs": outputs, "seconds": seconds, "load_seconds": load,
                                          "candidate_seconds": candidate_seconds, "candidate_scores": scores}))


def build_wide_model(out: Path, tokenizer_dir: Path) -> Path:
    """A random Llama (hidden 512, 8 layers) with the toy world's tokenizer, seeded."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    base = json.loads((tokenizer_dir / "config.json").read_text())
    config = LlamaConfig(vocab_size=base["vocab_size"], hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=128,
                         bos_token_id=base.get("bos_token_id"), eos_token_id=base.get("eos_token_id"),
                         pad_token_id=base.get("pad_token_id"), tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, out / name)
    return out


def run_child(python: str, mode: str, spec: dict[str, Any], tmp: Path) -> dict[str, Any]:
    spec_file, out_file = tmp / f"{mode}-spec.json", tmp / f"{mode}-out.json"
    spec_file.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([python, __file__, f"--_{mode}", str(spec_file), str(out_file)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(out_file.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lmeval-python", default="/work/lmeval-venv/bin/python", help="python of a venv with lm-eval installed")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--candidates", type=int, default=5)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--_lmeval", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--_evomerge", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._lmeval:
        lmeval_child(*args._lmeval)
        return 0
    if args._evomerge:
        evomerge_child(*args._evomerge)
        return 0
    if not Path(args.lmeval_python).exists():
        parser.error(f"no python at {args.lmeval_python}; create a venv with lm-eval (see docs/benchmarks.md) or pass --lmeval-python")

    from evomerge_core.toyworld.evaluate import MAX_NEW_TOKENS, STOP_STRINGS
    from evomerge_core.toyworld.zoo import build_zoo

    zoo = build_zoo("micro", progress=False)
    data = Path(zoo.tasks["union"]["test"])
    rows = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    if zoo.prompt_template != "{prompt}":
        parser.error("the toy world's prompt template changed; update the lm-eval task (doc_to_text)")
    prompts = [r["prompt"] for r in rows]
    answers = [r["answer"] for r in rows]
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "threads": args.threads, "batch_size": args.batch_size,
                               "items": len(prompts), "candidates": args.candidates, "load_average_start": os.getloadavg(), "models": {}}
    ok = True
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        models = {
            "toy lang (micro zoo)": (str(zoo.models["lang"]), MAX_NEW_TOKENS),
            "wide random Llama": (str(build_wide_model(tmp / "wide", Path(zoo.models["lang"]))), 16),
        }
        print(f"{len(prompts)} items, batch size {args.batch_size}, {args.threads} torch thread(s), stop {list(STOP_STRINGS)!r}, "
              f"{args.candidates} candidates")
        print(f"{'model':<22}{'what':<22}{'evomerge it/s':>14}{'lm-eval it/s':>13}{'ratio':>8}{'score evo':>10}{'score lm-eval':>14}{'differ':>8}")
        for n, (label, (path, max_new)) in enumerate(models.items()):
            task = f"evomerge_bench_{n}"
            task_dir = tmp / f"tasks{n}"
            task_dir.mkdir()
            (task_dir / f"{task}.yaml").write_text(TASK_YAML.format(task=task, data=data, until=json.dumps(list(STOP_STRINGS)), max_new=max_new))
            spec = {"model": path, "prompts": prompts, "max_new_tokens": max_new, "stop_strings": list(STOP_STRINGS),
                    "batch_size": args.batch_size, "threads": args.threads, "data": str(data), "task_dir": str(task_dir),
                    "task": task, "candidates": args.candidates}
            ours = run_child(sys.executable, "evomerge", spec, tmp)
            theirs = run_child(args.lmeval_python, "lmeval", spec, tmp)
            rec: dict[str, Any] = {"max_new_tokens": max_new, "lmeval_versions": theirs.get("versions")}
            cand = {k: len(prompts) * len(r["candidate_seconds"]) / sum(r["candidate_seconds"]) for k, r in (("evomerge", ours), ("lmeval", theirs))}
            cand_score = {k: r["candidate_scores"][-1] for k, r in (("evomerge", ours), ("lmeval", theirs))}
            rec["per_candidate"] = {"items_per_second": cand, "ratio": cand["evomerge"] / cand["lmeval"], "score": cand_score,
                                    "seconds": {"evomerge": ours["candidate_seconds"], "lmeval": theirs["candidate_seconds"]}}
            gen = {k: len(prompts) / r["seconds"] for k, r in (("evomerge", ours), ("lmeval", theirs))}
            gen_score = {k: sum(o.strip() == a.strip() for o, a in zip(r["outputs"], answers)) / len(answers)
                         for k, r in (("evomerge", ours), ("lmeval", theirs))}
            differ = sum(a != b for a, b in zip(ours["outputs"], theirs["outputs"]))
            rec["generation"] = {"items_per_second": gen, "ratio": gen["evomerge"] / gen["lmeval"], "score": gen_score,
                                 "outputs_differ": differ, "examples": [{"prompt": p, "evomerge": a, "lmeval": b} for p, a, b in
                                                                        list(zip(prompts, ours["outputs"], theirs["outputs"]))[:5]]}
            results["models"][label] = rec
            ok &= rec["per_candidate"]["ratio"] >= 2 and abs(cand_score["evomerge"] - cand_score["lmeval"]) < 1e-9
            for what, r, d in (("fitness per candidate", rec["per_candidate"], "-"), ("generation loop", rec["generation"], differ)):
                ips = r["items_per_second"]
                print(f"{label:<22}{what:<22}{ips['evomerge']:>14.1f}{ips['lmeval']:>13.1f}{r['ratio']:>7.2f}x{r['score']['evomerge']:>10.3f}"
                      f"{r['score']['lmeval']:>14.3f}{d:>8}", flush=True)
        results["load_average_end"] = os.getloadavg()
        print(f"load average {results['load_average_start'][0]:.2f} -> {results['load_average_end'][0]:.2f}; "
              f"lm-eval {results['models'][next(iter(models))]['lmeval_versions']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
