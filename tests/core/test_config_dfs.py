"""Run config: the DFS space, chained stages (PS then DFS), minibatch/validation fitness,
and the paper's PS+DFS example (validated offline, nothing downloaded)."""

from __future__ import annotations

from pathlib import Path

import pytest

from evomerge_core.config.schema import dump_run_config, load_run_config, parse_run_config
from evomerge_core.errors import ConfigError
from evomerge_core.fitness.evaluator import minibatch_indices
from evomerge_core.spaces import build_space

REPO = Path(__file__).resolve().parents[2]
FITNESS = {"dataset": {"path": "org/data"}, "scorer": "logprob"}


def dfs(**over) -> dict:
    space = {"model_a": "org/a", "model_b": "org/b", **over.pop("space", {})}
    return {"sources": [{"model": "org/a"}, {"model": "org/b"}], "space": {"dfs": space}, "fitness": FITNESS, **over}


def chain(**dfs_over) -> dict:
    return {
        "run_key": "chain",
        "sources": [{"model": "org/base", "base": True}, {"model": "org/x"}, {"model": "org/y"}],
        "fitness": FITNESS,
        "stages": [
            {"name": "ps", "space": {"ps": {"method": "dare_ties"}}},
            {"name": "dfs", "space": {"dfs": {"model_a": "@ps", "model_b": "org/y", **dfs_over}},
             "optimizer": {"popsize": 16, "generations": 5}, "fitness": {"minibatch": 10}},
        ],
    }


def test_dfs_space_parses_and_builds():
    config = parse_run_config(dfs(space={"r": 2, "scales": "vector"}))
    assert config.space.kind == "dfs" and config.space.ps is None
    space = build_space(config, num_layers=3, num_layers_b=2)
    assert space.kind == "dfs" and space.T == 10 and space.dim == 10 + 12
    with pytest.raises(ConfigError, match="layer counts of model A and model B"):
        build_space(config, num_layers=3)
    assert "\n  ps:" not in dump_run_config(config)  # only the space in use is written


def test_ps_config_dump_has_no_dfs_or_stages():
    config = parse_run_config({"sources": [{"model": "org/base", "base": True}, {"model": "org/x"}], "fitness": FITNESS})
    dumped = config.model_dump(mode="json")
    assert config.space.kind == "ps" and set(dumped["space"]) == {"ps"} and "stages" not in dumped
    assert parse_run_config(dumped).config_hash() == config.config_hash()


@pytest.mark.parametrize(
    "config, field",
    [
        (dfs(space={"r": 0}), "space.dfs.r is 0"),
        (dfs(space={"max_hops": 1}), "space.dfs.max_hops is 1"),
        (dfs(space={"scales": "diagonal"}), "space.dfs.scales"),
        (dfs(space={"model_b": "org/a"}), "space.dfs.model_b is the same model"),
        (dfs(space={"model_a": "org/c"}), "space.dfs.model_a: 'org/c' is not one of the sources"),
        ({**dfs(), "sources": [{"model": "org/a"}, {"model": "org/b"}, {"model": "org/c"}]}, "exactly two models (A and B), got 3"),
        ({**dfs(), "sources": [{"model": "org/a"}]}, "exactly two models (A and B), got 1"),
        ({**dfs(), "sources": [{"model": "org/a", "base": True}, {"model": "org/b"}]}, "base: true has no meaning"),
        ({**dfs(), "space": {"dfs": {"model_b": "org/b"}}}, "space.dfs.model_a is required"),
        ({**dfs(), "space": {"ps": {}, "dfs": {"model_a": "org/a", "model_b": "org/b"}}}, "either ps or dfs"),
        (dfs(fitness={**FITNESS, "selection": "validation"}), "fitness.validation is not set"),
        (dfs(fitness={**FITNESS, "minibatch": 0}), "fitness.minibatch"),
    ],
)
def test_bad_dfs_configs_name_the_field(config, field):
    with pytest.raises(ConfigError) as err:
        parse_run_config(config)
    assert field in str(err.value)


