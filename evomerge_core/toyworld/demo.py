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


def search_config(zoo: Zoo, *, seed: int, evaluations: int, storage: str, run_key: str) -> dict[str, Any]:
    """The run config of the demo's PS search: the paper's recipe (DARE-TIES, a density and a
    weight per expert, CMA-ES from x0 0.5 with sigma0 1/6) with a graded fitness."""
    models = zoo.models
    return {
        "run_key": run_key,
        "storage": storage,
        "sources": [{"model": str(models["base"]), "base": True}]
        + [{"model": str(models[name])} for name in EXPERTS],
        "space": {"ps": {"method": "dare_ties", "params": ["density", "weight"], "merge_seed": seed}},
        "optimizer": {"seed": seed, "evaluations": evaluations},
        "fitness": {
            "dataset": {"path": str(zoo.tasks["union"]["train"]), "columns": {"prompt": "prompt", "answer": "answer"}},
            "test": {"path": str(zoo.tasks["union"]["test"]), "columns": {"prompt": "prompt", "answer": "answer"}},
            "scorer": "logprob",
            "accuracy_scorer": "exact_match",
            "prompt_template": zoo.prompt_template,
            "max_new_tokens": zoo.max_new_tokens,
            "stop_strings": list(zoo.stop_strings),
            "batch_size": 64,
        },
        "runtime": {"device": "cpu", "dtype": "float32"},
        "output": {"materialise_best": True, "report": True},
    }


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
    return {task: evaluate_exact_match(model, tokenizer, zoo.rows(task, "test")) for task in TABLE_TASKS}


def mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and (population) standard deviation; spread 0 for a single value."""
    return statistics.fmean(values), (statistics.pstdev(values) if len(values) > 1 else 0.0)


def _cell(values: list[float]) -> str:
    mean, spread = mean_spread(values)
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ± {spread:.3f}"


def render_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table like the paper's Table 1: one row per model, test accuracies per task.

    Each row: name, scores {task: [values over seeds]}, evaluated (candidates), seconds.
    """
    header = "| model | UNION | CROSS | skill (EN add) | lang (JA read) | candidates | seconds |"
    lines = [header, "|" + "---|" * 7]
    for row in rows:
        s = row["scores"]
        lines.append(
            f"| {row['name']} | {_cell(s['union'])} | {_cell(s['cross'])} | {_cell(s['skill'])} | "
            f"{_cell(s['lang'])} | {row.get('evaluated', '-')} | {row.get('seconds', 0):.0f} |"
        )
    return "\n".join(lines)


def check_claims(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's acceptance margins, measured on UNION test (means over seeds)."""
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_kind.setdefault(row["kind"], []).append(row)
    evolved = statistics.fmean(by_kind["evolved"][0]["scores"]["union"])
    best_source = max(statistics.fmean(r["scores"]["union"]) for r in by_kind["source"])
    best_merge = max(statistics.fmean(r["scores"]["union"]) for r in by_kind["merge"])
    return [
        f"evolved PS vs best source model on UNION test: {100 * (evolved - best_source):+.1f} points (target >= +15)",
        f"evolved PS vs best unoptimised merge on UNION test: {100 * (evolved - best_merge):+.1f} points (target >= +5)",
    ]


def write_outputs(out_dir: Path, rows: list[dict[str, Any]], curves: list[list[dict[str, Any]]]) -> dict[str, Path]:
    """Write `results.md`, `results.json` and `fitness.png` (best/mean per generation per seed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    claims = check_claims(rows)
    md = "# evomerge demo: the paper's Table 1 in miniature\n\n" + render_table(rows) + "\n\n"
    md += "\n".join(f"- {c}" for c in claims) + "\n"
    (out_dir / "results.md").write_text(md, encoding="utf-8")
    (out_dir / "results.json").write_text(json.dumps({"rows": rows, "claims": claims}, indent=2), encoding="utf-8")
    plot = out_dir / "fitness.png"
    _plot_curves(curves, plot)
    return {"markdown": out_dir / "results.md", "json": out_dir / "results.json", "plot": plot}


def _finite(value: float | None) -> float:
    return value if value is not None and math.isfinite(value) else float("nan")


def _plot_curves(curves: list[list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
