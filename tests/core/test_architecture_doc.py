"""docs/architecture.md's example of adding a merge method runs, and the method it registers
is used by a recipe through the merge engine."""

from __future__ import annotations

import pytest
import torch
from doc_examples import registered_by_doc_example

from evomerge_core.merge.engine import merge_state_dicts
from evomerge_core.merge.methods import MERGE_METHODS
from evomerge_core.merge.recipe import MergeRecipe

@pytest.fixture
def registered_example():
    with registered_by_doc_example("architecture.md", "register_method", MERGE_METHODS) as added:
        assert added == {"geometric_mean"}
        yield MERGE_METHODS["geometric_mean"]


def test_the_documented_merge_method_merges_through_a_recipe(registered_example):
    a = {"w": torch.tensor([[1.0, -4.0], [9.0, 2.0]])}
    b = {"w": torch.tensor([[4.0, -1.0], [1.0, 8.0]])}
    recipe = MergeRecipe.model_validate({
        "merge_method": "geometric_mean",
        "models": [{"model": "a", "parameters": {"weight": 1.0}}, {"model": "b", "parameters": {"weight": 1.0}}],
    })
    merged = merge_state_dicts(recipe, {"a": a, "b": b}, num_layers=1)["w"]
    torch.testing.assert_close(merged.float(), torch.tensor([[2.0, -2.0], [3.0, 4.0]]))
    out = torch.zeros(2, 2)
    assert registered_example([a["w"], b["w"]], model_params=[{"weight": 1.0}] * 2, out=out) is out
    torch.testing.assert_close(out, torch.tensor([[2.0, -2.0], [3.0, 4.0]]))


@pytest.fixture
def registered_scorer():
    from evomerge_core.fitness.registry import SCORERS

    with registered_by_doc_example("architecture.md", "register_scorer", SCORERS) as added:
        assert added == {"answer_in_output"}
        yield


def test_the_documented_scorer_is_a_config_scorer_and_scores(registered_scorer):
    from evomerge_core.config.schema import parse_run_config
    from evomerge_core.fitness.registry import ScoreContext, get_scorer

    scorer = get_scorer("answer_in_output")
    assert scorer.is_accuracy
    rows = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": "4"}]
    ctx = ScoreContext(model=None, tokenizer=None, rows=rows, prompts=[r["prompt"] for r in rows],
                       cache={"outputs": ["it is 2", "five"]})
    assert scorer(ctx) == {"fitness": 0.5}
    config = parse_run_config({
        "run_key": "doc-scorer", "storage": "file:///tmp/never-written",
        "sources": [{"model": "/m/base", "base": True}, {"model": "/m/a"}],
        "space": {"ps": {"method": "linear", "params": ["weight"]}},
        "optimizer": {"evaluations": 4},
        "fitness": {"scorer": "answer_in_output", "dataset": {"path": "/d/train.jsonl"}},
    })
    assert config.fitness.scorer == "answer_in_output"
