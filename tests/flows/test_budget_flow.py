"""`fitness.budget` in the evolve flow: racing rounds, the calibrated item subset and length
caps, costs in records and result.json, and a budgeted run killed mid-generation resumes to
the same history."""

from __future__ import annotations

import json
import re

import pytest

from evomerge_core.runs import faults
from evomerge_core.kinds.cache import clear_model_cache
from evomerge_core.runs.faults import InjectedFault

pytestmark = pytest.mark.timeout(600)  # a shared 2-core box under load runs it 5-10x slower
COLUMNS = {"prompt": "question", "answer": "target"}
KEYS = ("generation", "index", "genome", "fitness", "estimate", "raced_out", "items_evaluated", "generated_tokens")


@pytest.fixture(scope="module")
def budget_data(tmp_path_factory):
    """24 train items (racing needs more than the shared 4-item file)."""
    path = tmp_path_factory.mktemp("budget-data") / "train.jsonl"
    rows = [{"question": f"what is {i} plus {i % 3}? ", "target": str(i + i % 3)} for i in range(24)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _config(family, data, storage, run_key: str, budget: dict, scorer: str = "logprob") -> dict:
    return {
        "run_key": run_key,
        "storage": f"file://{storage}",
        "sources": [{"model": str(family["base"]), "base": True}, {"model": str(family["ft1"])},
                    {"model": str(family["ft2"])}],
        "space": {"ps": {"method": "dare_ties", "params": ["density", "weight"]}},
        "optimizer": {"popsize": 6, "seed": 5, "generations": 3, "sigma0": 0.3},
        "fitness": {"dataset": {"path": str(data), "columns": COLUMNS}, "scorer": scorer,
                    "accuracy_scorer": "none", "batch_size": 8, "max_new_tokens": 6, "stop_strings": ["?"],
                    "budget": budget},
        "output": {"report": False, "materialise_best": False},
    }


BUDGET = {"racing": {"slice": 4, "min_items": 4, "confidence": 0.9}, "subset": {"size": 12}, "final_candidates": 2}


def _strip(history):
    return [{k: h.get(k) for k in KEYS} for h in history]


@pytest.fixture(scope="module")
def reference(tiny_family, budget_data, tmp_path_factory):
    from evomerge.flows.evolve import evolve

    clear_model_cache()
    return evolve(_config(tiny_family, budget_data, tmp_path_factory.mktemp("ref"), "budget", BUDGET))


def test_budgeted_run_races_on_the_subset_and_records_its_cost(reference):
    history = reference["history"]
    gen0 = [h for h in history if h["generation"] == 0]
    later = [h for h in history if h["generation"] > 0]
    assert all(h["items_evaluated"] == 24 for h in gen0)  # calibration: every item
    assert all(h["items_evaluated"] <= 12 and h["items_evaluated"] % 4 == 0 for h in later)
    subset = reference["budget"]["subset"]
    assert len(subset) == 12 and len(set(subset)) == 12
    assert any(h["raced_out"] is not None for h in later), "racing stopped no candidate"
    for g in (1, 2):  # stopped candidates rank below every survivor of their generation
        gen = [h for h in later if h["generation"] == g]
        out = [h["fitness"] for h in gen if h["raced_out"] is not None]
        kept = [h["fitness"] for h in gen if h["raced_out"] is None]
        assert len(kept) >= 3 and (not out or max(out) < min(kept))
    sources = reference["budget"]["calibration_sources"]
    assert sources["items_evaluated"] == 3 * 24 and sources["generated_tokens"] > 0
    checks = reference["budget"]["final_check"]
    assert len(checks) == 2 and all(c["items_evaluated"] == 24 for c in checks)
    assert reference["best_fitness"] == max(c["fitness"] for c in checks)
    cost = reference["cost"]
    assert cost["items_evaluated"] == sum(h["items_evaluated"] for h in history) + 3 * 24 + 2 * 24
    assert cost["generated_tokens"] == (sum(h["generated_tokens"] for h in history) + sources["generated_tokens"]
                                        + sum(c["generated_tokens"] for c in checks))


def test_budgeted_run_killed_mid_generation_resumes_to_the_same_history(reference, tiny_family, budget_data,
                                                                        tmp_path, monkeypatch, capsys):
    from evomerge.flows.evolve import evolve

    # 3 sources + 6 calibration candidates, then generation 1's racing rounds: the 12th stored
    # evaluation is in the middle of generation 1
    monkeypatch.setenv("EVOMERGE_FAULT", "fail_after_candidates:12")
    faults.reset_counts()
    clear_model_cache()
    cfg = _config(tiny_family, budget_data, tmp_path, "budget", BUDGET)
    with pytest.raises(Exception) as failed:
        evolve(cfg)
    assert isinstance(failed.value, InjectedFault) or "injected failure" in str(failed.value)
    assert not (tmp_path / "budget" / "result.json").exists()
    latest = json.loads((tmp_path / "budget" / "latest.json").read_text())
    assert latest["payload"]["generation"] == 0 if "payload" in latest else latest["generation"] == 0

    monkeypatch.delenv("EVOMERGE_FAULT")
    faults.reset_counts()
    clear_model_cache()
    capsys.readouterr()
    resumed = evolve(cfg)
    out = capsys.readouterr().out
    reused = int(re.search(r"evaluations: \d+ new, (\d+) reused from the run store", out).group(1))
    assert reused >= 2  # generation 1's stored round results were reused, not redone
    assert _strip(resumed["history"]) == _strip(reference["history"])
    assert resumed["budget"]["subset"] == reference["budget"]["subset"]
    assert resumed["best_fitness"] == reference["best_fitness"] and resumed["cost"] == reference["cost"]


def test_length_caps_cut_generated_tokens(tiny_family, budget_data, tmp_path):
    from evomerge.flows.evolve import evolve

    clear_model_cache()
    free = evolve(_config(tiny_family, budget_data, tmp_path, "free", {"racing": {"slice": 8, "min_items": 8}},
                          scorer="exact_match"))
    clear_model_cache()
    capped = evolve(_config(tiny_family, budget_data, tmp_path, "capped",
                            {"racing": {"slice": 8, "min_items": 8}, "length_caps": {"margin": 1.0, "extra": 0}},
                            scorer="exact_match"))
    caps = capped["budget"]["caps"]
    assert len(caps) == 24 and all(1 <= c <= 6 for c in caps)
    per_item = [h["generated_tokens"] / h["items_evaluated"] for h in capped["history"] if h["generation"] > 0]
    assert all(t <= max(caps) for t in per_item)
    assert free["cost"]["items_evaluated"] > 0 and free["cost"]["generated_tokens"] > 0


def test_final_mean_scores_the_cma_es_mean_on_the_full_train_split(tiny_family, budget_data, tmp_path):
    from evomerge.flows.evolve import evolve
    from evomerge_core.config.schema import RunConfig
    from evomerge_core.runs.records import MEAN_INDEX
    from evomerge_core.runs.search import make_optimizer
    from evomerge_core.spaces import build_space

    budget = {"racing": {"slice": 4, "min_items": 4, "confidence": 0.8, "max_items": 12},
              "final_candidates": 1, "final_mean": True}
    cfg = _config(tiny_family, budget_data, tmp_path, "mean", budget)
    clear_model_cache()
    result = evolve(cfg)
    checks = result["budget"]["final_check"]
    assert [c["mean"] for c in checks] == [False, True]
    mean_row = checks[1]
    assert mean_row["index"] == MEAN_INDEX and mean_row["generation"] == 2 and mean_row["items_evaluated"] == 24
    assert result["best_fitness"] == max(c["fitness"] for c in checks)
    assert all(h["items_evaluated"] <= 12 for h in result["history"])  # a fresh draw of 12 per generation

    # the checked genome is the CMA-ES mean after the last tell: replay the search's ask/tell
    run_config = RunConfig.model_validate(cfg)
    optimizer = make_optimizer(run_config, build_space(run_config))
    for g in range(3):
        genomes = optimizer.ask()
        told = sorted((h for h in result["history"] if h["generation"] == g), key=lambda h: h["index"])
        assert [h["genome"] for h in told] == [list(x) for x in genomes]
        optimizer.tell(genomes, [h["fitness"] for h in told])
    assert mean_row["genome"] == optimizer.mean
    best_row = next(c for c in checks if c["fitness"] == result["best_fitness"])
    assert result["best_genome"] == best_row["genome"] and result["best_index"] == best_row["index"]
    assert result["cost"]["items_evaluated"] == sum(h["items_evaluated"] for h in result["history"]) + 2 * 24


def test_raced_final_check_scores_generation_winners_and_finishes_only_the_survivors(tiny_family, budget_data,
                                                                                    tmp_path):
    from evomerge.flows.evolve import evolve

    budget = {"racing": {"slice": 4, "min_items": 4, "confidence": 0.8, "max_items": 12},
              "final_candidates": 2, "final_mean": True, "final_racing": {"slice": 6, "confidence": 0.6}}
    clear_model_cache()
    result = evolve(_config(tiny_family, budget_data, tmp_path, "raced-final", budget))
    history = result["history"]
    checks = result["budget"]["final_check"]
    assert [(c["generation"], c["mean"]) for c in checks] == [(1, False), (2, False), (2, True)]
    for row in checks[:2]:  # each of the last two generations' best by its budgeted fitness
        generation = [h for h in history if h["generation"] == row["generation"] and h["raced_out"] is None]
        assert row["index"] == max(generation, key=lambda h: h["fitness"])["index"]
    finished = [c for c in checks if c["raced_out"] is None]
    assert len(finished) < len(checks), "the final check stopped no candidate (seeded: it stops two)"
    assert finished and all(c["items_evaluated"] == 24 and c["fitness"] is not None for c in finished)
    for row in checks:
        if row["raced_out"] is not None:  # stopped after a round: fewer items, a partial estimate, no fitness
            assert row["items_evaluated"] == 6 * (row["raced_out"] + 1) < 24 and row["fitness"] is None
    assert result["best_fitness"] == max(c["fitness"] for c in finished)
    assert result["cost"]["items_evaluated"] == (sum(h["items_evaluated"] for h in history)
                                                 + sum(c["items_evaluated"] for c in checks))


def test_run_killed_in_the_raced_final_check_resumes_to_the_same_result(tiny_family, budget_data, tmp_path,
                                                                        monkeypatch):
    from evomerge.flows.evolve import evolve

    budget = {"racing": {"slice": 4, "min_items": 4, "confidence": 0.8, "max_items": 12},
              "final_candidates": 2, "final_mean": True, "final_racing": {"slice": 6, "confidence": 0.6}}
    clear_model_cache()
    reference = evolve(_config(tiny_family, budget_data, tmp_path / "ref", "final", budget))
    stored = len(list((tmp_path / "ref" / "final" / "candidates").iterdir()))
    final_rounds = sum(-(-c["items_evaluated"] // 6) for c in reference["budget"]["final_check"])
    assert final_rounds >= 4

    # fail after the search's evaluations and two of the final check's rounds
    monkeypatch.setenv("EVOMERGE_FAULT", f"fail_after_candidates:{stored - final_rounds + 2}")
    faults.reset_counts()
    clear_model_cache()
    cfg = _config(tiny_family, budget_data, tmp_path / "run", "final", budget)
    with pytest.raises(Exception) as failed:
        evolve(cfg)
    assert isinstance(failed.value, InjectedFault) or "injected failure" in str(failed.value)
    assert not (tmp_path / "run" / "final" / "result.json").exists()
    latest = json.loads((tmp_path / "run" / "final" / "latest.json").read_text())
    assert latest.get("payload", latest)["generation"] == 2  # every generation was done: it failed in the check
    monkeypatch.delenv("EVOMERGE_FAULT")
    faults.reset_counts()
    clear_model_cache()
    resumed = evolve(cfg)
    assert _strip(resumed["history"]) == _strip(reference["history"])
    assert resumed["budget"]["final_check"] == reference["budget"]["final_check"]
    assert resumed["best_fitness"] == reference["best_fitness"] and resumed["cost"] == reference["cost"]
