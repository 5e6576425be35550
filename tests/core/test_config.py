"""Run config: defaults from the paper, friendly errors naming the field, the example config."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from evomerge_core.config.schema import DEFAULT_EVALUATIONS, load_run_config, parse_run_config
from evomerge_core.errors import ConfigError, UsageError
from evomerge_core.optim.cmaes import default_popsize
from evomerge_core.spaces import build_space

REPO = Path(__file__).resolve().parents[2]
BASE = {
    "sources": [{"model": "org/base", "base": True}, {"model": "org/a"}, {"model": "org/b"}],
    "fitness": {"dataset": {"path": "data/train.jsonl"}},
}


def cfg(**changes):
    data = copy.deepcopy(BASE)
    data.update(changes)
    return data


def test_defaults_follow_the_paper():
    config = parse_run_config(cfg())
    ps = config.space.ps
    assert ps.method == "dare_ties" and ps.granularity == "model"
    assert ps.x0_of("weight") == 0.5 and ps.bounds_of("density") == (0.0, 1.0)
    assert config.optimizer.sigma0 == pytest.approx(1 / 6)
    space = build_space(config)
    assert space.dim == 4
    assert config.generations(default_popsize(space.dim)) == -(-DEFAULT_EVALUATIONS // default_popsize(4))
    assert config.storage.startswith("file://")
    assert config.effective_run_key().startswith("evolve-")
    assert parse_run_config(cfg()).effective_run_key() == config.effective_run_key()  # stable


@pytest.mark.parametrize(
    "changes, field, hint",
    [
        ({"fitness": {"dataset": {"path": "x"}, "scorrer": "exact_match"}}, "fitness.scorrer", "did you mean 'scorer'"),
        ({"optimiser": {}}, "optimiser", "did you mean 'optimizer'"),
        ({"space": {"ps": {"granularty": "model"}}}, "space.ps.granularty", "did you mean 'granularity'"),
        ({"sources": [{"model": "a", "base": True, "revison": "x"}, {"model": "b"}]}, "sources.0.revison", "keys allowed"),
    ],
)
def test_unknown_keys_name_the_field_and_suggest(changes, field, hint):
    with pytest.raises(ConfigError) as err:
        parse_run_config(cfg(**changes))
    assert field in str(err.value) and hint in str(err.value)


@pytest.mark.parametrize(
    "changes, needle",
    [
        ({"sources": [{"model": "org/a"}, {"model": "org/b"}]}, "needs a base model"),
        ({"space": {"ps": {"bounds": {"density": [0.9, 0.1]}}}}, "space.ps.bounds"),
        ({"space": {"ps": {"bounds": {"density": [0.0, 1.5]}}}}, "valid range"),
        ({"space": {"ps": {"x0": 0.9, "bounds": {"weight": [0.0, 0.5]}}}}, "outside its bounds"),
        ({"space": {"ps": {"params": ["densty"]}}}, "did you mean 'density'"),
        ({"space": {"ps": {"method": "dare_tie"}}}, "did you mean 'dare_ties'"),
        ({"space": {"ps": {"fixed": {"normalise": False}}}}, "did you mean 'normalize'"),
        ({"space": {"ps": {"granularity": {"layer_groups": 0}}}}, "granularity"),
        ({"fitness": {"dataset": {"path": "x"}, "scorer": "exact_mach"}}, "did you mean 'exact_match'"),
        ({"fitness": {"dataset": {"path": "x"}, "scorer": "no_such_module_xyz:fn"}}, "cannot import module"),
        ({"fitness": {"dataset": {"path": "x"}, "options": {"target_script": "klingon"}}}, "target_script"),
        ({"fitness": {"dataset": {"path": "x"}, "prompt_template": "{}"}}, "named placeholders"),
        ({"fitness": {"scorer": "exact_match"}}, "fitness.dataset is required"),
        ({"optimizer": {"generations": 3, "evaluations": 10}}, "not both"),
        ({"optimizer": {"sigma0": 0}}, "optimizer.sigma0"),
        ({"sources": [{"model": "a", "base": True}, {"model": "a"}]}, "listed twice"),
        ({"run_key": "../escape"}, "run_key"),
        ({"storage": "ftp://host/x"}, "storage"),
    ],
)
def test_bad_values_are_rejected_with_the_field_named(changes, needle):
    with pytest.raises(ConfigError) as err:
        parse_run_config(cfg(**changes))
    assert needle in str(err.value)
    assert err.value.exit_code == 2


def test_yaml_errors_and_missing_files(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_run_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sources: [\n  model: x\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_run_config(bad)
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(cfg()))
    assert load_run_config(good).base == "org/base"


def test_lmeval_scorer_names_the_extra_when_missing():
    pytest.importorskip  # keep flake happy
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"pip install evomerge\[lmeval\]"):
            parse_run_config(cfg(fitness={"scorer": "lmeval", "options": {"task": "my_task"}}))
    else:
        config = parse_run_config(cfg(fitness={"scorer": "lmeval", "options": {"task": "my_task"}}))
        assert config.fitness.dataset is None


def test_example_evollm_jp_ps_validates_offline():
    config = load_run_config(REPO / "examples" / "evollm-jp-ps.yaml")
    assert config.base == "mistralai/Mistral-7B-v0.1"
    assert [s.model for s in config.sources[1:]] == [
        "augmxnt/shisa-gamma-7b-v1", "WizardLMTeam/WizardMath-7B-V1.1", "GAIR/Abel-7B-002"]
    assert config.fitness.dataset.path == "SakanaAI/gsm8k-ja-test_250-1319"
    assert config.fitness.test.path == "juletxara/mgsm" and config.fitness.test.name == "ja"
    assert config.fitness.options["target_script"] == "japanese"
    assert config.space.ps.fixed["normalize"] is False
    space = build_space(config)
    assert space.dim == 6 and space.x0 == [0.5] * 6
    assert default_popsize(space.dim) == 9
    assert config.optimizer.evaluations == 1000 and config.generations(9) == 112
    recipe = space.decode([0.83, 0.55, 0.47, 0.72, 0.51, 0.68])  # order: density, weight per model
    assert recipe.merge_method == "dare_ties" and recipe.parameters["normalize"] is False
    assert recipe.models[0].parameters == {"density": 0.83, "weight": 0.55}
