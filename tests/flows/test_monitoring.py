"""UI monitoring of the evolve flow: artifact rendering (pure) and the artifacts a run leaves
in the Prefect API (table per generation, progress updated in place, best recipe, plot link)."""

from __future__ import annotations

import pytest

from test_evolve import make_config

from evomerge.flows.monitoring import artifact_key, bar, best_markdown, candidate_rows, chart_image, fitness_chart
from evomerge_core.kinds.cache import clear_model_cache

pytestmark = pytest.mark.timeout(300)


def _summary(g: int, best: float | None, mean: float | None) -> dict:
    return {"generation": g, "best_fitness": best, "mean_fitness": mean, "candidates": 2, "seconds": 1.0}


def test_artifact_key_is_valid_for_any_run_key():
    assert artifact_key("My_Run.v2", "best") == "my-run-v2-best"
    assert artifact_key("___", "plot") == "run-plot"


def test_artifact_keys_are_unique_per_run_store():
    # a chain's stages all have run key "0", "1", ... under different stores
    a = artifact_key("0", "best", "file:///runs/chain-a/stages/0")
    b = artifact_key("0", "best", "file:///runs/chain-b/stages/0")
    assert a != b and a.startswith("0-") and a.endswith("-best") and len(a.split("-")[1]) == 8
    assert a == artifact_key("0", "best", "file:///runs/chain-a/stages/0")  # a resume keeps its keys


def test_chart_image_is_an_inline_png():
    import base64

    md = chart_image([_summary(0, -2.0, -3.0), _summary(1, None, None), _summary(2, -1.0, -1.5)])
    prefix = "![fitness over generations](data:image/png;base64,"
    assert md.startswith(prefix) and md.endswith(")")
    png = base64.b64decode(md[len(prefix):-1])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and 5_000 < len(png) < 200_000


def test_bar_scales_and_clamps():
    assert bar(1.0, 0.0, 1.0, width=4) == "████"
    assert bar(0.5, 0.0, 1.0, width=4) == "██"
    assert bar(0.0, 0.0, 1.0, width=4) == "▏"  # never empty
    assert bar(5.0, 0.0, 1.0, width=4) == "████"
    assert bar(0.5625, 0.0, 1.0, width=2) == "█▏"


def test_fitness_chart_tracks_best_so_far_and_failed_generations():
    chart = fitness_chart([_summary(0, -2.0, -3.0), _summary(1, None, None), _summary(2, -1.0, -1.5),
                           _summary(3, -1.5, -1.8)])
    rows = chart.splitlines()[2:]
    assert [r.split("|")[4].strip() for r in rows] == ["-2.0000", "-2.0000", "-1.0000", "-1.0000"]
    assert rows[1].split("|")[2].strip() == "—"
    assert rows[1].split("|")[5].strip() == "failed"
    bars = {i: rows[i].split("`")[1] for i in (0, 2, 3)}
    assert len(bars[0]) < len(bars[3]) < len(bars[2]) == 24


def test_candidate_rows_and_markdown():
    records = [{"generation": 1, "index": 1, "fitness": -0.5, "accuracy": 0.25, "seconds": 0.123, "genome": [0.1, 0.2],
                "error": None},
               {"generation": 1, "index": 0, "fitness": -9.0, "accuracy": None, "seconds": 0.1, "genome": [0.3, 0.4],
                "error": "MergeError: boom"}]
    rows = candidate_rows(records)
    assert [r["candidate"] for r in rows] == ["eval-g1-c0", "eval-g1-c1"]
    assert rows[0]["error"] == "MergeError: boom" and rows[1]["genome"] == "[0.100, 0.200]"
    best = {**records[0], "recipe": {"merge_method": "ties", "models": [{"model": "a"}]}}
    md = best_markdown("r", best, [_summary(0, -1.0, -2.0), _summary(1, -0.5, -0.7)], total=5)
    assert "generation 2 of 5" in md and "fitness -0.5000 (generation 2, candidate 1" in md
    assert "merge_method: ties" in md and "## Fitness over generations" in md
    assert "No successful candidate yet." in best_markdown("r", None, [], total=5)


def test_run_leaves_artifacts_in_the_flow_run(tiny_family, tiny_dataset, tmp_path):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterName

    from evomerge.flows.evolve import evolve

    clear_model_cache()
    cfg = make_config(tiny_family, tiny_dataset, tmp_path, "monitored", output={"materialise_best": False})
    result = evolve(cfg, run_key="monitored")
    with get_client(sync_client=True) as client:
        run = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["evolve-monitored"])))[0]
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
    by_type: dict[str, list] = {}
    for a in arts:
        by_type.setdefault(a.type, []).append(a)
    tables = sorted(by_type["table"], key=lambda a: a.created)
    key = artifact_key("monitored", "candidates", f"file://{tmp_path}/monitored")
    assert len(tables) == 2 and all(a.key == key for a in tables)
    import json

    rows = json.loads(tables[-1].data) if isinstance(tables[-1].data, str) else tables[-1].data
    assert [r["candidate"] for r in rows] == [f"eval-g1-c{i}" for i in range(4)]
    gen1 = [h for h in result["history"] if h["generation"] == 1]
    assert [r["fitness"] for r in rows] == [round(h["fitness"], 4) for h in gen1]
    (progress,) = by_type["progress"]
    assert float(progress.data) == 100.0  # one artifact, updated in place
    best_md = sorted((a for a in arts if a.key == key.replace("-candidates", "-best")), key=lambda a: a.created)
    assert len(best_md) == 2
    assert f"fitness {result['best_fitness']:.4f}" in best_md[-1].data and "generation 2 of 2" in best_md[-1].data
    assert "](data:image/png;base64," in best_md[-1].data  # the chart, visible on the artifact page
    (plot,) = [a for a in arts if a.key == key.replace("-candidates", "-plot")]
    assert plot.type == "markdown" and "](data:image/png;base64," in plot.data and "report/fitness.png" in plot.data
    assert (tmp_path / "monitored/report/fitness.png").is_file()