def test_chain_expands_stages_with_stage_outputs_as_sources():
    config = parse_run_config(chain(r=2))
    assert "space" not in config.model_dump(mode="json")
    ps = config.stage_config(0)
    assert ps.space.kind == "ps" and ps.effective_run_key() == "0"
    assert ps.storage == "file://./runs/chain/stages" and ps.output.materialise_best
    assert [s.model for s in ps.sources] == ["org/base", "org/x", "org/y"]
    second = config.stage_config(1, {0: "file:///runs/chain/stages/0/best"})
    assert second.space.dfs.model_a == "file:///runs/chain/stages/0/best" and second.space.dfs.r == 2
    assert [s.model for s in second.sources] == ["file:///runs/chain/stages/0/best", "org/y"]
    assert second.optimizer.popsize == 16 and second.fitness.minibatch == 10
    assert second.fitness.dataset.path == "org/data"  # the rest of fitness comes from the top level
    assert config.stage_refs(1) == {"model_a": 0}
    assert parse_run_config(config.model_dump(mode="json")).config_hash() == config.config_hash()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c["stages"][1]["space"]["dfs"].update(r=0), "stages[1]: space.dfs.r is 0"),
        (lambda c: c["stages"][1]["space"]["dfs"].update(max_hops=1), "stages[1]: space.dfs.max_hops is 1"),
        (lambda c: c["stages"][1]["space"]["dfs"].update(model_a="@nope"), "stages[1].space.dfs.model_a: '@nope' names no stage"),
        (lambda c: c["stages"][1]["space"]["dfs"].update(model_a="@dfs"), "does not run before stage 1"),
        (lambda c: c["stages"][1]["space"]["dfs"].update(model_a="org/x"), "stages[1] does not use an earlier stage's model"),
        (lambda c: c["stages"][1].update(name="ps"), "two stages are named 'ps'"),
        (lambda c: c["stages"][1]["optimizer"].update(popsize=1), "stages[1]: optimizer.popsize"),
        (lambda c: c.update(space={"ps": {}}), "not a top-level space"),
        (lambda c: c["stages"].pop(), "stages"),
    ],
)
def test_bad_chains_name_the_stage_and_field(mutate, message):
    config = chain()
    mutate(config)
    with pytest.raises(ConfigError) as err:
        parse_run_config(config)
    assert message in str(err.value)


def test_minibatch_larger_than_the_data_is_refused():
    with pytest.raises(ConfigError, match="fitness.minibatch is 5 but fitness.dataset has only 4 items"):
        minibatch_indices(4, 5, seed=0, generation=0)
    assert minibatch_indices(4, 4, seed=0, generation=9) == [0, 1, 2, 3]


def test_paper_psdfs_example_validates_offline():
    config = load_run_config(REPO / "examples" / "evollm-jp-psdfs.yaml")
    assert config.stages is not None and len(config.stages) == 2
    ps, dfs_stage = config.stage_config(0), config.stage_config(1, {0: "file:///runs/evollm-jp-psdfs/stages/0/best"})
    assert ps.space.kind == "ps" and ps.space.ps.method == "dare_ties" and ps.optimizer.evaluations == 1000
    assert ps.fitness.minibatch is None and ps.fitness.selection == "train"
    d = dfs_stage.space.dfs
    assert (d.model_a, d.model_b) == ("file:///runs/evollm-jp-psdfs/stages/0/best", "augmxnt/shisa-gamma-7b-v1")
    assert d.r == 3 and d.scales == "matrix"
    assert dfs_stage.optimizer.popsize == 128 and dfs_stage.optimizer.generations == 100
    assert dfs_stage.fitness.minibatch == 200 and dfs_stage.fitness.selection == "validation"
    assert dfs_stage.fitness.validation.split == "test[869:]" and dfs_stage.fitness.dataset.split == "test[:869]"
    assert config.stage_refs(1) == {"model_a": 0}
    space = build_space(dfs_stage, num_layers=32, num_layers_b=32)  # Mistral-7B: 32 layers each
    assert space.T == 192 and space.dim == 192 + 64 * 64
