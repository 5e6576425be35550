"""What the Prefect UI shows of an evolve run, as artifacts of its flow run:

- a progress artifact, updated in place after every generation;
- per generation a table artifact (each candidate: task run name, fitness, accuracy, seconds,
  error), key ``{run}-candidates`` (one version per generation);
- a markdown artifact with the best recipe so far and the fitness over generations: a chart (a
  PNG inlined as a ``data:`` URI, so the UI shows it without leaving the page) and a table, key
  ``{run}-best``;
- at the end a markdown artifact with the final chart and where the run store keeps the report,
  key ``{run}-plot``.

``{run}`` is the run key plus a short hash of the run's store location, so two runs never share
an artifact key (a chain's stages, or one run key on two storages), while a resumed run continues
its own keys. The rendering functions are pure (tested without an API); `RunMonitor` publishes
them.
"""

from __future__ import annotations

import base64
import hashlib
import io
import re
from collections.abc import Sequence
from typing import Any

import yaml

BARS = " ▏▎▍▌▋▊▉█"
CHART_WIDTH = 24


def slug(text: str) -> str:
    """`text` as lowercase letters, digits and dashes (artifact keys, limit names)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "run"


def artifact_key(run_key: str, what: str, where: str = "") -> str:
    """A valid artifact key for a run's artifact; with `where` (the run's store URL) a short hash
    of it makes the key unique to that run."""
    tag = f"-{hashlib.sha256(where.encode()).hexdigest()[:8]}" if where else ""
    return f"{slug(run_key)}{tag}-{what}"


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


def chart_image(summaries: Sequence[dict[str, Any]]) -> str:
    """Markdown of the fitness-over-generations plot as an inline PNG (`data:` URI)."""
    from evomerge_core.runs.report import plot_fitness

    buf = io.BytesIO()
    plot_fitness(list(summaries), buf)  # type: ignore[arg-type]  # savefig takes a file object too
    return f"![fitness over generations](data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()})"


def best_markdown(run_key: str, best: dict[str, Any] | None, summaries: Sequence[dict[str, Any]], total: int,
                  chart: str = "") -> str:
    """The markdown artifact: the best so far, the fitness over generations (`chart`: an image
    line from `chart_image`, shown first so it is in view when the page opens), the best recipe
    and a table per generation."""
    done = len(summaries)
    lines = [f"# {run_key}: generation {done} of {total}", ""]
    if best is None:
        lines += ["No successful candidate yet.", ""]
    else:
        lines += [f"**Best so far:** fitness {best['fitness']:.4f} (generation {best['generation'] + 1}, "
                  f"candidate {best['index']}, task run `eval-g{best['generation']}-c{best['index']}`)", ""]
    lines += ([chart, ""] if chart else [])
    if best is not None and best.get("recipe"):
        lines += ["Recipe (mergekit YAML):", "", "```yaml", yaml.safe_dump(best["recipe"], sort_keys=False).rstrip(),
                  "```", ""]
    return "\n".join(lines + ["## Fitness over generations", "", fitness_chart(summaries), ""])


class RunMonitor:
    """Publishes a run's artifacts from inside its flow run."""

    def __init__(self, run_key: str, total: int, done: int = 0, where: str = "",
                 summaries: list[dict[str, Any]] | None = None) -> None:
        from prefect.artifacts import create_progress_artifact

        self.run_key = run_key
        self.where = where
        self.total = max(total, 1)
        self.summaries: Sequence[dict[str, Any]] = summaries if summaries is not None else []  # the run's own list
        self.progress_id = create_progress_artifact(
            progress=100.0 * done / self.total, key=self.key("progress"),
            description=f"{run_key}: generations done of {total}")

    def key(self, what: str) -> str:
        return artifact_key(self.run_key, what, self.where)

    def generation(self, records: Sequence[dict[str, Any]], summaries: Sequence[dict[str, Any]],
                   best: dict[str, Any] | None) -> None:
        """After a generation's checkpoint: its table, the progress and the best-so-far markdown."""
        from prefect.artifacts import create_markdown_artifact, create_table_artifact, update_progress_artifact

        summary = summaries[-1]
        self.summaries = summaries
        g = summary["generation"] + 1
        create_table_artifact(
            table=candidate_rows(records), key=self.key("candidates"),
            description=f"{self.run_key} generation {g}: {summary['candidates']} candidates, "
                        f"best {_fmt(summary.get('best_fitness'))}, {summary['seconds']:.1f} s")
        update_progress_artifact(self.progress_id, progress=100.0 * g / self.total,
                                 description=f"{self.run_key}: generation {g} of {self.total}")
        # No description on the artifacts with the inline chart: the UI (Prefect 3.9) renders a
        # markdown artifact that has both a description and a data: image as an empty page.
        create_markdown_artifact(markdown=best_markdown(self.run_key, best, summaries, self.total, chart_image(summaries)),
                                 key=self.key("best"))

    def finished(self, plot_url: str | None) -> None:
        """At the end: the final fitness chart inline, and where the report is (when one was written)."""
        from prefect.artifacts import create_markdown_artifact

        if plot_url and self.summaries:
            md = "\n".join([f"# {self.run_key}: fitness over generations", "", chart_image(self.summaries), "",
                            f"The same plot and `report.md` are in the run store: `{plot_url}`", ""])
            create_markdown_artifact(markdown=md, key=self.key("plot"))
