"""DFS dynamic path execution vs. the materialised standard model, against a hand-written
reference of the documented (vLLM-style) semantics; KV cache per hop; export loading; errors."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_models import save_tiny_tokenizer, tiny_llama_config  # noqa: E402

from evomerge_core.kinds.dfs_model import DataflowModel  # noqa: E402
from evomerge_core.kinds.dfs_export import RECIPE_FILE, materialise_dfs  # noqa: E402
from evomerge_core.errors import ConfigError, MergeError, SourceError  # noqa: E402
from evomerge_core.generation.hf_loop import answer_logprobs, greedy_generate  # noqa: E402
from evomerge_core.spaces.dfs import DFSHop, DFSRecipe, DFSSpace, DFSSpaceConfig  # noqa: E402

torch.set_num_threads(1)
TOL = 1e-5


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that logits are O(1) (default init gives near-zero logits,
    which would make any tolerance check vacuous); norms near 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            else:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))


def _save(model: torch.nn.Module, path: Path, seed: int) -> Path:
    _randomise(model, seed)
    model.save_pretrained(path)
    save_tiny_tokenizer(path)
    return path


def make_llama(path: Path, seed: int, *, layers: int = 3, hidden: int = 32, tied: bool = False) -> Path:
    from transformers import LlamaForCausalLM

    cfg = tiny_llama_config(layers=layers, hidden=hidden)
    cfg.tie_word_embeddings = tied
    torch.manual_seed(seed)
    return _save(LlamaForCausalLM(cfg), path, seed)


def make_mistral(path: Path, seed: int) -> Path:
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, sliding_window=4, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )
    torch.manual_seed(seed)
    return _save(MistralForCausalLM(cfg), path, seed)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("dfs")
    return make_llama(root / "a", 11), make_llama(root / "b", 22)


@pytest.fixture(scope="module")
def dyn(pair):
    return DataflowModel.from_pretrained(*pair)


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 64, (2, 9), generator=gen)
    attention = torch.ones_like(ids)
    attention[0, :3] = 0  # left padding in row 0
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": attention, "position_ids": position_ids}


def load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def logits(model, batch) -> torch.Tensor:
    return model(**batch).logits


def random_recipe(rng: random.Random, la: int = 3, lb: int = 3, scaled: bool = True) -> DFSRecipe:
    middle = [DFSHop(model=rng.choice("ab"), layer=rng.randrange(3), scale=rng.uniform(0.2, 1.8) if scaled else 1.0)
              for _ in range(rng.randint(0, 5))]
    first = DFSHop(model="a", layer=0, scale=rng.uniform(0.2, 1.8) if scaled else 1.0)
    last = DFSHop(model="a", layer=la - 1, scale=rng.uniform(0.2, 1.8) if scaled else 1.0)
    return DFSRecipe(model_a="A", model_b="B", path=[first, *middle, last])


@torch.no_grad()
def reference_forward(pair_models, recipe: DFSRecipe, ids: torch.Tensor) -> torch.Tensor:
    """The semantics of docs/dfs.md written out as in vLLM: the residual stream is kept
    separately and hop k's input h (the previous MLP output, or the embeddings) is scaled."""
    model_a, model_b = pair_models
    layers = {"a": model_a.model.layers, "b": model_b.model.layers}
    pos = torch.arange(ids.shape[1])[None]
    emb = model_a.model.embed_tokens(ids)
    pe = model_a.model.rotary_emb(emb, position_ids=pos)
    residual, h = None, emb
    for hop in recipe.path:
        layer = layers[hop.model][hop.layer]
        residual = h * hop.scale if residual is None else residual + h * hop.scale
        a, _ = layer.self_attn(hidden_states=layer.input_layernorm(residual), position_embeddings=pe, attention_mask=None)
        residual = residual + a
        h = layer.mlp(layer.post_attention_layernorm(residual))
    return model_a.lm_head(model_a.model.norm(residual + h))


def test_identity_path_reproduces_model_a_exactly(pair, dyn, batch, tmp_path):
    dyn.set_recipe(DFSRecipe.identity("A", "B", 3))
    expected = logits(load(pair[0]), batch)
    assert expected.abs().max() > 1.0  # non-trivial logits
    assert torch.equal(logits(dyn, batch), expected)
    out = materialise_dfs(DFSRecipe.identity("A", "B", 3), {"A": pair[0], "B": pair[1]}, tmp_path / "id")
    assert torch.equal(logits(load(out), batch), expected)


