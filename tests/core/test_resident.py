"""The resident model: in-place merges (flat and per tensor) equal the materialised merge."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_models import make_tiny_family  # noqa: E402

from evomerge_core.kinds import resident as resident_mod  # noqa: E402
from evomerge_core.errors import MergeError  # noqa: E402
from evomerge_core.io.model_files import LazyModelReader  # noqa: E402
from evomerge_core.merge.engine import merge_state_dicts  # noqa: E402
from evomerge_core.merge.recipe import MergeRecipe  # noqa: E402
from evomerge_core.kinds.resident import ResidentModel  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_tiny_family(tmp_path_factory.mktemp("fam"), n_finetunes=3, layers=3, noise=0.02)


def _recipes(f) -> dict[str, MergeRecipe]:
    b, m1, m2, m3 = (str(f[k]) for k in ("base", "ft1", "ft2", "ft3"))
    grad = [0.2, 0.9, 0.5]
    raw = {
        "dare_ties": {"merge_method": "dare_ties", "base_model": b, "seed": 5, "models": [
            {"model": m1, "parameters": {"weight": 0.5, "density": 0.4}},
            {"model": m2, "parameters": {"weight": 0.7, "density": grad}},
            {"model": m3, "parameters": {"weight": grad, "density": 0.8}}]},
        "dare_linear": {"merge_method": "dare_linear", "base_model": b, "seed": 2, "models": [
            {"model": m1, "parameters": {"weight": 0.5, "density": 0.3}}, {"model": m2, "parameters": {"weight": 0.6, "density": 0.6}}]},
        "ties": {"merge_method": "ties", "base_model": b, "models": [
            {"model": m1, "parameters": {"weight": 0.5, "density": [{"filter": "mlp", "value": 0.2}, {"value": 0.7}]}},
            {"model": m2, "parameters": {"weight": 0.6, "density": 0.5}}], "parameters": {"lambda": grad}},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": b, "models": [
            {"model": m1, "parameters": {"weight": 0.3}}, {"model": m2, "parameters": {"weight": grad}}],
            "parameters": {"normalize": True}},
        "linear": {"merge_method": "linear", "models": [
            {"model": m1, "parameters": {"weight": grad}}, {"model": m2, "parameters": {"weight": 0.4}},
            {"model": b, "parameters": {"weight": 0.1}}]},
        "slerp": {"merge_method": "slerp", "base_model": b, "models": [{"model": b}, {"model": m1}], "parameters": {"t": grad}},
    }
    return {k: MergeRecipe.model_validate(v) for k, v in raw.items()}


def _sources(f) -> dict[str, str]:
    return {str(p): str(p) for p in f.values()}


def _expected(f, recipe) -> dict[str, torch.Tensor]:
    sds = {str(p): {n: LazyModelReader(p).get(n) for n in LazyModelReader(p).names()} for p in f.values()}
    return merge_state_dicts(recipe, sds, num_layers=3)


@pytest.fixture(scope="module")
def flat_resident(family):
    return ResidentModel(_sources(family), reference=str(family["base"]), num_layers=3)


@pytest.fixture(scope="module")
def per_tensor_resident(family):
    old = resident_mod.FLAT_MAX_PARAMS
    resident_mod.FLAT_MAX_PARAMS = 0
    try:
        return ResidentModel(_sources(family), reference=str(family["base"]), num_layers=3)
    finally:
        resident_mod.FLAT_MAX_PARAMS = old


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "ties", "task_arithmetic", "linear", "slerp"])
def test_in_place_merge_equals_materialised_merge(family, flat_resident, per_tensor_resident, method):
    assert flat_resident.flat is not None and per_tensor_resident.flat is None
    recipe = _recipes(family)[method]
    expected = _expected(family, recipe)
    for res in (flat_resident, per_tensor_resident):
        res.apply(recipe)
        state = res.model.state_dict()
        for name, want in expected.items():
            got = state[name]
            if method.startswith("dare"):  # rescale factors: summation order may differ by an ulp
                assert torch.allclose(got, want, rtol=1e-6, atol=1e-7), name
            else:
                assert torch.equal(got, want), name
        assert res.current is not None


def test_flat_weights_are_the_model_weights(family, flat_resident):
    """The model's parameters are views of one flat buffer, and generation sees the merge."""
    recipe = _recipes(family)["task_arithmetic"]
    flat_resident.apply(recipe)
    params = dict(flat_resident.model.named_parameters())
    buf = flat_resident._flat_weights
    start, end = buf.data_ptr(), buf.data_ptr() + buf.numel() * buf.element_size()
    assert all(start <= p.data_ptr() < end for p in params.values())
    ids = flat_resident.tokenizer("abc", return_tensors="pt")["input_ids"]
    logits = flat_resident.model(input_ids=ids).logits
    flat_resident.apply(_recipes(family)["slerp"])
    assert not torch.equal(logits, flat_resident.model(input_ids=ids).logits)


@pytest.mark.parametrize("which", ["flat", "per_tensor"])
def test_non_finite_merge_is_reported_with_the_tensor_name(family, flat_resident, per_tensor_resident, which):
    res = flat_resident if which == "flat" else per_tensor_resident
    bad = MergeRecipe.model_validate({"merge_method": "task_arithmetic", "base_model": str(family["base"]),
                                      "models": [{"model": str(family["ft1"]), "parameters": {"weight": 1e38}}],
                                      "parameters": {"lambda": 1e38}})
    with pytest.raises(MergeError, match="non-finite values in tensor"):
        res.apply(bad)
    assert res.current is None
