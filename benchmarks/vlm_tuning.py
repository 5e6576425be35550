"""Compare the toy EvoVLM search settings on JA *validation* (never test): run each variant's
evolve flow on the VLM toy world for the given seeds and print the JA/EN validation ROUGE-L of
its best model (results in docs/vlm.md, "How the search settings were chosen").

    python benchmarks/vlm_tuning.py --seeds 0 1 2 VARIANT [VARIANT ...]
    python benchmarks/vlm_tuning.py --list
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from evomerge.flows.evolve import evolve
from evomerge_core.runs.store import RunStore
from evomerge_core.toyworld.vlm import build_vlm_zoo, score_vlm_dir, vlm_search_config

# name -> (method, evaluations, space overrides, fitness items)
VARIANTS: dict[str, dict[str, Any]] = {
    "dare_ties_48": {"method": "dare_ties", "evals": 48},
    "dare_ties_96": {"method": "dare_ties", "evals": 96},
    "dare_ties_160": {"method": "dare_ties", "evals": 160},
    "dare_ties_x0_48": {"method": "dare_ties", "evals": 48, "space": {"x0": {"density": 0.8, "weight": 0.8}}},
    "dare_ties_x0_96": {"method": "dare_ties", "evals": 96, "space": {"x0": {"density": 0.8, "weight": 0.8}}},
    "ties_24": {"method": "ties", "evals": 24},
    "ties_48": {"method": "ties", "evals": 48},
    "ties_48_f64": {"method": "ties", "evals": 48, "items": 64},
    "ties_96": {"method": "ties", "evals": 96},
    "ties_144": {"method": "ties", "evals": 144},
    "ta_48": {"method": "task_arithmetic", "evals": 48},
    "ta_96": {"method": "task_arithmetic", "evals": 96},
    "ta_w15_48": {"method": "task_arithmetic", "evals": 48, "space": {"bounds": {"weight": [0.0, 1.5]}, "x0": 0.75}},
    "ta_w15_96": {"method": "task_arithmetic", "evals": 96, "space": {"bounds": {"weight": [0.0, 1.5]}, "x0": 0.75}},
    "dare_ties_96_f64": {"method": "dare_ties", "evals": 96, "items": 64},
}


def run_variant(zoo: Any, name: str, seed: int, work: Path) -> dict[str, Any]:
    """One search (selection on JA train only); the best model scored on JA/EN validation."""
    v = VARIANTS[name]
    storage = (work / "runs").as_uri()
    run_key = f"{name}-seed{seed}"
    cfg = vlm_search_config(zoo, seed=seed, evaluations=v["evals"], storage=storage, run_key=run_key,
                            method=v["method"], fitness_items=v.get("items", 160))
    cfg["fitness"].pop("test")  # tuning never looks at test
    cfg["space"]["ps"].update(v.get("space", {}))
    if v["method"] == "task_arithmetic":
        cfg["space"]["ps"]["params"] = ["weight"]
    started = time.perf_counter()
    result = evolve(cfg, resume=False, run_key=run_key)
    seconds = time.perf_counter() - started
    best = work / f"best-{run_key}"
    shutil.rmtree(best, ignore_errors=True)
    RunStore(storage, run_key).get_dir("best", best)
    val = score_vlm_dir(best, zoo, split="validation")
    return {"variant": name, "seed": seed, "fitness": result["best_fitness"], "ja_val": val["ja"], "en_val": val["en"],
            "values": result["best_values"], "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="*")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args()
    if args.list:
        print("\n".join(VARIANTS))
        return
    torch.set_num_threads(1)
    zoo = build_vlm_zoo(progress=False)
    work = Path(tempfile.mkdtemp(prefix="evomerge-vlm-tuning-"))
    try:
        for name in args.variants or list(VARIANTS):
            rows = [run_variant(zoo, name, seed, work) for seed in args.seeds]
            for r in rows:
                values = {k.rsplit("/", 1)[-1]: round(x, 3) for k, x in (r["values"] or {}).items()}
                print(f"RESULT {name} seed {r['seed']}: fitness {r['fitness']:.3f} ja_val {r['ja_val']:.3f} "
                      f"en_val {r['en_val']:.3f} {r['seconds']:.0f}s {values}", flush=True)
            ja = [r["ja_val"] for r in rows]
            print(f"SUMMARY {name}: ja_val mean {sum(ja) / len(ja):.3f} min {min(ja):.3f} "
                  f"seconds/seed {sum(r['seconds'] for r in rows) / len(rows):.0f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