def test_dynamic_matches_reference_semantics(pair, dyn):
    models = (load(pair[0]), load(pair[1]))
    rng = random.Random(1)
    ids = torch.randint(4, 64, (1, 8), generator=torch.Generator().manual_seed(3))
    for _ in range(4):
        recipe = random_recipe(rng)
        dyn.set_recipe(recipe)
        got = logits(dyn, {"input_ids": ids})
        want = reference_forward(models, recipe, ids)
        assert (got - want).abs().max() <= TOL
    # the scales matter: the same path with all scales 1 gives different logits
    ones = DFSRecipe(model_a="A", model_b="B", path=[h.model_copy(update={"scale": 1.0}) for h in recipe.path])
    assert (reference_forward(models, ones, ids) - want).abs().max() > 1e-2


def test_materialised_model_equals_dynamic_path(pair, dyn, batch, tmp_path):
    rng = random.Random(7)
    for i in range(4):
        recipe = random_recipe(rng)
        out = materialise_dfs(recipe, {"A": pair[0], "B": pair[1]}, tmp_path / f"m{i}")
        model = load(out)
        assert model.config.num_hidden_layers == recipe.num_hops
        dyn.set_recipe(recipe)
        diff = (logits(model, batch) - logits(dyn, batch)).abs().max()
        assert diff <= TOL, (recipe.to_yaml(), float(diff))
        assert DFSRecipe.from_yaml(out / RECIPE_FILE) == recipe


def test_decoded_genomes_materialise_exactly(pair, dyn, batch, tmp_path):
    sp = DFSSpace.from_sources(DFSSpaceConfig(model_a="A", model_b="B", r=2, max_hops=7), {"A": pair[0], "B": pair[1]})
    gen = torch.Generator().manual_seed(5)
    lower, upper = torch.tensor(sp.lower), torch.tensor(sp.upper)
    genome = (lower + (upper - lower) * torch.rand(sp.dim, generator=gen)).tolist()
    recipe = sp.decode(genome)
    assert 2 < recipe.num_hops <= 7
    out = materialise_dfs(recipe, {"A": pair[0], "B": pair[1]}, tmp_path / "g")
    dyn.set_recipe(recipe)
    assert (logits(load(out), batch) - logits(dyn, batch)).abs().max() <= TOL


