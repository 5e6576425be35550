"""Golden closed-form tests of the merge methods on small hand-computed tensors."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from doc_examples import registered_by_doc_example

from evomerge_core.errors import MergeError
from evomerge_core.merge.methods import (
    MERGE_METHODS,
    METHODS,
    bernoulli_mask,
    get_method,
    magnitude_mask,
    merge_task_vectors,
    register_method,
    rescale_l1,
    slerp_tensors,
)
from evomerge_core.merge.sparsify import Consensus, Sparsification

B = torch.tensor([1.0, 2.0, 3.0, 4.0])
X1 = torch.tensor([2.0, 1.0, 3.5, 4.0])  # delta1 = [1, -1, 0.5, 0]
X2 = torch.tensor([0.0, 4.0, 5.0, 3.0])  # delta2 = [-1, 2, 2, -1]


def test_registry_has_the_six_methods_with_mergekit_defaults():
    assert {"linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "slerp"} <= set(MERGE_METHODS)
    assert get_method("linear").global_params["normalize"] is True
    assert get_method("ties").global_params["normalize"] is True
    assert get_method("task_arithmetic").global_params["normalize"] is False
    assert get_method("dare_ties").global_params["rescale"] is True
    assert get_method("dare_linear").global_params["normalize"] is False
    assert get_method("ties").global_params["lambda"] == 1.0
    assert get_method("ties").model_defaults["density"] == 1.0
    assert get_method("dare_ties").stochastic and not get_method("ties").stochastic
    assert get_method("slerp").needs_base and not get_method("linear").needs_base


def test_unknown_method_suggests_close_name():
    with pytest.raises(MergeError, match="did you mean 'ties'"):
        get_method("tis")


def test_register_twice_is_an_error():
    with pytest.raises(ValueError):
        register_method("linear", needs_base=False)(lambda *a, **k: None)


def test_linear_normalized_and_not():
    m = get_method("linear")
    out = m([X1, X2], model_params=[{"weight": 1.0}, {"weight": 3.0}])
    assert torch.allclose(out, (X1 + 3 * X2) / 4)
    out = m([X1, X2], model_params=[{"weight": 1.0}, {"weight": 3.0}], params={"normalize": False})
    assert torch.allclose(out, X1 + 3 * X2)


def test_linear_zero_weight_sum_with_normalize_is_an_error():
    with pytest.raises(MergeError, match="sum to 0"):
        get_method("linear")([X1, X2], model_params=[{"weight": 1.0}, {"weight": -1.0}])


def test_missing_required_weight_is_an_error():
    with pytest.raises(MergeError, match="'weight'"):
        get_method("task_arithmetic")([X1], base=B, model_params=[{}])


def test_task_arithmetic_closed_form():
    m = get_method("task_arithmetic")
    mp = [{"weight": 0.5}, {"weight": 2.0}]
    out = m([X1, X2], base=B, model_params=mp, params={"lambda": 1.5})
    d1, d2 = X1 - B, X2 - B
    assert torch.allclose(out, B + 1.5 * (0.5 * d1 + 2.0 * d2))
    out = m([X1, X2], base=B, model_params=mp, params={"normalize": True})
    assert torch.allclose(out, B + (0.5 * d1 + 2.0 * d2) / 2.5)


def test_ties_closed_form():
    # density 0.5 -> keep top-2 |delta|: d1 [1,-1,.5,0] keeps idx 0,1 -> [1,-1,0,0];
    # d2 [-1,2,2,-1] keeps idx 1,2 -> [0,2,2,0]. Weighted (w1=1, w2=0.5): [1,-1,0,0], [0,1,1,0].
    # Sum [1,0,1,0] -> majority sign [+,+,+,+] (>= 0 counts as +).
    # idx0: only d1 (+1) agrees -> 1/1; idx1: d1 -1 disagrees, d2 +1 agrees -> 1/0.5 = 2;
    # idx2: d2 +1 -> 1/0.5 = 2; idx3: nothing -> 0.
    m = get_method("ties")
    mp = [{"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": 0.5}]
    out = m([X1, X2], base=B, model_params=mp)
    assert torch.allclose(out, B + torch.tensor([1.0, 2.0, 2.0, 0.0]))
    out = m([X1, X2], base=B, model_params=mp, params={"normalize": False, "lambda": 2.0})
    assert torch.allclose(out, B + 2.0 * torch.tensor([1.0, 1.0, 1.0, 0.0]))


def test_ties_negative_majority():
    base = torch.zeros(3)
    a = torch.tensor([-3.0, 1.0, 0.0])
    b = torch.tensor([1.0, 1.0, -2.0])
    out = get_method("ties")([a, b], base=base, model_params=[{"weight": 1.0}, {"weight": 1.0}])
    # sums [-2, 2, -2] -> signs [-, +, -]; idx0 keeps -3, idx1 averages 1,1; idx2 keeps -2
    assert torch.allclose(out, torch.tensor([-3.0, 1.0, -2.0]))


def test_magnitude_mask_keeps_exactly_k_largest():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, generator=g)
    for density in (0.1, 0.5, 0.73, 0.99):
        mask = magnitude_mask(x, density)
        k = max(1, int(density * 1000))
        assert int(mask.sum()) == k
        assert x.abs()[mask].min() >= x.abs()[~mask].max()
    assert int(magnitude_mask(x, 0.0).sum()) == 0
    assert int(magnitude_mask(x, 1e-6).sum()) == 1
    assert bool(magnitude_mask(x, 1.0).all())


def test_rescale_l1_matches_unmasked_norm():
    x = torch.tensor([1.0, -2.0, 3.0, -4.0])
    masked = x * torch.tensor([1.0, 0.0, 1.0, 0.0])
    out = rescale_l1(masked, x)
    assert torch.allclose(out, masked * 10.0 / 4.0)
    assert math.isclose(float(out.abs().sum()), float(x.abs().sum()), rel_tol=1e-6)
    assert torch.equal(rescale_l1(torch.zeros(4), x), torch.zeros(4))


def _gens(seed: int, n: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


@pytest.mark.parametrize("name", ["dare_ties", "dare_linear"])
def test_dare_seeded_and_semantics(name):
    m = get_method(name)
    base = torch.zeros(200_000)
    delta = torch.randn(200_000, generator=torch.Generator().manual_seed(1))
    mp = [{"weight": 1.0, "density": 0.3}]
    a = m([delta], base=base, model_params=mp, generators=_gens(7, 1))
    b = m([delta], base=base, model_params=mp, generators=_gens(7, 1))
    c = m([delta], base=base, model_params=mp, generators=_gens(8, 1))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    kept = a != 0
    frac = float(kept.float().mean())
    assert abs(frac - 0.3) < 5 * math.sqrt(0.3 * 0.7 / 200_000)
    # L1 rescale: the kept entries are scaled by one factor so the L1 norm is preserved
    scale = a[kept] / delta[kept]
    assert torch.allclose(scale, scale[0].expand_as(scale))
    assert math.isclose(float(a.abs().sum()), float(delta.abs().sum()), rel_tol=1e-4)
    no_rescale = m([delta], base=base, model_params=mp, params={"rescale": False}, generators=_gens(7, 1))
    assert torch.equal(no_rescale[kept], delta[kept]) and torch.equal(no_rescale != 0, kept)


def test_dare_density_one_is_task_arithmetic():
    mp = [{"weight": 0.7, "density": 1.0}, {"weight": 0.2, "density": 1.0}]
    a = get_method("dare_linear")([X1, X2], base=B, model_params=mp, generators=_gens(0, 2))
    b = get_method("task_arithmetic")([X1, X2], base=B, model_params=[{"weight": 0.7}, {"weight": 0.2}])
    assert torch.allclose(a, b)


def test_bernoulli_mask_density_one_keeps_all():
    assert bool(bernoulli_mask(torch.ones(10), 1.0, None).all())


def test_slerp_orthogonal_closed_form():
    v0 = torch.tensor([1.0, 0.0])
    v1 = torch.tensor([0.0, 1.0])
    out = get_method("slerp")([v1], base=v0, params={"t": 0.5})
    assert torch.allclose(out, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]), atol=1e-6)
    out = slerp_tensors(1 / 3, v0 * 2, v1 * 2)  # angle pi/2 -> (cos(pi/6), sin(pi/6)) * 2
    assert torch.allclose(out, 2 * torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6)]), atol=1e-6)
    assert torch.allclose(slerp_tensors(0.0, v0, v1), v0) and torch.allclose(slerp_tensors(1.0, v0, v1), v1)


def test_slerp_parallel_falls_back_to_lerp():
    v0 = torch.tensor([1.0, 2.0, 3.0])
    out = slerp_tensors(0.25, v0, 2 * v0)
    assert torch.allclose(out, 0.75 * v0 + 0.25 * 2 * v0)


def test_slerp_needs_exactly_one_other_model_and_t():
    with pytest.raises(MergeError):
        get_method("slerp")([X1, X2], base=B, params={"t": 0.5})
    with pytest.raises(MergeError, match="'t'"):
        get_method("slerp")([X1], base=B)


def test_methods_do_not_modify_inputs():
    before = [B.clone(), X1.clone(), X2.clone()]
    for name in ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear"):
        get_method(name)([X1, X2], base=B, model_params=[{"weight": 1.0, "density": 0.5}] * 2, generators=_gens(0, 2))
    assert all(torch.equal(a, b) for a, b in zip(before, [B, X1, X2]))


_TASK_VECTOR_FAMILY = {
    "task_arithmetic": (Sparsification.NONE, Consensus.NONE),
    "ties": (Sparsification.MAGNITUDE, Consensus.SIGN),
    "dare_ties": (Sparsification.RANDOM, Consensus.SIGN),
    "dare_linear": (Sparsification.RANDOM, Consensus.NONE),
}


def test_every_task_vector_method_is_a_declaration():
    """The task-vector family is data: each member is a TaskVectorVariant served by the one
    generic merge, its parameters derived from the fields; no member is a function of its own."""
    declared = {name: m for name, m in METHODS.items() if m.task_vector is not None}
    assert set(_TASK_VECTOR_FAMILY) <= set(declared)
    for name, (sparsification, consensus) in _TASK_VECTOR_FAMILY.items():
        v = declared[name].task_vector
        assert (v.sparsification, v.consensus) == (sparsification, consensus), name
    for name, m in METHODS.items():
        generic = isinstance(m.fn, functools.partial) and m.fn.func is merge_task_vectors
        assert generic == (m.task_vector is not None), name
        if m.task_vector is None:
            continue
        v = m.task_vector
        assert m.fn.keywords == {"variant": v} and m.needs_base, name
        assert m.model_params == (("weight", "density") if v.sparsifies else ("weight",)), name
        assert m.stochastic == (v.sparsification is Sparsification.RANDOM), name
        assert m.global_params["normalize"] is v.normalize and m.global_params["lambda"] == 1.0, name
        assert m.global_params.get("rescale") == (v.rescale if v.sparsifies else None), name


def test_a_new_task_vector_variant_is_one_declaration():
    """docs/merging.md's example (TIES's trim without the sign election, not a built-in) works
    from its declaration alone, called directly and through a recipe and the merge engine."""
    from evomerge_core.merge.engine import merge_state_dicts
    from evomerge_core.merge.recipe import MergeRecipe

    with registered_by_doc_example("merging.md", "register_task_vector_method(", METHODS) as added:
        assert added == {"magnitude_sum"}
        m = get_method("magnitude_sum")
        assert (m.task_vector.sparsification, m.task_vector.consensus) == (Sparsification.MAGNITUDE, Consensus.NONE)
        assert m.model_params == ("weight", "density") and m.global_params["rescale"] is False
        # density 0.5 keeps the top 2 |delta|: d1 [1,-1,.5,0] -> [1,-1,0,0]; d2 [-1,2,2,-1] -> [0,2,2,0]
        expected = B + torch.tensor([1.0, 1.0, 2.0, 0.0])
        mp = [{"weight": 1.0, "density": 0.5}, {"weight": 1.0, "density": 0.5}]
        assert torch.equal(m([X1, X2], base=B, model_params=mp), expected)
        recipe = MergeRecipe.model_validate({
            "merge_method": "magnitude_sum",
            "base_model": "b",
            "models": [{"model": "x1", "parameters": mp[0]}, {"model": "x2", "parameters": mp[1]}],
        })
        merged = merge_state_dicts(recipe, {"b": {"w": B}, "x1": {"w": X1}, "x2": {"w": X2}}, num_layers=1)["w"]
        assert torch.equal(merged.float(), expected)
    with pytest.raises(MergeError, match="unknown merge method 'magnitude_sum'"):
        get_method("magnitude_sum")
