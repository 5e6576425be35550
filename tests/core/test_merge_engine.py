"""The engine: per-tensor merging, DARE seeding, vocabulary rule, in-memory state dicts."""

from __future__ import annotations

import pytest
import torch

from evomerge_core.errors import MergeError
from evomerge_core.merge.engine import merge_state_dicts, merge_tensor, tensor_generator
from evomerge_core.merge.recipe import MergeRecipe

DARE = MergeRecipe.model_validate(
    {
        "merge_method": "dare_ties",
        "base_model": "b",
        "models": [{"model": "m1", "parameters": {"weight": 0.6, "density": 0.5}}, {"model": "m2", "parameters": {"weight": 0.8, "density": 0.3}}],
        "seed": 11,
    }
)


def _sd(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(10, 4, generator=g),
        "model.layers.0.mlp.up_proj.weight": torch.randn(8, 4, generator=g),
        "model.layers.1.mlp.up_proj.weight": torch.randn(8, 4, generator=g),
        "lm_head.weight": torch.randn(10, 4, generator=g),
    }


SDS = {"b": _sd(0), "m1": _sd(1), "m2": _sd(2)}


def test_dare_is_deterministic_and_independent_of_tensor_order():
    a = merge_state_dicts(DARE, SDS, num_layers=2)
    rev = {m: dict(reversed(list(sd.items()))) for m, sd in SDS.items()}
    b = merge_state_dicts(DARE, rev, num_layers=2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    name = "model.layers.1.mlp.up_proj.weight"
    single = merge_tensor(DARE, name, {m: sd[name] for m, sd in SDS.items()}, num_layers=2)
    assert torch.equal(single, a[name])
    other_seed = merge_state_dicts(DARE.model_copy(update={"seed": 12}), SDS, num_layers=2)
    assert not torch.equal(other_seed[name], a[name])


def test_generators_differ_per_tensor_and_model():
    draws = {
        (t, i): torch.rand(4, generator=tensor_generator(0, t, i))
        for t in ("a", "b")
        for i in (0, 1)
    }
    values = list(draws.values())
    assert all(not torch.equal(values[i], values[j]) for i in range(4) for j in range(i + 1, 4))
    assert torch.equal(torch.rand(4, generator=tensor_generator(0, "a", 1)), draws[("a", 1)])


def test_merge_tensor_gradient_and_float32_output():
    r = MergeRecipe.model_validate(
        {"merge_method": "linear", "models": [{"model": "m1", "parameters": {"weight": [1.0, 0.0]}},
                                              {"model": "m2", "parameters": {"weight": [0.0, 1.0]}}]}
    )
    bf = {m: sd for m, sd in SDS.items() if m != "b"}
    l0 = "model.layers.0.mlp.up_proj.weight"
    l1 = "model.layers.1.mlp.up_proj.weight"
    out0 = merge_tensor(r, l0, {m: sd[l0].to(torch.bfloat16) for m, sd in bf.items()}, num_layers=2)
    out1 = merge_tensor(r, l1, {m: sd[l1] for m, sd in bf.items()}, num_layers=2)
    assert out0.dtype == torch.float32
    assert torch.equal(out0, SDS["m1"][l0].to(torch.bfloat16).float())  # layer 0: weight (1, 0)
    assert torch.allclose(out1, SDS["m2"][l1])  # layer 1 of 2 sits at t = 1: weight (0, 1)
    # embeddings sit at t = 0 like mergekit
    emb = "model.embed_tokens.weight"
    assert torch.allclose(merge_tensor(r, emb, {m: sd[emb] for m, sd in bf.items()}, num_layers=2), SDS["m1"][emb])


def test_vocab_rule_merges_shared_rows_keeps_reference_extra_rows():
    r = MergeRecipe.model_validate(
        {"merge_method": "task_arithmetic", "base_model": "b", "models": [{"model": "m1", "parameters": {"weight": 1.0}}]}
    )
    base = torch.arange(12.0).reshape(6, 2)
    big = torch.ones(8, 2) * 100  # fine-tune with 2 more rows
    out = merge_tensor(r, "model.embed_tokens.weight", {"b": base, "m1": big}, num_layers=2)
    assert out.shape == (6, 2) and torch.equal(out, big[:6])
    small = torch.ones(4, 2) * 100  # fine-tune with 2 fewer rows: base keeps its extra rows
    out = merge_tensor(r, "lm_head.weight", {"b": base, "m1": small}, num_layers=2)
    assert torch.equal(out[:4], small) and torch.equal(out[4:], base[4:])


def test_shape_mismatch_outside_vocab_names_tensor_and_model():
    r = MergeRecipe.model_validate({"merge_method": "linear",
                                    "models": [{"model": "m1", "parameters": {"weight": 1}}, {"model": "m2", "parameters": {"weight": 1}}]})
    with pytest.raises(MergeError, match=r"model.layers.0.mlp.up_proj.weight.*'m2'"):
        merge_tensor(r, "model.layers.0.mlp.up_proj.weight", {"m1": torch.zeros(8, 4), "m2": torch.zeros(8, 5)}, num_layers=2)


def test_missing_model_tensor_is_an_error():
    with pytest.raises(MergeError, match="'m2'"):
        merge_tensor(DARE, "lm_head.weight", {"b": torch.zeros(2), "m1": torch.zeros(2)}, num_layers=2)
