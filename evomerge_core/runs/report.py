"""Run report: `fitness.png` (best and mean fitness per generation, matplotlib Agg) and
`report.md` (settings, per-generation table, best recipe, held-out test score)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from evomerge_core.runs.records import best_label


def plot_fitness(summaries: list[dict[str, Any]], path: Path) -> Path:
    """Best and mean fitness per generation (failed candidates excluded from the mean)."""
    import matplotlib  # deferred: 0.3 s import, and the Agg backend is chosen first

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure  # deferred: after the backend; no pyplot: no global state, thread-safe

    gens = [s["generation"] + 1 for s in summaries]
    best = [s["best_fitness"] for s in summaries]
    mean = [s["mean_fitness"] for s in summaries]
    running: list[float | None] = []
    top: float | None = None
    for b in best:
        if b is not None and (top is None or b > top):
            top = b
        running.append(top)
    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(gens, [float("nan") if v is None else v for v in mean], marker=".", label="generation mean")
    ax.plot(gens, [float("nan") if v is None else v for v in best], marker=".", label="generation best")
    ax.plot(gens, [float("nan") if v is None else v for v in running], linestyle="--", label="best so far")
    ax.set_xlabel("generation")
    ax.set_ylabel("fitness")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path)
    return path


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def _space_lines(space: dict[str, Any]) -> list[str]:
    """The search-space lines of the report (PS or DFS)."""
    if space["kind"] == "dfs":
        return [
            f"- search space: dfs, {len(space['names'])} parameters (r = {space['r']}, scales {space['scales']}, "
            f"at most {space['max_hops']} layers)",
            f"- model A: {space['model_a']} ({space['layers_a']} layers); model B: {space['model_b']} ({space['layers_b']} layers)",
        ]
    return [
        f"- search space: {space['kind']} / {space['method']}, {len(space['names'])} parameters"
        + (f", {space['layer_groups']} layer groups" if space.get("layer_groups") else ""),
        f"- base: {space['base'] or '-'}; sources: {', '.join(space['models'])}",
    ]


def render_markdown(result: dict[str, Any], config: dict[str, Any]) -> str:
    """The text of report.md."""
    space = result["space"]
    lines = [
        f"# evomerge run `{result['run_key']}`",
        "",
        *_space_lines(space),
        f"- evaluations: {result['evaluations']} in {len(result['generations'])} generations; "
        f"scorer `{config['fitness']['scorer']}`",
        f"- best fitness: **{_fmt(result['best_fitness'])}** (accuracy {_fmt(result.get('best_accuracy'))}), "
        + best_label(result["best_generation"], result["best_index"]),
    ]
    test = result.get("test")
    if test:
        lines.append(f"- held-out test: fitness {_fmt(test.get('fitness'))}, accuracy {_fmt(test.get('accuracy'))} "
                     f"on {test.get('n_items', '?')} items (never used for selection)")
    lines += ["", "![fitness per generation](fitness.png)", "", "## Generations", "",
              "| generation | best | mean | best accuracy | failed | seconds |", "|---|---|---|---|---|---|"]
    for s in result["generations"]:
        lines.append(f"| {s['generation'] + 1} | {_fmt(s['best_fitness'])} | {_fmt(s['mean_fitness'])} | "
                     f"{_fmt(s['best_accuracy'])} | {s['failed']} | {_fmt(s['seconds'])} |")
    lines += ["", "## Best genome", "", "| parameter | value |", "|---|---|"]
    for name, value in (result.get("best_values") or {}).items():
        lines.append(f"| `{name}` | {value:.4f} |")
    lines += ["", "## Best recipe", "", "```yaml", yaml.safe_dump(result["best_recipe"], sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def write_report(out_dir: Path, result: dict[str, Any], config: dict[str, Any]) -> Path:
    """Write fitness.png and report.md into `out_dir`; returns it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_fitness(result["generations"], out_dir / "fitness.png")
    (out_dir / "report.md").write_text(render_markdown(result, config), encoding="utf-8")
    return out_dir
