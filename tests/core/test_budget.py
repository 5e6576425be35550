"""fitness.budget's pure parts: the item model and subset, racing decisions, the fitness told
to CMA-ES, per-item generation caps and the config checks."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from evomerge_core.fitness.budget import irt, plan
from evomerge_core.fitness.budget.config import BudgetConfig
from evomerge_core.fitness.budget.racing import beats, run_race, to_stop, told_fitness
from evomerge_core.config.schema import FitnessConfig, parse_run_config
from evomerge_core.errors import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_models import make_tiny_llama  # noqa: E402


def _2pl_world(seed=0, models=40, items=300):
    rng = np.random.default_rng(seed)
    a, b = rng.uniform(0.0, 2.5, items), rng.normal(size=items)
    theta = rng.normal(size=models)
    p = 1 / (1 + np.exp(-(a * theta[:, None] - b)))
    return a, b, (rng.random(p.shape) < p).astype(float), rng


def test_2pl_fit_recovers_discrimination_and_irt_subset_beats_random_items():
    a, b, y, rng = _2pl_world()
    model = irt.fit(y)
    assert model.kind == "2pl"
    assert np.corrcoef(model.a, a)[0, 1] > 0.7  # discriminations recovered
    thetas = list(np.linspace(-1, 1, 9))
    chosen = irt.select_items(model, thetas, 30)
    assert len(set(chosen)) == 30 and np.mean(a[chosen]) > np.mean(a) + 0.5
    # estimate full-set scores of new models from 30 items: IRT subset vs random 30-item subsets
    errs_irt, errs_rand = [], []
    for t in np.linspace(-1, 1, 15):
        p = 1 / (1 + np.exp(-(a * t - b)))
        yn = (rng.random(len(a)) < p).astype(float)
        errs_irt.append(abs(irt.estimate(model, chosen, yn[chosen]) - yn.mean()))
        rand = rng.choice(len(a), 30, replace=False)
        errs_rand.append(abs(yn[rand].mean() - yn.mean()))
    assert np.mean(errs_irt) < np.mean(errs_rand)


def test_linear_item_model_for_graded_values_estimates_the_full_mean():
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0, 1, 200), rng.normal(-2, 1, 200)
    theta = rng.normal(size=12)
    y = b + a * theta[:, None] + 0.05 * rng.normal(size=(12, 200))
    model = irt.fit(y)
    assert model.kind == "linear"
    items = irt.select_items(model, [0.0], 20)
    yn = b + a * 0.7 + 0.05 * rng.normal(size=200)
    assert irt.estimate(model, items, yn[items]) == pytest.approx(yn.mean(), abs=0.02)
    assert irt.ItemModel.from_dict(model.to_dict()).predict(0.3).tolist() == model.predict(0.3).tolist()


def test_paired_racing_stops_only_candidates_beaten_by_mu_others():
    base = [0.1 * ((i * 7) % 5) for i in range(20)]  # item difficulty shared by every candidate
    values = {i: [v + 0.05 * i + 0.01 * ((i + j) % 3) for j, v in enumerate(base)] for i in range(6)}
    assert beats(values[5], values[0], 1.645) and not beats(values[0], values[5], 1.645)
    stopped = to_stop(values, list(range(6)), 3, confidence=0.95, min_items=10)
    assert stopped == [0, 1, 2]  # each beaten by the 3 best; the 3 best stay
    assert to_stop(values, list(range(6)), 3, confidence=0.95, min_items=30) == []  # too few items yet
    assert to_stop({0: [1.0, 1.0], 1: [1.0, 1.0]}, [0, 1], 1, confidence=0.95, min_items=2) == []  # ties


def test_racing_never_leaves_fewer_than_mu_survivors():
    values = {0: [1.0] * 10, 1: [0.0] * 10, 2: [0.5] * 10}  # zero-variance differences: all "confident"
    assert to_stop(values, [0, 1, 2], 2, confidence=0.95, min_items=5) == [1]


def test_told_fitness_ranks_stopped_below_survivors_keeping_their_order():
    told = told_fitness({0: 0.9, 1: 0.5, 2: 0.95, 3: 0.2}, stopped={2, 3}, failed={4: -1e4})
    assert told[0] == 0.9 and told[1] == 0.5 and told[4] == -1e4
    assert told[2] < told[1] and told[3] < told[2]  # below every survivor, order kept
    assert told[2] - told[3] == pytest.approx(0.95 - 0.2)


def test_run_race_evaluates_only_survivors_round_after_round():
    asked = []

    def evaluate(alive, r):
        asked.append((r, list(alive)))
        return {i: {"scores": [float(i) + 0.01 * ((i + j) % 2) for j in range(5)], "tokens": [1] * 5, "error": None}
                for i in alive}

    racing = BudgetConfig(racing={"slice": 5, "min_items": 5}).racing
    results, stopped = run_race(range(4), [[0] * 5] * 3, evaluate, 2, racing)
    assert asked[0] == (0, [0, 1, 2, 3]) and asked[1] == (1, [2, 3]) and len(asked) == 3
    assert stopped == {0: 0, 1: 0} and len(results[3]) == 3 and len(results[0]) == 1


def test_plan_calibrates_subset_and_caps_and_is_json_round_trip():
    budget = BudgetConfig(subset={"size": 3}, racing={"slice": 2, "min_items": 2}, length_caps={"margin": 1.5, "extra": 1})
    state = plan.BudgetState(n_items=6)
    assert plan.generation_items(budget, state, 0, seed=1) == list(range(6))
    assert plan.rounds_of(budget, 0, list(range(6))) == [list(range(6))]  # calibration: no racing
    state.calibration = [[0, 0, 1, 1, 0, 1], [0, 1, 1, 0, 0, 1], [0, 1, 0, 1, 0, 1], [1, 1, 1, 1, 0, 1]]
    state.needed = [[2, 3, 2, 8, 1, 2]] * 4
    plan.calibrate(budget, state, seed=1, max_new_tokens=8)
    assert len(state.subset) == 3 and not {4, 5} & set(state.subset)  # items every model answers alike say nothing
    assert state.caps == [4, 6, 4, 8, 3, 4]  # ceil(1.5 * need) + 1; an item that hit the cap keeps it
    again = plan.BudgetState.from_dict(state.to_dict())
    assert plan.generation_items(budget, again, 1, seed=1) == state.subset
    assert plan.rounds_of(budget, 1, state.subset) == [state.subset[:2], state.subset[2:]]


def test_greedy_generate_per_prompt_caps_equal_single_prompt_decoding(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge_core.generation.hf_loop import greedy_generate

    torch.set_num_threads(1)
    path = make_tiny_llama(tmp_path / "m", seed=0)
    model, tok = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    prompts = ["what is 1 plus 1? ", "what is 22 plus 3? ", "hi ", "what is 5 plus 5? "]
    caps = [1, 6, 3, 2]
    stats: dict = {}
    out = greedy_generate(model, tok, prompts, max_new_tokens=caps, stop_strings=(), batch_size=4, stats=stats)
    alone = [greedy_generate(model, tok, [p], max_new_tokens=c, stop_strings=(), batch_size=1)[0]
             for p, c in zip(prompts, caps)]
    assert out == alone
    assert stats["row_tokens"] == caps and stats["generated_tokens"] == sum(caps)  # no stop string: each runs to its cap
    plain = greedy_generate(model, tok, prompts, max_new_tokens=6, stop_strings=(), batch_size=4)
    assert plain == greedy_generate(model, tok, prompts, max_new_tokens=[6] * 4, stop_strings=(), batch_size=4)
    with pytest.raises(ValueError, match="one per prompt"):
        greedy_generate(model, tok, prompts, max_new_tokens=[1, 2])


def _fitness(**over):
    return {"dataset": {"path": "d.jsonl", "columns": {"prompt": "q", "answer": "a"}}, "scorer": "logprob",
            "accuracy_scorer": "none", **over}


@pytest.mark.parametrize("fitness, message", [
    (_fitness(minibatch=10, budget={"racing": True}), "remove fitness.minibatch"),
    (_fitness(budget={"racing": {"confidence": 1.5}}), "confidence"),
    (_fitness(budget={"subset": {"size": 0}}), "size"),
    (_fitness(budget={"race": {}}), "race"),
    (_fitness(scorer="rouge_l", budget={"racing": True}), "per-item"),
    (_fitness(scorer="rouge_l", budget={"final_racing": True}), "final_racing"),
    (_fitness(budget={"final_racing": {"slice": 1}}), "slice"),
])
def test_bad_budget_config_is_one_clear_error(fitness, message):
    cfg = {"sources": [{"model": "a", "base": True}, {"model": "b"}],
           "space": {"ps": {"method": "task_arithmetic", "params": ["weight"]}}, "fitness": fitness}
    with pytest.raises(ConfigError, match=message):
        parse_run_config(cfg)


def test_budget_off_by_default_and_absent_from_the_config_dump():
    assert FitnessConfig().budget is None and "budget" not in FitnessConfig().model_dump()
    assert FitnessConfig(budget={"racing": True}).budget.racing.slice == 10


def test_answer_line_caps_stop_rows_at_the_newline_only_in_budgeted_scoring(tmp_path, monkeypatch):
    import json

    from evomerge_core.fitness import registry
    from evomerge_core.fitness.evaluator import Fitness

    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"q": f"{i}+1=", "a": str(i + 1)}) for i in range(3)) + "\n")
    seen = []

    def fake_generate(model, tokenizer, prompts, *, max_new_tokens, stop_strings, batch_size, stats):
        seen.append((tuple(stop_strings), max_new_tokens))
        stats["row_tokens"] = [2] * len(prompts)
        return ["1\n"] * len(prompts)

    monkeypatch.setattr("evomerge_core.fitness.registry.greedy_generate", fake_generate)  # where ScoreContext calls it
    cfg = FitnessConfig(dataset={"path": str(path), "columns": {"prompt": "q", "answer": "a"}}, scorer="exact_match",
                        stop_strings=["="], budget={"length_caps": {"answer_line": True}})
    fit = Fitness(cfg)
    out = fit.score_items(None, None, max_new_tokens=[3, 4, 5])
    assert out == {"scores": [1.0, 0.0, 0.0], "tokens": [2, 2, 2]}
    assert seen[-1] == (("=", "\n"), [3, 4, 5])
    fit.score(None, None)  # the full-split fitness (final check) keeps the configured stops and cap
    assert seen[-1] == (("=",), 256)
    assert registry.get_scorer("exact_match").per_item is not None


def test_anchor_items_cover_clusters_and_weigh_them_by_size():
    rng = np.random.default_rng(3)
    profiles = rng.normal(size=(3, 8))  # three kinds of items, each separating the 8 models its own way
    kinds = [0] * 60 + [1] * 30 + [2] * 10
    y = np.stack([profiles[k] + 0.01 * rng.normal(size=8) for k in kinds], axis=1)  # models x items
    anchors, weights = irt.anchor_items(y, 3)
    assert sorted(kinds[a] for a in anchors) == [0, 1, 2]
    assert weights == pytest.approx([0.6, 0.3, 0.1]) and [kinds[a] for a in anchors] == [0, 1, 2]
    state = plan.BudgetState(n_items=100, subset=anchors, weights=weights)
    budget = BudgetConfig(subset={"size": 3, "method": "anchors"})
    assert plan.estimate(budget, state, anchors, [1.0, 0.0, 0.0]) == pytest.approx(0.6)
    assert plan.estimate(budget, state, anchors[1:], [1.0, 0.0]) == pytest.approx(0.75)  # seen anchors only
    assert plan.item_weights(state)[anchors[0]] == pytest.approx(1.8)


def test_racing_without_subset_takes_a_fresh_seeded_draw_per_generation():
    budget = BudgetConfig(racing={"slice": 4, "min_items": 4, "max_items": 12})
    state = plan.BudgetState(n_items=50)
    g1, g2 = (plan.generation_items(budget, state, g, seed=3) for g in (1, 2))
    assert len(g1) == 12 == len(set(g1)) and g1 != g2 and not budget.calibrates
    assert g1 == plan.generation_items(budget, plan.BudgetState(n_items=50), 1, seed=3)  # same on resume
    assert [len(r) for r in plan.rounds_of(budget, 1, g1)] == [4, 4, 4]


def _record(generation, index, fitness):
    from evomerge_core.runs.records import CandidateRecord

    return CandidateRecord(generation=generation, index=index, genome=[0.1 * index], fitness=fitness)


def test_final_candidates_are_generation_winners_when_generations_draw_their_own_items():
    # generation 2 drew easy items: every estimate there is higher than generation 1's best
    eligible = [_record(0, 0, -0.5), _record(0, 1, -0.4), _record(1, 0, -0.3), _record(1, 1, -0.35),
                _record(2, 0, -0.1), _record(2, 1, -0.05), _record(2, 2, -0.2)]
    fresh = FitnessConfig(**_fitness(budget={"racing": {"max_items": 8}, "final_candidates": 2}))
    assert plan.draws_per_generation(fresh)
    assert [(r.generation, r.index) for r in plan.final_candidates(fresh, eligible)] == [(1, 0), (2, 1)]
    minibatch = FitnessConfig(**_fitness(minibatch=8, budget={"final_candidates": 3}))
    assert [(r.generation, r.index) for r in plan.final_candidates(minibatch, eligible)] == [(0, 1), (1, 0), (2, 1)]
    same_items = FitnessConfig(**_fitness(budget={"racing": True, "final_candidates": 2}))  # every item, each generation
    assert not plan.draws_per_generation(same_items)
    assert [(r.generation, r.index) for r in plan.final_candidates(same_items, eligible)] == [(2, 1), (2, 0)]


def test_final_rounds_take_every_item_once_in_a_seeded_order():
    rounds = plan.final_rounds(50, 20, seed=4)
    assert [len(r) for r in rounds] == [20, 20, 10]
    assert sorted(j for r in rounds for j in r) == list(range(50))
    assert rounds == plan.final_rounds(50, 20, seed=4) and rounds != plan.final_rounds(50, 20, seed=5)
    assert BudgetConfig(final_racing=True).final_racing.slice == 40
