"""The demo flow on the micro toy world: it writes the Table-1 outputs, and the evolved merge
beats every source model on UNION train (the split the search selects on)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def micro_demo(tmp_path_factory, monkeypatch_module):
    import torch

    torch.set_num_threads(1)
    cache = tmp_path_factory.mktemp("zoo-cache")
    monkeypatch_module.setenv("EVOMERGE_CACHE", str(cache))
    from evomerge.flows.demo import demo

    out = tmp_path_factory.mktemp("demo-out")
    result = demo(out_dir=str(out), size="micro", seeds=1, evaluations=54)
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
    evolved = result["rows"][-1]
    assert evolved["kind"] == "evolved" and evolved["evaluated"] == 54
    assert set(evolved["scores"]) == {"union", "skill", "lang", "cross"}
    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    assert len(saved["claims"]) == 2
    table = (out / "results.md").read_text()
    assert table.count("\n| ") == 1 + len(names)  # header + one line per model
    assert (out / "fitness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evolved_merge_beats_every_source_on_union_train(micro_demo):
    out, _ = micro_demo
    from evomerge_core.toyworld import build_zoo, evaluate_exact_match

    zoo = build_zoo("micro", progress=False)
    rows = zoo.rows("union", "train")
    sources = {name: evaluate_exact_match(zoo.models[name], None, rows) for name in ("base", "skill_a", "skill_b", "lang")}
    evolved = evaluate_exact_match(out / "evolved" / "seed0", None, rows)
    assert evolved > max(sources.values()), (evolved, sources)
