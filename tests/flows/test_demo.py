"""The demo flow on the micro toy world: it writes the Table-1 outputs, its searches run as
independent jobs on two worker processes, and the evolved merge beats every source model on
UNION train (the split the search selects on)."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def micro_demo(tmp_path_factory, monkeypatch_module):
    import torch

    torch.set_num_threads(1)
    cache = tmp_path_factory.mktemp("zoo-cache")
    monkeypatch_module.setenv("EVOMERGE_CACHE", str(cache))
    from evomerge.flows.demo import demo

    out = tmp_path_factory.mktemp("demo-out")
    result = demo(out_dir=str(out), size="micro", seeds=1, evaluations=54, dfs_evaluations=16,
                  spaces=("psdfs", "dfs"))
    return out, result


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_demo_writes_table_json_and_plot(micro_demo):
    out, result = micro_demo
    names = [row["name"] for row in result["rows"]]
    assert names[:4] == ["base", "skill_a", "skill_b", "lang"]
    assert sum(row["kind"] == "merge" for row in result["rows"]) == 3
    evolved = {row["space"]: row for row in result["rows"] if row["kind"] == "evolved"}
    assert list(evolved) == ["ps", "psdfs", "dfs", "dfs_noscale"]
    assert evolved["ps"]["evaluated"] == 54
    assert all(row["evaluated"] >= 16 for row in evolved.values())
    assert all(set(row["scores"]) == {"union", "skill", "lang", "cross"} for row in evolved.values())
    assert all(len(values) == 1 for row in evolved.values() for values in row["scores"].values())
    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    claims = saved["claims"]
    assert len(claims) == 4 and "PS+DFS vs evolved PS" in claims[2] and "scales ablation" in claims[3]
    table = (out / "results.md").read_text()
    assert table.count("\n| ") == 1 + len(names)  # header + one line per model
    assert (out / "fitness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evolved_merge_beats_every_source_on_union_train(micro_demo):
    out, _ = micro_demo
    from evomerge_core.toyworld import build_zoo, evaluate_exact_match

    zoo = build_zoo("micro", progress=False)
    rows = zoo.rows("union", "train")
    sources = {name: evaluate_exact_match(zoo.models[name], None, rows) for name in ("base", "skill_a", "skill_b", "lang")}
    evolved = evaluate_exact_match(out / "evolved" / "ps" / "seed0", None, rows)
    assert evolved > max(sources.values()), (evolved, sources)


def test_psdfs_row_comes_from_a_chained_run_whose_dfs_stage_starts_from_the_ps_model(micro_demo):
    from evomerge_core.runs.store import RunStore

    out, _ = micro_demo
    storage = (out / "runs").as_uri()
    result = RunStore(storage, "demo-micro-psdfs-seed0").read_json("result.json")
    assert [s["kind"] for s in result["stages"]] == ["ps", "dfs"]
    ps_best = result["stages"][0]["best_model"]
    assert result["lineage"][1]["sources"][0] == ps_best
    ablation = RunStore(storage, "demo-micro-dfs_noscale-seed0").read_json("result.json")
    assert ablation["space"]["scales"] == "none"
    assert all(hop["scale"] == 1.0 for hop in ablation["best_recipe"]["path"])


def test_searches_are_split_into_independent_jobs_longest_first():
    from evomerge.flows.demo import _jobs

    assert _jobs(2, ("ps", "psdfs", "dfs", "vlm")) == [
        ("psdfs", 0), ("psdfs", 1), ("vlm", 0), ("vlm", 1),
        ("dfs", 0), ("dfs_noscale", 0), ("dfs", 1), ("dfs_noscale", 1)]
    assert _jobs(1, ("ps",)) == [("ps", 0)]  # PS alone: its own job (psdfs includes it otherwise)


def test_budget_rows_are_jobs_with_their_cost_per_seed_and_marks():
    from evomerge.flows.demo import _Evolved, _jobs

    assert _jobs(2, ("ps", "budget")) == [("ps", 0), ("ps", 1), ("ps_budget", 0), ("ps_random", 0),
                                          ("ps_budget", 1), ("ps_random", 1)]
    rows = {}
    for kind in ("ps", "ps_budget", "ps_random"):
        evolved = _Evolved()
        for seed in range(2):
            evolved.add({"union": 0.5}, 144, 1.0, {"items_evaluated": 100 * (seed + 1), "generated_tokens": 7 + seed})
        rows[kind] = evolved.row(kind)
    assert rows["ps"]["items_evaluated"] == [100, 200] and rows["ps"]["generated_tokens"] == [7, 8]
    assert "budgeted" not in rows["ps"]
    assert rows["ps_budget"]["budgeted"] is True and rows["ps_random"]["budgeted"] == "random"
