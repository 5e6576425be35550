"""Compare demo search settings on UNION *validation* (never test): run each variant's evolve
flow on the demo toy world and print train/validation exact-match accuracy of its best model.

    python benchmarks/demo_tuning.py [VARIANT ...]      # results in docs/demo-tuning.md
"""
import sys
import tempfile
import time
from pathlib import Path
from evomerge_core.toyworld import build_zoo, evaluate_exact_match, load_model, load_tokenizer
from evomerge_core.toyworld.demo import search_config
from evomerge_core.runstore import RunStore
from evomerge.flows.evolve import evolve
zoo = build_zoo("demo", progress=False)
variants = {
  "dare144": {},
  "dare288": {"evals": 288},
  "ties144": {"method": "ties"},
  "ties288": {"method": "ties", "evals": 288},
  "dare_lg2_288": {"evals": 288, "lg": 2},
  "dare_em144": {"scorer": "exact_match"},
  "dare_em288": {"scorer": "exact_match", "evals": 288},
  "dare_w2_288": {"evals": 288, "wmax": 2.0},
}
sel = sys.argv[1:] or list(variants)
WORK = Path(tempfile.mkdtemp(prefix="evomerge-tuning-"))
storage = (WORK / "runs").as_uri()
for name in sel:
    v = variants[name]
    cfg = search_config(zoo, seed=0, evaluations=v.get("evals", 144), storage=storage, run_key=name)
    cfg["space"]["ps"]["method"] = v.get("method", "dare_ties")
    if "lg" in v: cfg["space"]["ps"]["granularity"] = {"layer_groups": v["lg"]}
    cfg["fitness"].pop("test")
    if "scorer" in v: cfg["fitness"]["scorer"] = v["scorer"]
    if "wmax" in v: cfg["space"]["ps"]["bounds"] = {"weight": [0, v["wmax"]], "density": [0, 1]}
    t = time.time()
    res = evolve(cfg, resume=False, run_key=name)
    out = WORK / f"best-{name}"
    import shutil; shutil.rmtree(out, ignore_errors=True)
    RunStore(storage, name).get_dir("best", out)
    m, tok = load_model(out), load_tokenizer(out)
    val = evaluate_exact_match(m, tok, zoo.rows("union", "validation"))
    tr = evaluate_exact_match(m, tok, zoo.rows("union", "train"))
    print(f"RESULT {name}: fitness {res['best_fitness']:.4f} union_train {tr:.3f} union_val {val:.3f} values {res['best_values']} {time.time()-t:.0f}s", flush=True)
