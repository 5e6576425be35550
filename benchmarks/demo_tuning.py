"""Choose the demo's settings on UNION *validation* (never test).

    python benchmarks/demo_tuning.py [VARIANT ...]        # search settings on the built demo zoo
    python benchmarks/demo_tuning.py zoo VARIANT [EVALS]  # an expert recipe variant (below)

Search variants run the evolve flow on the demo toy world and print train/validation
exact-match accuracy of the best model. Zoo variants retrain some experts from the cached demo
base with another recipe (1 torch thread; `SEEDS=0,1,2` picks the search seeds), score the
sources and the unoptimised merges on validation, then run the demo's PS search on the variant.
Results: docs/demo-tuning.md.
"""
import copy
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from evomerge_core.toyworld import build_zoo, evaluate_exact_match, load_model, load_tokenizer
from evomerge_core.toyworld.demo import baseline_recipes, search_config
from evomerge_core.runs.store import RunStore
from evomerge.flows.evolve import evolve

SEARCH_VARIANTS = {
  "dare144": {},
  "dare288": {"evals": 288},
  "ties144": {"method": "ties"},
  "ties288": {"method": "ties", "evals": 288},
  "dare_lg2_288": {"evals": 288, "lg": 2},
  "dare_em144": {"scorer": "exact_match"},
  "dare_em288": {"scorer": "exact_match", "evals": 288},
  "dare_w2_288": {"evals": 288, "wmax": 2.0},
}


def zoo_variants():
    """Expert recipes tried (name -> {expert: stage}), retrained from the built demo zoo's base;
    measured with the base of commit f7abfbd (the base is unchanged since)."""
    from evomerge_core.toyworld.recipes import _expert

    return {
        "built": {},  # the experts of the demo zoo as built by the current recipe
        "b_hard": {"skill_b": _expert({"skill": 0.8, "translit": 0.2}, 600, 3e-3, seed=4)},
        "b_long": {"skill_b": _expert({"skill": 0.8, "translit": 0.2}, 600, 1e-3, seed=4)},
        "b_2e3": {"skill_b": _expert({"skill": 0.8, "translit": 0.2}, 300, 2e-3, seed=4, schedule="cosine")},
        "lang_hard": {"lang": _expert({"lang": 1.0}, 600, 1e-3, seed=3)},
        "lang2e3": {"lang": _expert({"lang": 1.0}, 300, 2e-3, seed=3, schedule="cosine")},
        "lang_c300": {"lang": _expert({"lang": 1.0}, 300, 1e-3, seed=3)},
        "all_const600": {"skill_a": _expert({"skill": 1.0}, 600, 1e-3, seed=2),
                         "lang": _expert({"lang": 1.0}, 600, 1e-3, seed=3),
                         "skill_b": _expert({"skill": 0.8, "translit": 0.2}, 600, 1e-3, seed=4)},
        "all2e3": {"skill_a": _expert({"skill": 1.0}, 300, 2e-3, seed=2, schedule="cosine"),
                   "lang": _expert({"lang": 1.0}, 300, 2e-3, seed=3, schedule="cosine"),
                   "skill_b": _expert({"skill": 0.8, "translit": 0.2}, 300, 2e-3, seed=4, schedule="cosine")},
    }


def _scores(model_dir, zoo, split="validation"):
    m, t = load_model(model_dir), load_tokenizer(model_dir)
    return {task: round(evaluate_exact_match(m, t, zoo.rows(task, split)), 3) for task in ("union", "skill", "lang")}


def _best(storage, key, out):
    shutil.rmtree(out, ignore_errors=True)
    RunStore(storage, key).get_dir("best", out)
    return out


