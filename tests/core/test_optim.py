"""CMA-ES wrapper: seeded, bounded, maximising, JSON state that resumes identically."""

from __future__ import annotations

import json

import numpy as np
import pytest

from evomerge_core.errors import ConfigError, StorageError
from evomerge_core.optim.cmaes import CMAES, default_popsize

TARGET = np.array([0.8, 0.2, 0.6, 0.95])


def fitness(x):
    return -float(np.sum((np.asarray(x) - TARGET) ** 2))


def run(generations, seed=3, restore_at=None, disturb=True):
    opt = CMAES([0.5] * 4, sigma0=1 / 6, lower=[0] * 4, upper=[1] * 4, seed=seed)
    seen = []
    for g in range(generations):
        if restore_at == g:
            opt = CMAES.from_state_dict(json.loads(json.dumps(opt.state_dict())))
        if disturb:
            np.random.seed(1000 + g)  # numpy's global state must not matter
            np.random.rand(3)
        xs = opt.ask()
        seen.extend(xs)
        opt.tell(xs, [fitness(x) for x in xs])
    return seen, opt


def test_paper_popsize_and_bounds():
    assert default_popsize(6) == 9 and default_popsize(4) == 8
    seen, _ = run(20)
    arr = np.array(seen)
    assert arr.min() >= 0 and arr.max() <= 1


def test_seeded_runs_are_identical_and_seeds_differ():
    a, _ = run(5)
    b, _ = run(5, disturb=False)
    c, _ = run(5, seed=4)
    assert a == b and a != c


def test_state_dict_resume_is_exact():
    straight, _ = run(12)
    resumed, _ = run(12, restore_at=6)
    assert straight == resumed


def test_pending_ask_survives_a_state_round_trip():
    opt = CMAES([0.5] * 4, sigma0=1 / 6, lower=[0] * 4, upper=[1] * 4, seed=1)
    xs = opt.ask()
    restored = CMAES.from_state_dict(json.loads(json.dumps(opt.state_dict())))
    assert restored.ask() == xs
    restored.tell(xs, [fitness(x) for x in xs])
    assert restored.generation == 1


def test_maximises_towards_the_optimum():
    _, opt = run(60)
    assert np.allclose(opt.best_genome, TARGET, atol=0.02)
    assert opt.best_fitness > -1e-3


def test_tell_checks_its_inputs():
    opt = CMAES([0.5] * 2, sigma0=0.2, lower=[0, 0], upper=[1, 1])
    with pytest.raises(RuntimeError):
        opt.tell([[0.5, 0.5]], [1.0])
    xs = opt.ask()
    with pytest.raises(ValueError, match="finite"):
        opt.tell(xs, [float("nan")] + [0.0] * (len(xs) - 1))
    with pytest.raises(ValueError, match="differ"):
        opt.tell([[0.1, 0.1]] * len(xs), [0.0] * len(xs))


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="reversed"):
        CMAES([0.5], sigma0=0.1, lower=[1], upper=[0])
    with pytest.raises(ConfigError, match="outside"):
        CMAES([2.0], sigma0=0.1, lower=[0], upper=[1])


def test_restricted_unpickler_refuses_foreign_objects():
    import base64
    import os
    import pickle

    opt = CMAES([0.5] * 2, sigma0=0.2, lower=[0, 0], upper=[1, 1])
    state = opt.state_dict()
    state["cma_pickle_b64"] = base64.b64encode(pickle.dumps(os.system)).decode()
    with pytest.raises(StorageError, match="not allowed"):
        CMAES.from_state_dict(state)


def test_an_optimizer_state_stored_before_the_core_was_regrouped_still_resumes():
    """Run stores written when the optimizer lived in `evomerge_core/optim.py` (commit 9d78a7b,
    generation 0 of examples/toyworld-ps.yaml) name the generator `evomerge_core.optim._GeneratorRandn`;
    they load, ask the same next generation on every load, and states written now use that name too."""
    import base64
    from pathlib import Path

    stored = json.loads((Path(__file__).parent / "data" / "optimizer_state_before_regroup.json").read_text())
    assert b"evomerge_core.optim\n" in base64.b64decode(stored["cma_pickle_b64"]) or \
        b"evomerge_core.optim\x94" in base64.b64decode(stored["cma_pickle_b64"])
    first = CMAES.from_state_dict(stored)
    second = CMAES.from_state_dict(stored)
    np.testing.assert_array_equal(np.array(first.ask()), np.array(second.ask()))
    rewritten = base64.b64decode(first.state_dict()["cma_pickle_b64"])
    assert b"evomerge_core.optim.cmaes" not in rewritten and b"_GeneratorRandn" in rewritten