def test_kv_cache_uses_one_slot_per_hop(dyn):
    # layer b1 appears twice: with a shared slot the cached step would see the wrong keys
    recipe = DFSRecipe(model_a="A", model_b="B", path=[
        DFSHop(model="a", layer=0), DFSHop(model="b", layer=1, scale=1.4), DFSHop(model="b", layer=1, scale=0.6),
        DFSHop(model="a", layer=2, scale=1.2),
    ])
    dyn.set_recipe(recipe)
    ids = torch.randint(4, 64, (1, 6), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        full = dyn(input_ids=ids).logits[:, -1]
        first = dyn(input_ids=ids[:, :-1], use_cache=True)
        assert first.cache.get_seq_length() == 5
        assert len(first.cache.layers) == recipe.num_hops
        step = dyn(input_ids=ids[:, -1:], cache=first.cache, use_cache=True).logits[:, -1]
    assert (step - full).abs().max() <= TOL


def test_export_loads_generates_and_scores_like_dynamic(pair, dyn, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = random_recipe(random.Random(3))
    out = materialise_dfs(recipe, {"A": pair[0], "B": pair[1]}, tmp_path / "gen")
    assert {"config.json", "generation_config.json", "tokenizer.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    model = AutoModelForCausalLM.from_pretrained(out)  # plain load, no trust_remote_code
    tok = AutoTokenizer.from_pretrained(out)
    enc = tok(["abc def"], return_tensors="pt")
    generated = model.generate(**enc, max_new_tokens=6, do_sample=False)
    assert generated.shape == (1, enc["input_ids"].shape[1] + 6)
    dyn.set_recipe(recipe)
    prompts = ["abc", "hello there", "x"]
    got = greedy_generate(dyn, tok, prompts, max_new_tokens=6, stop_strings=())
    assert got == greedy_generate(model.eval(), tok, prompts, max_new_tokens=6, stop_strings=())
    lp_dyn = answer_logprobs(dyn, tok, prompts, ["ab", "c", "yz"])
    lp_exp = answer_logprobs(model, tok, prompts, ["ab", "c", "yz"])
    assert max(abs(x - y) for x, y in zip(lp_dyn, lp_exp)) <= 1e-4


def test_tied_embeddings_are_untied_when_the_first_scale_folds_in(tmp_path, batch):
    a = make_llama(tmp_path / "ta", 31, tied=True)
    b = make_llama(tmp_path / "tb", 32, tied=True)
    dyn = DataflowModel.from_pretrained(a, b)
    scaled = DFSRecipe(model_a="A", model_b="B",
                       path=[DFSHop(model="a", layer=0, scale=0.5), DFSHop(model="b", layer=2, scale=1.5), DFSHop(model="a", layer=2)])
    out = materialise_dfs(scaled, {"A": a, "B": b}, tmp_path / "untied")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    model = load(out)
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    dyn.set_recipe(scaled)
    assert (logits(model, batch) - logits(dyn, batch)).abs().max() <= TOL
    plain = scaled.model_copy(update={"path": [scaled.path[0].model_copy(update={"scale": 1.0}), *scaled.path[1:]]})
    out2 = materialise_dfs(plain, {"A": a, "B": b}, tmp_path / "tied")
    assert json.loads((out2 / "config.json").read_text())["tie_word_embeddings"] is True
    dyn.set_recipe(plain)
    assert (logits(load(out2), batch) - logits(dyn, batch)).abs().max() <= TOL


def test_mistral_sliding_window_path(tmp_path, batch):
    a, b = make_mistral(tmp_path / "ma", 41), make_mistral(tmp_path / "mb", 42)
    dyn = DataflowModel.from_pretrained(a, b)
    recipe = random_recipe(random.Random(11))
    out = materialise_dfs(recipe, {"A": a, "B": b}, tmp_path / "mout")
    model = load(out)
    assert type(model).__name__ == "MistralForCausalLM"
    dyn.set_recipe(recipe)
    assert (logits(model, batch) - logits(dyn, batch)).abs().max() <= TOL


def test_bad_inputs(pair, tmp_path):
    from transformers import BertConfig

    wide = make_llama(tmp_path / "wide", 5, hidden=48)
    with pytest.raises(SourceError, match="hidden_size"):
        DataflowModel.from_pretrained(pair[0], wide)
    recipe = DFSRecipe.identity("A", "W", 3)
    with pytest.raises(SourceError, match="hidden_size"):
        materialise_dfs(recipe, {"A": pair[0], "W": wide}, tmp_path / "x")
    bert = tmp_path / "bert"
    BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64).save_pretrained(bert)
    with pytest.raises(SourceError, match="DFS does not support"):
        materialise_dfs(DFSRecipe.identity("A", "BERT", 3), {"A": pair[0], "BERT": bert}, tmp_path / "y")
    with pytest.raises(SourceError, match="DFS does not support"):
        DFSSpace.from_sources(DFSSpaceConfig(model_a="BERT", model_b="A"), {"A": pair[0], "BERT": bert})
    too_deep = DFSRecipe(model_a="A", model_b="B", path=[DFSHop(model="b", layer=3)])
    with pytest.raises(ConfigError, match="only 3 layers"):
        materialise_dfs(too_deep, {"A": pair[0], "B": pair[1]}, tmp_path / "z")
    with pytest.raises(SourceError, match="not resolved"):
        materialise_dfs(DFSRecipe.identity("A", "B", 3), {"A": pair[0]}, tmp_path / "z")
    assert not (tmp_path / "x").exists() and not (tmp_path / "z").exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(MergeError, match="not empty"):
        materialise_dfs(DFSRecipe.identity("A", "B", 3), {"A": pair[0], "B": pair[1]}, busy)
    assert (busy / "keep.txt").read_text() == "x"
    with pytest.raises(RuntimeError, match="set_recipe"):
        DataflowModel.from_pretrained(*pair)(input_ids=torch.tensor([[5, 6]]))


def test_bfloat16_dynamic_path_matches_bfloat16_export(pair, batch, tmp_path):
    from transformers import AutoModelForCausalLM

    recipe = random_recipe(random.Random(21))
    out = materialise_dfs(recipe, {"A": pair[0], "B": pair[1]}, tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text()).get("dtype") == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    dyn = DataflowModel.from_pretrained(*pair, dtype=torch.bfloat16).set_recipe(recipe)
    # Both sides fold scales with the same float32-then-round step, so they run on identical
    # bf16 weights; a different rounding would show up as a bf16 ulp (~0.03 at |logit| ~ 4).
    diff = (logits(model, batch).float() - logits(dyn, batch).float()).abs().max()
    assert diff <= 1e-3


def test_get_dataflow_model_caches_per_process(pair):
    from evomerge_core.kinds.cache import clear_model_cache
    from evomerge_core.kinds.dfs_model import get_dataflow_model

    first = get_dataflow_model(*pair)
    assert get_dataflow_model(*pair) is first
    clear_model_cache()
    assert get_dataflow_model(*pair) is not first
    clear_model_cache()
