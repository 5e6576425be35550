"""The demo's pieces that need no Prefect: the run config of the PS search on the toy world,
the unoptimised baseline merges, the scoring of one model on every test split, and the
results table (markdown + JSON + plot). `evomerge.flows.demo` orchestrates them.

Selection never sees a test split: the search's fitness is the answer log-likelihood on
UNION *train*; test splits are only read here, after the search, to fill the table.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from ..merge.recipe import MergeRecipe, ModelEntry
from .evaluate import evaluate_exact_match, load_model, load_tokenizer
from .zoo import Zoo

EXPERTS = ("skill_a", "skill_b", "lang")
TABLE_TASKS = ("union", "skill", "lang", "cross")
DEFAULT_EVALUATIONS = 144  # 16 generations of the default population (9 for 6 genes); 288 is
# one validation point better (docs/demo-tuning.md) but does not fit the 5-minute demo budget.
DEFAULT_DFS_EVALUATIONS = 96  # per DFS search (PS+DFS's DFS stage, DFS, DFS with scales 1)
SPACES = ("ps", "psdfs", "dfs", "vlm", "budget")  # the evolved rows `evomerge demo` runs by default
# Evolved rows run only when asked for: "cross" (PS -> CROSS), "crossdfs" (also PS+DFS -> CROSS).
OPTIONAL_SPACES = ("cross", "crossdfs")
CROSS_SIZE = "cross"  # the zoo of the CROSS rows (toyworld.cross_zoo)
CROSS_TABLE_TASKS = ("cross", "skill", "lang")
# Processes the demo's searches run in side by side: each search is single-threaded Python-bound
# work on a tiny model (one process keeps ~1.1 of 2 cores busy), so two halve the wall time.
DEFAULT_WORKERS = 2


def _fitness(zoo: Zoo) -> dict[str, Any]:
    """The demo's fitness: answer log-likelihood on UNION train; UNION test held out. No
    per-candidate accuracy scorer (greedy generation would double each candidate's time): the
    table scores each run's best on the test splits afterwards."""
    return {
        "dataset": {"path": str(zoo.tasks["union"]["train"]), "columns": {"prompt": "prompt", "answer": "answer"}},
        "test": {"path": str(zoo.tasks["union"]["test"]), "columns": {"prompt": "prompt", "answer": "answer"}},
        "scorer": "logprob",
        "accuracy_scorer": "none",
        "prompt_template": zoo.prompt_template,
        "max_new_tokens": zoo.max_new_tokens,
        "stop_strings": list(zoo.stop_strings),
        "batch_size": 64,
    }


# Toy candidates take ~0.2 s: a whole generation per Prefect task run keeps Prefect's own
# per-task-run work (~0.1-0.3 s) from doubling the demo's time. Never changes results.
_RUNTIME = {"device": "cpu", "dtype": "float32", "task_runner": {"candidates_per_task": "auto"}}


# "evolved PS, budgeted" (fitness.budget, docs/budget.md; figures in docs/benchmarks.md): each
# generation draws 48 fresh train items and races its candidates over them in rounds of 12
# (a candidate beaten by mu others at 80% confidence stops). The final check races the last 4
# generations' winners and the CMA-ES mean after the last generation over the whole train split
# in rounds of 40; the ones left are scored on every item and the best is the run's best.
# Chosen with benchmarks/budget_sim.py on validation, seeds 0-7 (docs/benchmarks.md).
DEMO_FINAL: dict[str, Any] = {"final_candidates": 4, "final_mean": True, "final_racing": {"slice": 40, "confidence": 0.8}}
DEMO_BUDGET: dict[str, Any] = {"racing": {"slice": 12, "min_items": 12, "confidence": 0.8, "max_items": 48},
                               **DEMO_FINAL}
# Its random baseline: per-generation random minibatches (fitness.minibatch) of about the same
# tokens in all, and the same final check: only how the items are chosen differs.
DEMO_RANDOM_MINIBATCH = 36


def budget_search_config(zoo: Zoo, *, seed: int, evaluations: int, storage: str, run_key: str,
                         kind: str) -> dict[str, Any]:
    """The demo's PS search with the evaluation budget (`kind` "budget") or with random
    minibatches of the same budget (`kind` "random")."""
    config = search_config(zoo, seed=seed, evaluations=evaluations, storage=storage, run_key=run_key)
    if kind == "budget":
        config["fitness"]["budget"] = json.loads(json.dumps(DEMO_BUDGET))
    elif kind == "random":
        config["fitness"]["minibatch"] = DEMO_RANDOM_MINIBATCH
        config["fitness"]["budget"] = json.loads(json.dumps(DEMO_FINAL))
    else:
        raise ValueError(f"unknown budget kind {kind!r}; use budget or random")
    return config


def _ps_space(seed: int) -> dict[str, Any]:
    return {"ps": {"method": "dare_ties", "params": ["density", "weight"], "merge_seed": seed}}


def search_config(zoo: Zoo, *, seed: int, evaluations: int, storage: str, run_key: str) -> dict[str, Any]:
    """The run config of the demo's PS search: the paper's recipe (DARE-TIES, a density and a
    weight per expert, CMA-ES from x0 0.5 with sigma0 1/6) with a graded fitness."""
    models = zoo.models
    return {
        "run_key": run_key,
        "storage": storage,
        "sources": [{"model": str(models["base"]), "base": True}]
        + [{"model": str(models[name])} for name in EXPERTS],
        "space": _ps_space(seed),
        "optimizer": {"seed": seed, "evaluations": evaluations},
        "fitness": _fitness(zoo),
        "runtime": dict(_RUNTIME),
        "output": {"materialise_best": True, "report": True},
    }


# DFS in the toy world follows the paper's pairing: A = the language (JA) model, B = the
# skill (math) model; PS+DFS takes the PS result as A and the JA model as B (section 4.1).
DFS_A, DFS_B, PSDFS_B = "lang", "skill_a", "lang"


def dfs_search_config(zoo: Zoo, *, seed: int, evaluations: int, storage: str, run_key: str,
                      scales: str = "matrix") -> dict[str, Any]:
    """A DFS search through the layers of the JA model (A) and the skill model (B), r = 3;
    ``scales: none`` is the paper's ablation (every scale fixed to 1)."""
    return {
        "run_key": run_key,
        "storage": storage,
        "sources": [{"model": str(zoo.models[DFS_A])}, {"model": str(zoo.models[DFS_B])}],
        "space": {"dfs": {"model_a": str(zoo.models[DFS_A]), "model_b": str(zoo.models[DFS_B]), "r": 3,
                          "scales": scales}},
        "optimizer": {"seed": seed, "evaluations": evaluations},
        "fitness": _fitness(zoo),
        "runtime": dict(_RUNTIME),
        "output": {"materialise_best": True, "report": True},
    }


def psdfs_search_config(zoo: Zoo, *, seed: int, ps_evaluations: int, dfs_evaluations: int, storage: str,
                        run_key: str) -> dict[str, Any]:
    """The paper's PS+DFS as one chained run: stage ``ps`` is exactly the demo's PS search,
    stage ``dfs`` searches the layers of its best model (A) and the JA model (B)."""
    ps = search_config(zoo, seed=seed, evaluations=ps_evaluations, storage=storage, run_key=run_key)
    return _chained(ps, zoo, seed, dfs_evaluations)


def cross_psdfs_search_config(zoo: Zoo, *, seed: int, ps_evaluations: int, dfs_evaluations: int, storage: str,
                              run_key: str) -> dict[str, Any]:
    """PS+DFS targeting CROSS on the cross zoo: stage ``ps`` is `cross_search_config`'s search,
    stage ``dfs`` the layers of its best model (A) and the JA model (B), same fitness."""
    ps = cross_search_config(zoo, seed=seed, evaluations=ps_evaluations, storage=storage, run_key=run_key)
    return _chained(ps, zoo, seed, dfs_evaluations)


def _chained(ps: dict[str, Any], zoo: Zoo, seed: int, dfs_evaluations: int) -> dict[str, Any]:
    """A PS search config as stage ``ps`` of a chained run whose stage ``dfs`` takes its best as A."""
    ps.pop("space")
    return {
        **ps,
        "stages": [
            {"name": "ps", "space": _ps_space(seed)},
            {"name": "dfs", "space": {"dfs": {"model_a": "@ps", "model_b": str(zoo.models[PSDFS_B]), "r": 3,
                                              "scales": "matrix"}},
             "optimizer": {"seed": seed, "evaluations": dfs_evaluations}},
        ],
    }


def cross_fitness(zoo: Zoo) -> dict[str, Any]:
    """The CROSS search's fitness: exact match (right number AND the JA prefix) on the CROSS
    train items, the run's best chosen on CROSS validation, CROSS test held out."""

    def spec(split: str) -> dict[str, Any]:
        return {"path": str(zoo.tasks["cross"][split]), "columns": {"prompt": "prompt", "answer": "answer"}}

    return {
        "dataset": spec("train"),
        "validation": spec("validation"),
        "selection": "validation",
        "test": spec("test"),
        "scorer": "exact_match",
        "accuracy_scorer": "none",
        "prompt_template": zoo.prompt_template,
        "max_new_tokens": zoo.max_new_tokens,
        "stop_strings": list(zoo.stop_strings),
        "batch_size": 64,
    }


def cross_search_config(zoo: Zoo, *, seed: int, evaluations: int, storage: str, run_key: str) -> dict[str, Any]:
    """The demo's PS search (same space and optimiser) on the cross zoo, targeting CROSS."""
    config = search_config(zoo, seed=seed, evaluations=evaluations, storage=storage, run_key=run_key)
    config["fitness"] = cross_fitness(zoo)
    return config


def cross_baseline_recipes(zoo: Zoo) -> dict[str, MergeRecipe]:
    """The CROSS table's hand-set merges: task arithmetic, TIES and DARE-TIES (weight 1,
    density 0.5) over the three experts and over each skill expert with `lang`."""
    base = str(zoo.models["base"])
    methods = {"task_arithmetic (w=1)": ("task_arithmetic", {"weight": 1.0}),
               "TIES (d=0.5, w=1)": ("ties", {"density": 0.5, "weight": 1.0}),
               "DARE-TIES (d=0.5, w=1)": ("dare_ties", {"density": 0.5, "weight": 1.0})}
    groups = [EXPERTS, ("skill_a", "lang"), ("skill_b", "lang")]
    recipes = {}
    for label, (method, params) in methods.items():
        for group in groups:
            recipes[f"{label} {'+'.join(group)}"] = MergeRecipe(
                merge_method=method,
                base_model=base,
                models=[ModelEntry(model=str(zoo.models[name]), parameters=dict(params)) for name in group],
            )
    return recipes


def baseline_recipes(zoo: Zoo) -> dict[str, MergeRecipe]:
    """Hand-set merges of the three experts with the usual default parameters (no search).

    Task arithmetic adds each task vector at weight 1; TIES and DARE-TIES use density 0.5 and
    weight 1 (mergekit's documented examples; TIES normalises, DARE-TIES does not), i.e. what a
    user would try before searching.
    """
    base = str(zoo.models["base"])

    def recipe(method: str, params: dict[str, float]) -> MergeRecipe:
        return MergeRecipe(
            merge_method=method,
            base_model=base,
            models=[ModelEntry(model=str(zoo.models[name]), parameters=dict(params)) for name in EXPERTS],
        )

    return {
        "task_arithmetic (w=1)": recipe("task_arithmetic", {"weight": 1.0}),
        "TIES (d=0.5, w=1)": recipe("ties", {"density": 0.5, "weight": 1.0}),
        "DARE-TIES (d=0.5, w=1)": recipe("dare_ties", {"density": 0.5, "weight": 1.0}),
    }


def score_model(model_dir: Path, zoo: Zoo) -> dict[str, float]:
    """Exact-match accuracy of one saved model on the test split of every toy task."""
    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    tasks = CROSS_TABLE_TASKS if zoo.size == CROSS_SIZE else TABLE_TASKS
    return {task: evaluate_exact_match(model, tokenizer, zoo.rows(task, "test"), max_new_tokens=zoo.max_new_tokens)
            for task in tasks}


def mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and (population) standard deviation; spread 0 for a single value."""
    return statistics.fmean(values), (statistics.pstdev(values) if len(values) > 1 else 0.0)


def _cell(values: list[float]) -> str:
    mean, spread = mean_spread(values)
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ± {spread:.3f}"


def render_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table like the paper's Table 1: one row per model, test accuracies per task.

    Each row: name, scores {task: [values over seeds]}, evaluated (candidates), seconds (of
    the search, per seed).
    """
    header = ("| model | UNION | CROSS | skill (EN add) | lang (JA read) | candidates | search s "
              "| tokens per search |")
    lines = [header, "|" + "---|" * 8]
    for row in rows:
        s = row["scores"]
        seconds = f"{row['seconds']:.0f}" if row.get("kind") == "evolved" else "-"
        tokens = f"{statistics.fmean(row['generated_tokens']):,.0f}" if row.get("generated_tokens") else "-"
        lines.append(
            f"| {row['name']} | {_cell(s['union'])} | {_cell(s['cross'])} | {_cell(s['skill'])} | "
            f"{_cell(s['lang'])} | {row.get('evaluated', '-')} | {seconds} | {tokens} |"
        )
    return "\n".join(lines)


def render_cross_table(rows: list[dict[str, Any]]) -> str:
    """The CROSS rows (the cross zoo): test exact match; CROSS needs the number AND JA style."""
    lines = ["| model (cross zoo) | CROSS (target) | skill (EN add) | lang (JA read) | candidates | search s |",
             "|" + "---|" * 6]
    for row in rows:
        s = row["scores"]
        seconds = f"{row['seconds']:.0f}" if row.get("kind") == "evolved" else "-"
        lines.append(f"| {row['name']} | {_cell(s['cross'])} | {_cell(s['skill'])} | {_cell(s['lang'])} | "
                     f"{row.get('evaluated', '-')} | {seconds} |")
    return "\n".join(lines)


def cross_claims(rows: list[dict[str, Any]]) -> list[str]:
    """Issue 23's CROSS margins on test (means over seeds)."""
    best_source = _mean_of(rows, "cross", kind="source")
    best_merge = _mean_of(rows, "cross", kind="merge")
    ps = _mean_of(rows, "cross", kind="evolved", space="cross")
    if ps is None or best_source is None or best_merge is None:
        return []
    claims = [f"evolved PS -> CROSS vs best source model on CROSS test: {100 * (ps - best_source):+.1f} points "
              "(target >= +10)",
              f"evolved PS -> CROSS vs best unoptimised merge on CROSS test: {100 * (ps - best_merge):+.1f} points "
              "(target >= +5)"]
    psdfs = _mean_of(rows, "cross", kind="evolved", space="cross_psdfs")
    if psdfs is not None:
        claims.append(f"evolved PS+DFS -> CROSS vs evolved PS -> CROSS on CROSS test: {100 * (psdfs - ps):+.1f} "
                      "points (target >= 0)")
    return claims


def render_vlm_table(rows: list[dict[str, Any]]) -> str:
    """The VLM rows: mean ROUGE-L (JA by characters, wrong script = 0) on the toy VQA test splits."""
    lines = ["| VLM | JA test (target) | EN test | candidates | search s |", "|" + "---|" * 5]
    for row in rows:
        s = row["scores"]
        seconds = f"{row['seconds']:.0f}" if row.get("kind") == "evolved" else "-"
        lines.append(f"| {row['name']} | {_cell(s['ja'])} | {_cell(s['en'])} | {row.get('evaluated', '-')} | {seconds} |")
    return "\n".join(lines)


def _mean_of(rows: list[dict[str, Any]], task: str, **match: str) -> float | None:
    found = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    return max(statistics.fmean(r["scores"][task]) for r in found) if found else None


def check_claims(rows: list[dict[str, Any]], vlm_rows: list[dict[str, Any]] | None = None) -> list[str]:
    """The issues' acceptance margins, on test splits (means over seeds)."""
    claims = []
    best_source = _mean_of(rows, "union", kind="source")
    best_merge = _mean_of(rows, "union", kind="merge")
    ps = _mean_of(rows, "union", kind="evolved", space="ps")
    if ps is not None and best_source is not None and best_merge is not None:
        claims += [
            f"evolved PS vs best source model on UNION test: {100 * (ps - best_source):+.1f} points (target >= +15)",
            f"evolved PS vs best unoptimised merge on UNION test: {100 * (ps - best_merge):+.1f} points (target >= +5)",
        ]
    claims += _budget_claims(rows)
    psdfs = _mean_of(rows, "union", kind="evolved", space="psdfs")
    if ps is not None and psdfs is not None:
        claims.append(f"evolved PS+DFS vs evolved PS on UNION test: {100 * (psdfs - ps):+.1f} points (target >= 0)")
    dfs, fixed = (_mean_of(rows, "union", kind="evolved", space=k) for k in ("dfs", "dfs_noscale"))
    if dfs is not None and fixed is not None:
        claims.append(f"DFS scales ablation (all scales 1) vs evolved scales on UNION test: "
                      f"{100 * (fixed - dfs):+.1f} points")
    if vlm_rows:
        evolved = _mean_of(vlm_rows, "ja", kind="evolved")
        for kind, what in (("source", "the source VLM"), ("merge", "unoptimised TIES")):
            other = _mean_of(vlm_rows, "ja", kind=kind)
            if evolved is not None and other is not None:
                claims.append(f"evolved VLM vs {what} on JA test: {100 * (evolved - other):+.1f} ROUGE-L points "
                              "(target > 0)")
    return claims


def _budget_claims(rows: list[dict[str, Any]]) -> list[str]:
    """Issue 22's margins: the budgeted PS search against the full one and random minibatches."""
    found = {r.get("space"): r for r in rows if r.get("kind") == "evolved"}
    full, budgeted, random_ = found.get("ps"), found.get("ps_budget"), found.get("ps_random")
    if full is None or budgeted is None or not full.get("generated_tokens"):
        return []
    union = {k: statistics.fmean(r["scores"]["union"]) for k, r in found.items()}
    share = sum(budgeted["generated_tokens"]) / sum(full["generated_tokens"])
    out = [f"budgeted PS vs evolved PS on UNION test: {100 * (union['ps_budget'] - union['ps']):+.1f} points "
           "(target >= -1)",
           f"budgeted PS generated tokens: {100 * share:.1f}% of evolved PS's (target <= 20%)"]
    if random_ is not None:
        out.append(f"budgeted PS vs random minibatches of the same budget on UNION test: "
                   f"{100 * (union['ps_budget'] - union['ps_random']):+.1f} points (target >= 0)")
    return out


def write_outputs(out_dir: Path, rows: list[dict[str, Any]], curves: list[list[dict[str, Any]]],
                  vlm_rows: list[dict[str, Any]] | None = None,
                  cross_rows: list[dict[str, Any]] | None = None) -> dict[str, Path]:
    """Write `results.md`, `results.json` and `fitness.png` (best/mean per generation per seed
    of the PS search)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    claims = check_claims(rows, vlm_rows) + cross_claims(cross_rows or [])
    md = "# evomerge demo: the paper's Table 1 in miniature\n\n" + render_table(rows) + "\n\n"
    if vlm_rows:
        md += render_vlm_table(vlm_rows) + "\n\n"
    if cross_rows:
        md += render_cross_table(cross_rows) + "\n\n"
    md += "\n".join(f"- {c}" for c in claims) + "\n"
    (out_dir / "results.md").write_text(md, encoding="utf-8")
    data = {"rows": rows, "vlm_rows": vlm_rows, "claims": claims}
    if cross_rows:
        data["cross_rows"] = cross_rows
    (out_dir / "results.json").write_text(json.dumps(data, indent=2), encoding="utf-8")
    plot = out_dir / "fitness.png"
    _plot_curves(curves, plot)
    return {"markdown": out_dir / "results.md", "json": out_dir / "results.json", "plot": plot}


def _finite(value: float | None) -> float:
    return value if value is not None and math.isfinite(value) else float("nan")


def _plot_curves(curves: list[list[dict[str, Any]]], path: Path) -> None:
    import matplotlib  # deferred: 0.3 s import, and the Agg backend is chosen first

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: after the Agg backend is chosen

    fig, ax = plt.subplots(figsize=(6, 4))
    for seed, summaries in enumerate(curves):
        gens = [s["generation"] + 1 for s in summaries]
        best = [_finite(s.get("best_fitness")) for s in summaries]
        mean = [_finite(s.get("mean_fitness")) for s in summaries]
        line = ax.plot(gens, best, label=f"seed {seed} best")[0]
        ax.plot(gens, mean, linestyle="--", color=line.get_color(), alpha=0.6, label=f"seed {seed} mean")
    ax.set_xlabel("generation")
    ax.set_ylabel("fitness (answer log-likelihood, UNION train)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
