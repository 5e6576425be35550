"""Typed run records (evomerge_core.runs.records): the dict form round-trips key for key and in
order, and the record builders of runs/search.py give the documented JSON."""

from __future__ import annotations

import json
import math

from evomerge_core.runs import search
from evomerge_core.runs.records import CandidateRecord, GenerationSummary, RunResult
from evomerge_core.runs.store import canonical_json


def _evaluated(generation: int, index: int, fitness: float, **over) -> dict:
    """A candidate dict in the evaluator's key order (kinds/evaluate.py)."""
    record = {"generation": generation, "index": index, "genome": [0.25, 0.5], "values": {"w": [0.25]},
              "recipe": {"merge_method": "linear"}, "fitness": fitness, "accuracy": fitness / 2, "metrics": {"m": 1},
              "n_items": 4, "items_evaluated": 4, "generated_tokens": 12, "seconds": 0.5, "error": None}
    record.update(over)
    return record


def test_candidate_round_trips_unknown_keys_and_order():
    raw = _evaluated(3, 1, 0.75, split="test", scorer_note="kept")  # a scorer's own key is kept
    raw = {"index": raw.pop("index"), **raw}  # an unusual order is kept too
    rec = CandidateRecord.from_dict(raw)
    assert (rec.generation, rec.index, rec.fitness, rec.split) == (3, 1, 0.75, "test")
    assert rec.extra == {"scorer_note": "kept"}
    assert rec.to_json() == json.dumps(raw)
    assert CandidateRecord.from_json(rec.to_json()).to_dict() == raw
    assert {**rec} == raw and rec["scorer_note"] == "kept" and rec.get("estimate") is None and "estimate" not in rec


def test_candidate_replace_and_at_behave_like_dict_updates():
    raw = _evaluated(0, 2, 0.5)
    rec = CandidateRecord.from_dict(raw)
    moved = rec.at(4, 7)
    assert moved.to_json() == json.dumps({**raw, "generation": 4, "index": 7})
    validated = rec.replace(validation={"fitness": 0.4})
    assert validated.to_json() == json.dumps({**raw, "validation": {"fitness": 0.4}})
    assert rec.to_dict() == raw  # the original is unchanged


def test_candidate_ok_matches_failures():
    assert CandidateRecord.from_dict(_evaluated(0, 0, 0.5)).ok
    assert not CandidateRecord.from_dict(_evaluated(0, 0, -math.inf)).ok
    assert not CandidateRecord.from_dict(_evaluated(0, 0, 0.1, error="ValueError: x")).ok


def test_summary_of_a_generation_is_the_documented_dict():
    records = [CandidateRecord.from_dict(_evaluated(2, i, f)) for i, f in enumerate([0.5, 0.75, 0.25])]
    records.append(CandidateRecord.from_dict(_evaluated(2, 3, -math.inf, error="RuntimeError: boom")))
    summary = search.summarise_generation(2, records, 1.23456)
    expected = {"generation": 2, "best_fitness": 0.75, "best_index": 1, "mean_fitness": 0.5, "best_accuracy": 0.375,
                "mean_accuracy": 0.25, "failed": 1, "candidates": 4, "seconds": 1.235}
    assert summary.to_json() == json.dumps(expected)
    with_validation = search.summarise_generation(2, records, 1.0, {**_evaluated(2, 1, 0.6), "split": "validation"})
    assert list(with_validation)[-1] == "validation"
    assert with_validation["validation"] == {"generation": 2, "index": 1, "fitness": 0.6, "accuracy": 0.3,
                                             "n_items": 4, "error": None}
    assert GenerationSummary.from_json(summary.to_json()).to_dict() == expected


def test_summary_of_an_older_run_store_keeps_its_keys():
    old = {"generation": 0, "best_fitness": 0.5, "best_index": 0, "mean_fitness": 0.5, "failed": 0, "candidates": 1,
           "seconds": 0.1}  # written before best/mean accuracy existed
    assert json.dumps(GenerationSummary.from_dict(old).to_dict()) == json.dumps(old)


def test_trackers_pick_the_first_best():
    records = [CandidateRecord.from_dict(_evaluated(0, i, f)) for i, f in enumerate([0.5, 0.75, 0.75])]
    best = search.BestTracker()
    best.update(records)
    assert best.record is records[1]
    validation = search.ValidationTracker()
    validation.update(records, {**_evaluated(0, 2, 0.9), "split": "validation"})
    assert validation.record.index == 2 and validation.record.validation["fitness"] == 0.9
    assert list(validation.record)[-1] == "validation"


def test_run_result_round_trips_extra_sections():
    raw = {"run_key": "r", "config_hash": "h", "best_fitness": 0.5, "best_accuracy": None, "best_genome": [0.1],
           "best_values": None, "best_recipe": {"merge_method": "linear"}, "best_generation": 0, "best_index": 0,
           "selection": "train", "best_validation": None, "evaluations": 1, "cost": {"items_evaluated": 4,
           "generated_tokens": 0}, "space": {"dim": 1}, "generations": [], "test": None, "best_model": None,
           "history": [], "budget": {"final_check": []}}
    result = RunResult.from_dict(raw)
    assert result.extra == {"budget": {"final_check": []}}
    assert canonical_json(result.to_dict()) == canonical_json(raw) and result.to_json() == json.dumps(raw)
    assert RunResult.from_dict(result) is result


def test_best_label_names_a_candidate_or_the_cma_es_mean():
    from evomerge_core.runs.records import MEAN_INDEX, best_label

    assert best_label(4, 2) == "generation 5, candidate 2"
    assert best_label(15, MEAN_INDEX) == "the CMA-ES mean after generation 16"
