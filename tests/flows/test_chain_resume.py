"""A chained run (PS then DFS) interrupted in its DFS stage resumes: the finished PS stage is
reused as it is, the DFS stage continues from its run store (no stored evaluation redone), and
the result equals an uninterrupted run's."""

from __future__ import annotations

import re

import pytest

from test_dfs_flow import COLUMNS

from evomerge_core.runs import faults
from evomerge_core.kinds.cache import clear_model_cache
from evomerge_core.runs.faults import InjectedFault


def _chain(family, data, storage, run_key: str) -> dict:
    return {
        "run_key": run_key,
        "storage": f"file://{storage}",
        "sources": [{"model": str(family["base"]), "base": True}, {"model": str(family["ft1"])},
                    {"model": str(family["ft2"])}],
        "optimizer": {"popsize": 3, "seed": 2, "generations": 1},
        "fitness": {"dataset": {"path": str(data["train"]), "columns": COLUMNS}, "scorer": "logprob",
                    "accuracy_scorer": "none", "batch_size": 4},
        "output": {"report": False},
        "stages": [
            {"name": "ps", "space": {"ps": {"method": "dare_ties", "params": ["density", "weight"]}}},
            {"name": "dfs", "space": {"dfs": {"model_a": "@ps", "model_b": str(family["ft2"]), "r": 1}},
             "optimizer": {"popsize": 4, "seed": 3, "generations": 2}},
        ],
    }


def _strip(history):
    return [{k: h[k] for k in ("stage", "generation", "index", "genome", "fitness")} for h in history]


def test_chained_run_interrupted_in_its_dfs_stage_resumes_to_the_same_result(tiny_family, tiny_dataset, tmp_path,
                                                                             monkeypatch, capsys):
    from evomerge.flows.evolve import evolve

    clear_model_cache()
    reference = evolve(_chain(tiny_family, tiny_dataset, tmp_path / "ref", "chain"))

    # stage 0 stores 3 evaluations; the 5th stored one is the DFS stage's 2nd (generation 1 of 2)
    monkeypatch.setenv("EVOMERGE_FAULT", "fail_after_candidates:5")
    faults.reset_counts()
    clear_model_cache()
    with pytest.raises(Exception) as failed:
        evolve(_chain(tiny_family, tiny_dataset, tmp_path / "run", "chain"))
    assert isinstance(failed.value, InjectedFault) or "injected failure" in str(failed.value)
    stage0 = tmp_path / "run" / "chain" / "stages" / "0" / "result.json"
    assert stage0.is_file() and not (tmp_path / "run" / "chain" / "result.json").exists()
    stage0_bytes = stage0.read_bytes()
    stored = len(list((tmp_path / "run" / "chain" / "stages" / "1" / "candidates").glob("*.json")))
    assert stored >= 2

    monkeypatch.delenv("EVOMERGE_FAULT")
    faults.reset_counts()
    clear_model_cache()
    capsys.readouterr()
    resumed = evolve(_chain(tiny_family, tiny_dataset, tmp_path / "run", "chain"))
    out = capsys.readouterr().out
    assert "stage 0 (ps) already finished; reusing its result" in out
    assert stage0.read_bytes() == stage0_bytes  # the finished stage was not run again
    # DFS: 8 evaluations in all; those stored before the failure (at least the 2 counted, the
    # failing task's siblings of generation 1 may also have finished) are reused, not redone
    new, reused = map(int, re.search(r"evaluations: (\d+) new, (\d+) reused from the run store", out).groups())
    assert new + reused == 8 and reused == stored
    assert _strip(resumed["history"]) == _strip(reference["history"])
    assert resumed["best_recipe"]["path"] == reference["best_recipe"]["path"]
    assert resumed["best_fitness"] == reference["best_fitness"]
