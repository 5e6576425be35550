"""`evomerge merge` against mergekit 0.1.5 as an oracle, on tiny random Llama models."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_models import make_tiny_family  # noqa: E402

from evomerge.flows.cli import main  # noqa: E402
from evomerge_core.io.model_files import LazyModelReader  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_tiny_family(tmp_path_factory.mktemp("family"), n_finetunes=2, layers=3, noise=0.02)


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    reader = LazyModelReader(model_dir)
    return {name: reader.get(name) for name in reader.names()}


def _run_mergekit(config: dict, out: Path) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    run_merge(MergeConfiguration.model_validate(config), str(out), MergeOptions(quiet=True, write_model_card=False, copy_tokenizer=False))


def _configs(f):
    b, m1, m2 = str(f["base"]), str(f["ft1"]), str(f["ft2"])
    return {
        "linear": {
            "merge_method": "linear",
            "models": [{"model": m1, "parameters": {"weight": [0.2, 0.9]}}, {"model": m2, "parameters": {"weight": 0.5}},
                       {"model": b, "parameters": {"weight": 0.3}}],
            "dtype": "float32",
        },
        "linear_unnormalized": {
            "merge_method": "linear",
            "models": [{"model": m1, "parameters": {"weight": 0.7}}, {"model": m2, "parameters": {"weight": 0.6}}],
            "parameters": {"normalize": False},
            "dtype": "float32",
        },
        "task_arithmetic": {
            "merge_method": "task_arithmetic",
            "base_model": b,
            "models": [{"model": m1, "parameters": {"weight": 0.55}},
                       {"model": m2, "parameters": {"weight": [{"filter": "mlp", "value": 0.9}, {"value": [0.2, 0.6]}]}}],
            "parameters": {"lambda": 0.8},
            "dtype": "float32",
        },
        "ties": {
            "merge_method": "ties",
            "base_model": b,
            "models": [
                {"model": b},
                {"model": m1, "parameters": {"weight": 0.7, "density": [0.2, 0.9]}},
                {"model": m2, "parameters": {"weight": 0.6, "density": [{"filter": "self_attn", "value": 0.3}, {"value": 0.7}]}},
            ],
            "parameters": {"lambda": 1.2, "int8_mask": True},
            "dtype": "float32",
        },
        "ties_unnormalized": {
            "merge_method": "ties",
            "base_model": b,
            "models": [{"model": m1, "parameters": {"weight": 0.83, "density": 0.47}},
                       {"model": m2, "parameters": {"weight": 0.72, "density": 0.51}}],
            "parameters": {"normalize": False},
            "dtype": "float32",
        },
        "slerp": {
            "merge_method": "slerp",
            "base_model": b,
            "models": [{"model": b}, {"model": m1}],
            "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 0.5, 0.3, 0.7, 1.0]},
                                 {"filter": "mlp", "value": [1.0, 0.5, 0.7, 0.3, 0.0]}, {"value": 0.5}]},
            "dtype": "float32",
        },
    }


@pytest.mark.mergekit
@pytest.mark.parametrize("name", ["linear", "linear_unnormalized", "task_arithmetic", "ties", "ties_unnormalized", "slerp"])
def test_matches_mergekit(family, tmp_path, name):
    config = _configs(family)[name]
    cfg_path = tmp_path / "merge.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    _run_mergekit(config, tmp_path / "mergekit")
    assert main(["merge", str(cfg_path), str(tmp_path / "evomerge"), "--no-progress"]) == 0
    expected = _tensors(tmp_path / "mergekit")
    got = _tensors(tmp_path / "evomerge")
    assert sorted(got) == sorted(expected)
    base = _tensors(family["base"])
    for key in expected:
        assert got[key].dtype == torch.float32
        diff = (got[key] - expected[key]).abs().max().item()
        assert diff <= 1e-5, f"{name}: {key} differs by {diff}"
    # the merge really changed something (guards against comparing two copies of the base)
    assert any(not torch.allclose(got[k], base[k]) for k in got)