def search_variants(names):
    zoo = build_zoo("demo", progress=False)
    work = Path(tempfile.mkdtemp(prefix="evomerge-tuning-"))
    storage = (work / "runs").as_uri()
    for name in names:
        v = SEARCH_VARIANTS[name]
        cfg = search_config(zoo, seed=0, evaluations=v.get("evals", 144), storage=storage, run_key=name)
        cfg["space"]["ps"]["method"] = v.get("method", "dare_ties")
        if "lg" in v:
            cfg["space"]["ps"]["granularity"] = {"layer_groups": v["lg"]}
        cfg["fitness"].pop("test")
        if "scorer" in v:
            cfg["fitness"]["scorer"] = v["scorer"]
        if "wmax" in v:
            cfg["space"]["ps"]["bounds"] = {"weight": [0, v["wmax"]], "density": [0, 1]}
        t = time.time()
        res = evolve(cfg, resume=False, run_key=name)
        best = _best(storage, name, work / f"best-{name}")
        val, tr = _scores(best, zoo)["union"], _scores(best, zoo, "train")["union"]
        print(f"RESULT {name}: fitness {res['best_fitness']:.4f} union_train {tr:.3f} union_val {val:.3f} "
              f"values {res['best_values']} {time.time() - t:.0f}s", flush=True)


def _variant_zoo(name, work):
    """The cached demo zoo with the variant's experts retrained from its base (1 thread)."""
    from evomerge_core.toyworld.recipes import DEMO
    from evomerge_core.toyworld.tasks import make_world
    from evomerge_core.toyworld.tokenizer import build_tokenizer, vocabulary
    from evomerge_core.toyworld.train import deterministic_torch, train_stage
    from evomerge_core.toyworld.evaluate import save_model
    from evomerge_core.toyworld.zoo import Zoo

    src = build_zoo("demo", progress=False)
    root = work / name
    zoo = Zoo(root=root, size="demo", recipe_hash=name, models={m: root / "models" / m for m in src.models},
              tasks=src.tasks)
    if (root / "done").exists():
        return zoo
    shutil.rmtree(root, ignore_errors=True)
    (root / "models").mkdir(parents=True)
    variant = zoo_variants()[name]
    r = DEMO
    world = make_world(r.max_a, r.max_b, r.max_number, r.n_validation, r.n_test, 0)
    vocab, tokenizer = vocabulary(), build_tokenizer()
    shutil.copytree(src.models["base"], root / "models" / "base")
    with deterministic_torch(1):
        base = load_model(src.models["base"])
        for m in ("skill_a", "lang", "skill_b"):
            if m not in variant:
                shutil.copytree(src.models[m], root / "models" / m)
                continue
            model = copy.deepcopy(base)
            train_stage(model, world, variant[m], vocab)
            save_model(model, tokenizer, root / "models" / m)
    (root / "done").write_text("1")
    return zoo


def zoo_variant(name, evals):
    import torch

    from evomerge_core.merge.engine import merge_to_dir

    torch.set_num_threads(1)
    work = Path(os.environ.get("TUNING_DIR", tempfile.gettempdir())) / "evomerge-zoo-variants"
    zoo = _variant_zoo(name, work)
    torch.set_num_threads(1)
    out = {m: _scores(zoo.models[m], zoo) for m in ("base", "skill_a", "skill_b", "lang")}
    for label, rec in baseline_recipes(zoo).items():
        d = zoo.root / "merges" / label.split(" ")[0]
        merge_to_dir(rec, {r: Path(r) for r in rec.model_names()}, d, overwrite=True, progress=False)
        out[label] = _scores(d, zoo)
    print(json.dumps({"variant": name, **out}), flush=True)
    storage = (zoo.root / "runs").as_uri()
    for seed in [int(s) for s in os.environ.get("SEEDS", "0").split(",")] if evals else []:
        key = f"{name}-s{seed}-{evals}"
        cfg = search_config(zoo, seed=seed, evaluations=evals, storage=storage, run_key=key)
        cfg["fitness"].pop("test")
        t = time.time()
        res = evolve(cfg, resume=False, run_key=key)
        best = _best(storage, key, zoo.root / "best" / key)
        print("RESULT", json.dumps({"variant": name, "seed": seed, "evals": evals, "val": _scores(best, zoo),
                                    "train_union": _scores(best, zoo, "train")["union"],
                                    "values": res["best_values"], "s": round(time.time() - t)}), flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["zoo"]:
        zoo_variant(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 144)
    else:
        search_variants(sys.argv[1:] or list(SEARCH_VARIANTS))
