"""Model families in `evomerge merge`: Mixtral (one tensor per expert) equals mergekit 0.1.5 where
the results can be equal and is refused where they cannot (TIES trim, SLERP over an expert);
LLaVA's per-layer gradients apply to the text layers only; a VLM mixed with plain LLMs points
to the VLM route."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_models import make_tiny_llama  # noqa: E402

from evomerge.flows.cli import main  # noqa: E402
from evomerge_core.io.model_files import LazyModelReader  # noqa: E402

torch.set_num_threads(1)
EXPERTS = 4
LAYERS = 2


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    reader = LazyModelReader(model_dir)
    return {name: reader.get(name) for name in reader.names()}


def _run(tmp_path: Path, cfg: dict, out: Path) -> int:
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return main(["merge", str(path), str(out), "--no-progress"])


# ------------------------------------------------------------------ Mixtral


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    """A tiny Mixtral base and two fine-tunes (base + seeded noise), per-expert layout on disk."""
    from transformers import MixtralConfig, MixtralForCausalLM

    root = tmp_path_factory.mktemp("mixtral")
    config = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=EXPERTS,
                           num_experts_per_tok=2, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    base = MixtralForCausalLM(config)
    base.save_pretrained(root / "base")
    out = {"base": root / "base"}
    for i in (1, 2):
        gen = torch.Generator().manual_seed(i)
        model = MixtralForCausalLM(config)
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.02)
        model.save_pretrained(root / f"ft{i}")
        out[f"ft{i}"] = root / f"ft{i}"
    assert any(".block_sparse_moe.experts.0.w1." in n for n in LazyModelReader(root / "base").names())
    return out


def _mixtral_cfg(f, method: str, density) -> dict:
    params = {"weight": 0.7} if method != "ties" else {"weight": 0.7, "density": density}
    other = {"weight": 0.6} if method != "ties" else {"weight": 0.6, "density": 0.5 if density != 1.0 else 1.0}
    if isinstance(density, list):
        other["density"] = density
    return {"merge_method": method, "base_model": str(f["base"]), "dtype": "float32",
            "models": [{"model": str(f["ft1"]), "parameters": params}, {"model": str(f["ft2"]), "parameters": other}]}


def _as_per_expert(mk: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """mergekit's transformers-5 output (fused experts) under the per-expert names."""
    out = {}
    for name, t in mk.items():
        if ".mlp.experts.gate_up_proj" in name:
            prefix = name.replace("mlp.experts.gate_up_proj", "block_sparse_moe.experts.")
            half = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.w1.weight"], out[f"{prefix}{e}.w3.weight"] = t[e, :half], t[e, half:]
        elif ".mlp.experts.down_proj" in name:
            prefix = name.replace("mlp.experts.down_proj", "block_sparse_moe.experts.")
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.w2.weight"] = t[e]
        else:
            out[name.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = t
    return out


@pytest.mark.mergekit
@pytest.mark.parametrize("case", ["linear", "task_arithmetic", "ties_experts_untrimmed"])
def test_mixtral_equals_mergekit(mixtral, tmp_path, case):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    if case == "ties_experts_untrimmed":  # attention trimmed (density 0.3), experts kept whole
        cfg = _mixtral_cfg(mixtral, "ties", [{"filter": "experts", "value": 1.0}, {"value": 0.3}])
    else:
        cfg = _mixtral_cfg(mixtral, case, None)
        if case == "linear":
            cfg["models"].append({"model": str(mixtral["base"]), "parameters": {"weight": 0.2}})
            del cfg["base_model"]
    run_merge(MergeConfiguration.model_validate(cfg), str(tmp_path / "mk"),
              MergeOptions(quiet=True, write_model_card=False, copy_tokenizer=False))
    assert _run(tmp_path, cfg, tmp_path / "ev") == 0
    expected, got = _as_per_expert(_tensors(tmp_path / "mk")), _tensors(tmp_path / "ev")
    assert sorted(got) == sorted(expected)
    for name, want in expected.items():
        assert (got[name] - want).abs().max().item() <= 1e-5, name
    base = _tensors(mixtral["base"])
    assert not torch.allclose(got["model.layers.1.block_sparse_moe.experts.2.w3.weight"],
                              base["model.layers.1.block_sparse_moe.experts.2.w3.weight"])


@pytest.mark.parametrize("method", ["ties", "slerp"])
def test_mixtral_trim_or_slerp_over_an_expert_is_refused(mixtral, tmp_path, capsys, method):
    if method == "ties":
        cfg = _mixtral_cfg(mixtral, "ties", 0.3)
    else:
        cfg = {"merge_method": "slerp", "base_model": str(mixtral["base"]), "parameters": {"t": 0.4},
               "models": [{"model": str(mixtral["base"])}, {"model": str(mixtral["ft1"])}]}
    assert _run(tmp_path, cfg, tmp_path / "out") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if line.startswith("error:")]) == 1
    assert "mixture-of-experts" in err[-1] and "mergekit" in err[-1] and "density: 1.0" in err[-1]
    assert not (tmp_path / "out").exists()


