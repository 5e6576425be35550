"""What the Prefect UI shows of an evolve run, as artifacts of its flow run:

- a progress artifact, updated in place after every generation;
- per generation a table artifact (each candidate: task run name, fitness, accuracy, seconds,
  error), key ``{run}-candidates`` (one version per generation);
- a markdown artifact with the best recipe so far and the fitness over generations (a text
  chart: the UI renders markdown, not images), key ``{run}-best``;
- at the end a link artifact to the fitness plot (``report/fitness.png``) in the run store.

The rendering functions are pure (tested without an API); `RunMonitor` publishes them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import yaml

BARS = " ▏▎▍▌▋▊▉█"
CHART_WIDTH = 24


def artifact_key(run_key: str, what: str) -> str:
    """A valid artifact key (lowercase letters, digits, dashes) for a run's artifact."""
    slug = re.sub(r"[^a-z0-9]+", "-", run_key.lower()).strip("-") or "run"
    return f"{slug}-{what}"


def candidate_rows(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of a generation's table artifact, in candidate order."""
    rows = []
    for r in sorted(records, key=lambda r: r["index"]):
        rows.append({
            "candidate": f"eval-g{r['generation']}-c{r['index']}",
            "fitness": _num(r.get("fitness")),
            "accuracy": _num(r.get("accuracy")),
            "seconds": _num(r.get("seconds"), 2),
            "genome": "[" + ", ".join(f"{x:.3f}" for x in r.get("genome") or []) + "]",
            "error": r.get("error") or "",
        })
    return rows


def _num(value: Any, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


def bar(value: float, low: float, high: float, width: int = CHART_WIDTH) -> str:
    """A horizontal bar for `value` on [low, high] (eighth-block resolution)."""
    frac = 1.0 if high <= low else min(max((value - low) / (high - low), 0.0), 1.0)
    eighths = round(frac * width * 8)
    full, part = divmod(eighths, 8)
    return ("█" * full + (BARS[part] if part else "")) or "▏"


def fitness_chart(summaries: Sequence[dict[str, Any]]) -> str:
    """A markdown table of best / mean / best-so-far fitness per generation, with a bar for each
    generation's best (scaled between the lowest and highest generation best)."""
    lines = ["| generation | best | mean | best so far | best of generation |", "|---:|---:|---:|---:|:---|"]
    bests = [s.get("best_fitness") for s in summaries]
    known = [b for b in bests if b is not None]
    low, high = (min(known), max(known)) if known else (0.0, 1.0)
    if high > low:  # leave room so the lowest bar is visible
        low -= (high - low) * 0.1
    so_far: float | None = None
    for s, best in zip(summaries, bests):
        if best is not None:
            so_far = best if so_far is None else max(so_far, best)
        chart = f"`{bar(best, low, high)}`" if best is not None else "failed"
        lines.append(f"| {s['generation'] + 1} | {_fmt(best)} | {_fmt(s.get('mean_fitness'))} | {_fmt(so_far)} | {chart} |")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return "—" if value is None else f"{value:.4f}"


def best_markdown(run_key: str, best: dict[str, Any] | None, summaries: Sequence[dict[str, Any]], total: int) -> str:
    """The markdown artifact: best recipe so far and the fitness over generations."""
    done = len(summaries)
    head = [f"# {run_key}: generation {done} of {total}", ""]
    if best is None:
        head += ["No successful candidate yet.", ""]
    else:
        head += [f"**Best so far:** fitness {best['fitness']:.4f} (generation {best['generation'] + 1}, "
                 f"candidate {best['index']}, task run `eval-g{best['generation']}-c{best['index']}`)", ""]
        if best.get("recipe"):
            head += ["Recipe (mergekit YAML):", "", "```yaml",
                     yaml.safe_dump(best["recipe"], sort_keys=False).rstrip(), "```", ""]
    return "\n".join(head + ["## Fitness over generations", "", fitness_chart(summaries), ""])


class RunMonitor:
    """Publishes a run's artifacts from inside its flow run."""

    def __init__(self, run_key: str, total: int, done: int = 0) -> None:
        from prefect.artifacts import create_progress_artifact

        self.run_key = run_key
        self.total = max(total, 1)
        self.progress_id = create_progress_artifact(
            progress=100.0 * done / self.total, key=artifact_key(run_key, "progress"),
            description=f"{run_key}: generations done of {total}")

    def generation(self, records: Sequence[dict[str, Any]], summaries: Sequence[dict[str, Any]],
                   best: dict[str, Any] | None) -> None:
        """After a generation's checkpoint: its table, the progress and the best-so-far markdown."""
        from prefect.artifacts import create_markdown_artifact, create_table_artifact, update_progress_artifact

        summary = summaries[-1]
        g = summary["generation"] + 1
        create_table_artifact(
            table=candidate_rows(records), key=artifact_key(self.run_key, "candidates"),
            description=f"{self.run_key} generation {g}: {summary['candidates']} candidates, "
                        f"best {_fmt(summary.get('best_fitness'))}, {summary['seconds']:.1f} s")
        update_progress_artifact(self.progress_id, progress=100.0 * g / self.total,
                                 description=f"{self.run_key}: generation {g} of {self.total}")
        create_markdown_artifact(markdown=best_markdown(self.run_key, best, summaries, self.total),
                                 key=artifact_key(self.run_key, "best"),
                                 description=f"{self.run_key}: best recipe after generation {g}")

    def finished(self, plot_url: str | None) -> None:
        """At the end: a link to the fitness plot in the run store (when a report was written)."""
        from prefect.artifacts import create_link_artifact

        if plot_url:
            create_link_artifact(link=plot_url, link_text="fitness.png (fitness over generations)",
                                 key=artifact_key(self.run_key, "plot"), description=f"{self.run_key}: fitness plot")
