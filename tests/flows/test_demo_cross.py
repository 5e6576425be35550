"""The demo's CROSS rows (issue 23): jobs, the search config, the hand-set merges and the
outputs, without building the cross zoo."""

from __future__ import annotations

import json
from pathlib import Path

from evomerge_core.config.schema import parse_run_config
from evomerge_core.toyworld import Zoo
from evomerge_core.toyworld.cross_zoo import CROSS_MAX_NEW_TOKENS
from evomerge_core.toyworld.demo import (
    OPTIONAL_SPACES,
    SPACES,
    cross_baseline_recipes,
    cross_psdfs_search_config,
    cross_search_config,
    write_outputs,
)


def _fake_cross_zoo(root: Path) -> Zoo:
    tasks = {}
    for task in ("union", "skill", "lang", "cross"):
        tasks[task] = {}
        for split in ("train", "validation", "test"):
            path = root / "tasks" / task / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"prompt": "47＋38＝", "answer": "こたえは85"}, ensure_ascii=False) + "\n",
                            encoding="utf-8")
            tasks[task][split] = path
    models = {name: root / "models" / name for name in ("base", "skill_a", "skill_b", "lang")}
    return Zoo(root=root, size="cross", recipe_hash="x", models=models, tasks=tasks,
               max_new_tokens=CROSS_MAX_NEW_TOKENS)


def test_cross_is_an_optional_space_with_its_own_jobs():
    from evomerge.flows.demo import _jobs

    assert "cross" in OPTIONAL_SPACES and "cross" not in SPACES
    assert _jobs(2, ("psdfs", "cross")) == [("psdfs", 0), ("psdfs", 1), ("cross", 0), ("cross", 1)]
    assert _jobs(1, ("cross",)) == [("cross", 0)]
    assert _jobs(2, ("cross", "crossdfs")) == [("crossdfs", 0), ("crossdfs", 1)]  # crossdfs includes cross


def test_cross_row_says_its_target():
    from evomerge.flows.demo import _Evolved

    evolved = _Evolved()
    for value in (0.6, 0.7):
        evolved.add({"cross": value, "skill": 0.8, "lang": 0.0}, 144, 50.0)
    row = evolved.row("cross")
    assert row["target"] == "cross" and row["scores"]["cross"] == [0.6, 0.7]
    assert row["name"].startswith("evolved PS (DARE-TIES, CMA-ES) → CROSS")
    ps = _Evolved()
    ps.add({"union": 0.5}, 144, 1.0)
    assert "target" not in ps.row("ps")


def test_cross_search_config_targets_cross_with_validation_selection(tmp_path):
    zoo = _fake_cross_zoo(tmp_path)
    config = cross_search_config(zoo, seed=1, evaluations=144, storage=(tmp_path / "runs").as_uri(), run_key="k")
    fitness = config["fitness"]
    assert fitness["dataset"]["path"] == str(zoo.tasks["cross"]["train"])
    assert fitness["validation"]["path"] == str(zoo.tasks["cross"]["validation"])
    assert fitness["test"]["path"] == str(zoo.tasks["cross"]["test"])
    assert fitness["selection"] == "validation" and fitness["scorer"] == "exact_match"
    assert fitness["max_new_tokens"] == CROSS_MAX_NEW_TOKENS >= 9
    assert config["space"]["ps"]["method"] == "dare_ties" and config["optimizer"] == {"seed": 1, "evaluations": 144}
    parsed = parse_run_config(config)  # a valid run config
    assert parsed is not None


def test_cross_psdfs_is_the_cross_ps_search_then_dfs_with_lang(tmp_path):
    zoo = _fake_cross_zoo(tmp_path)
    storage = (tmp_path / "runs").as_uri()
    config = cross_psdfs_search_config(zoo, seed=2, ps_evaluations=144, dfs_evaluations=96, storage=storage,
                                       run_key="k")
    ps = cross_search_config(zoo, seed=2, evaluations=144, storage=storage, run_key="k")
    assert config["fitness"] == ps["fitness"] and "space" not in config
    assert [stage["name"] for stage in config["stages"]] == ["ps", "dfs"]
    assert config["stages"][0]["space"] == ps["space"]
    dfs = config["stages"][1]
    assert dfs["space"]["dfs"]["model_a"] == "@ps" and dfs["space"]["dfs"]["model_b"] == str(zoo.models["lang"])
    assert dfs["optimizer"] == {"seed": 2, "evaluations": 96}
    assert parse_run_config(config) is not None


def test_cross_hand_set_merges(tmp_path):
    zoo = _fake_cross_zoo(tmp_path)
    recipes = cross_baseline_recipes(zoo)
    assert len(recipes) == 9
    pair = recipes["TIES (d=0.5, w=1) skill_b+lang"]
    assert pair.merge_method == "ties" and [m.model for m in pair.models] == [str(zoo.models["skill_b"]),
                                                                             str(zoo.models["lang"])]
    assert all(m.parameters == {"density": 0.5, "weight": 1.0} for m in pair.models)
    everything = recipes["task_arithmetic (w=1) skill_a+skill_b+lang"]
    assert len(everything.models) == 3 and everything.models[0].parameters == {"weight": 1.0}


def test_outputs_carry_the_cross_table_and_claims(tmp_path):
    def row(name: str, kind: str, cross: list[float], **extra) -> dict:
        return {"name": name, "kind": kind, "scores": {"cross": cross, "skill": [0.9], "lang": [0.5]},
                "evaluated": 0, "seconds": 1.0, **extra}

    cross_rows = [row("base", "source", [0.12]), row("unoptimised TIES", "merge", [0.50]),
                  row("evolved", "evolved", [0.60, 0.70], space="cross", target="cross", evaluated=144)]
    union = [{"name": "base", "kind": "source", "scores": {t: [0.1] for t in ("union", "cross", "skill", "lang")},
              "evaluated": 0, "seconds": 0.0}]
    paths = write_outputs(tmp_path, union, [], cross_rows=cross_rows)
    data = json.loads(paths["json"].read_text())
    assert data["cross_rows"][-1]["target"] == "cross"
    assert "+53.0 points (target >= +10)" in " ".join(data["claims"])
    assert "+15.0 points (target >= +5)" in " ".join(data["claims"])
    md = paths["markdown"].read_text(encoding="utf-8")
    assert "| model (cross zoo) | CROSS (target) |" in md and "| evolved | 0.650 ± 0.050 |" in md


def test_cross_zoo_seed_option_reaches_the_zoo_build_and_rejects_negatives(monkeypatch):
    import argparse

    import pytest

    from evomerge.flows import cmd_demo, demo as demo_flow
    from evomerge_core.errors import UsageError

    parser = argparse.ArgumentParser()
    cmd_demo.add_arguments(parser)
    assert parser.parse_args([]).cross_zoo_seed == 0
    with pytest.raises(UsageError, match="--cross-zoo-seed"):
        cmd_demo.run(parser.parse_args(["--cross-zoo-seed", "-1", "--spaces", "cross"]))

    built = []
    monkeypatch.setattr(demo_flow, "build_toy_world", lambda size, seed=0: built.append((size, seed)) or "/nowhere")
    monkeypatch.setattr(demo_flow, "load_zoo", lambda root: type("Z", (), {})())
    monkeypatch.setattr(demo_flow, "cross_baseline_recipes", lambda zoo: [])
    monkeypatch.setattr(demo_flow, "score_source", lambda root, name: {"name": name})
    demo_flow._cross_fixed_rows(Path("/tmp/out"), 2)
    assert built == [(demo_flow.CROSS_SIZE, 2)]