def test_mixtral_filter_mlp_matches_nothing_and_says_so(mixtral, tmp_path, capsys):
    cfg = _mixtral_cfg(mixtral, "task_arithmetic", None)
    cfg["models"][0]["parameters"]["weight"] = [{"filter": "mlp", "value": 0.9}, {"value": 0.5}]
    assert _run(tmp_path, cfg, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "filter 'mlp' of parameter 'weight'" in err and "block_sparse_moe" in err


# ------------------------------------------------------------------ LLaVA


@pytest.fixture(scope="module")
def llava_lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    return make_tiny_llama(root / "lm", 0, vocab_size=46, layers=4)


@pytest.mark.parametrize("vision_layers", [2, 6], ids=["fewer-vision-layers", "more-vision-layers"])
def test_llava_per_layer_gradient_applies_to_text_layers_only(llava_lm, tmp_path, vision_layers):
    from evomerge_core.toyworld.vlm import make_tiny_llava

    a = make_tiny_llava(llava_lm, tmp_path / "a", seed=1, vision_layers=vision_layers)
    b = make_tiny_llava(make_tiny_llama(tmp_path / "lm_b", 5, vocab_size=46, layers=4), tmp_path / "b", seed=2,
                        vision_layers=vision_layers)
    # text layer i of 4 sits at t = i/3: weights (1 - t, t); everything else at t = 0: model a
    cfg = {"merge_method": "linear", "dtype": "float32",
           "models": [{"model": str(a), "parameters": {"weight": [1.0, 0.0]}},
                      {"model": str(b), "parameters": {"weight": [0.0, 1.0]}}]}
    assert _run(tmp_path, cfg, tmp_path / "out") == 0
    got, ta, tb = _tensors(tmp_path / "out"), _tensors(a), _tensors(b)
    vision = [n for n in got if "vision_tower" in n and ".layers." in n]
    assert vision and any(f".layers.{vision_layers - 1}." in n for n in vision)
    for name in vision:
        assert torch.equal(got[name], ta[name].float()), name
    text = [n for n in got if n.startswith("language_model.model.layers.")]
    assert text
    for name in text:
        t = int(name.split(".layers.")[1].split(".")[0]) / 3
        want = (1 - t) * ta[name].float() + t * tb[name].float()
        assert torch.allclose(got[name], want, atol=1e-6), name
    assert not torch.equal(got["language_model.model.layers.3.mlp.up_proj.weight"],
                           ta["language_model.model.layers.3.mlp.up_proj.weight"].float())


def test_vlm_with_plain_llm_points_to_the_vlm_route(llava_lm, tmp_path, capsys):
    from evomerge_core.toyworld.vlm import make_tiny_llava

    vlm = make_tiny_llava(llava_lm, tmp_path / "vlm", seed=1)
    cfg = {"merge_method": "linear", "models": [{"model": str(vlm), "parameters": {"weight": 0.5}},
                                                 {"model": str(llava_lm), "parameters": {"weight": 0.5}}]}
    assert _run(tmp_path, cfg, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "vision-language model (LlavaForConditionalGeneration)" in err
    assert "vlm: true" in err and "docs/vlm.md" in err and not (tmp_path / "out").exists()
