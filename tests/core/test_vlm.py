"""VLM merging: the architecture map (both on-disk layouts), source validation, the round trip
(weight 0 gives the VLM back, weight 1 gives the LLM's language model, vision tower and
projector always bit-identical), in-place merging and the materialised directory."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tiny_models import make_tiny_llama  # noqa: E402

from evomerge_core.errors import SourceError  # noqa: E402
from evomerge_core.io.model_files import LazyModelReader  # noqa: E402
from evomerge_core.merge.recipe import MergeRecipe, ModelEntry  # noqa: E402
from evomerge_core.toyworld.vlm import make_tiny_llava  # noqa: E402
from evomerge_core.sources.vlm_families import VLM_FAMILIES, supported_architectures  # noqa: E402
from evomerge_core.kinds.vlm import (  # noqa: E402
    ResidentVLM,
    merge_vlm_to_dir,
    open_vlm,
    read_lm_state_dict,
    validate_vlm_sources,
)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    """bf16 tiny Llama base, a fine-tune (the LLM), a LLaVA around the base (the VLM), the
    same VLM re-saved with in-memory names, a LLaVA-NeXT, and misfits."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("vlm-zoo")
    # vocab 46 = the tokenizer's size, so the image token adds a row (like LLaVA's 32064 vs 32000).
    base = make_tiny_llama(root / "base", 0, vocab_size=46, dtype=torch.bfloat16)
    llm = make_tiny_llama(root / "llm", 1, base=base, noise=0.05, dtype=torch.bfloat16)
    vlm = make_tiny_llava(base, root / "vlm", seed=3)
    mem = root / "vlm_mem"
    shutil.copytree(vlm, mem)
    from safetensors.torch import save_file
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(vlm, dtype=torch.bfloat16)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(mem / "model.safetensors"), metadata={"format": "pt"})
    return {
        "base": base,
        "llm": llm,
        "vlm": vlm,
        "vlm_mem": mem,
        "next": make_tiny_llava(base, root / "next", seed=4, next_variant=True),
        "wide": make_tiny_llama(root / "wide", 5, hidden=64, dtype=torch.bfloat16),
    }


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    reader = LazyModelReader(path)
    return {n: reader.get(n) for n in reader.names()}


def _recipe(method: str, vlm: str, llm: str, w_llm: float, *, base: str | None = None, w_vlm: float | None = None) -> MergeRecipe:
    models = [ModelEntry(model=llm, parameters={"weight": w_llm})]
    if w_vlm is not None:
        models.insert(0, ModelEntry(model=vlm, parameters={"weight": w_vlm}))
    return MergeRecipe(merge_method=method, base_model=base, models=models)


# --------------------------------------------------------------------------- the map


def test_transformers_saves_the_checkpoint_layout(zoo):
    ckpt = open_vlm(zoo["vlm"])
    assert ckpt.family.name == "llava" and ckpt.layout.name == "checkpoint"
    names = LazyModelReader(zoo["vlm"]).names()
    assert "language_model.lm_head.weight" in names and "language_model.model.layers.0.self_attn.q_proj.weight" in names
    assert any(n.startswith("vision_tower.") for n in names)
    assert "multi_modal_projector.linear_1.weight" in names and "multi_modal_projector.linear_2.weight" in names
    assert ckpt.lm_names["lm_head.weight"] == "language_model.lm_head.weight"
    assert ckpt.lm_names["model.layers.1.mlp.up_proj.weight"] == "language_model.model.layers.1.mlp.up_proj.weight"
    # Everything that is not the LM is vision tower or projector, and is kept.
    assert ckpt.other_names and all(n.startswith(ckpt.family.kept_prefixes) for n in ckpt.other_names)


def test_both_layouts_map_to_the_same_language_model(zoo):
    disk, mem = open_vlm(zoo["vlm"]), open_vlm(zoo["vlm_mem"])
    assert mem.layout.name == "in-memory"
    assert mem.lm_names["model.embed_tokens.weight"] == "model.language_model.embed_tokens.weight"
    assert mem.lm_names["lm_head.weight"] == "lm_head.weight"
    assert set(disk.lm_names) == set(mem.lm_names)
    a, b = read_lm_state_dict(disk), read_lm_state_dict(mem)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The VLM's LM is the base LLM (plus one vocabulary row for the image token).
    base = _tensors(zoo["base"])
    assert set(a) == set(base)
    assert torch.equal(a["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
    assert a["model.embed_tokens.weight"].shape[0] == base["model.embed_tokens.weight"].shape[0] + 1


def test_llava_next_is_in_the_map(zoo):
    ckpt = open_vlm(zoo["next"])
    assert ckpt.family is VLM_FAMILIES["llava_next"]
    assert "image_newline" in ckpt.other_names
    assert set(ckpt.lm_names) == set(open_vlm(zoo["vlm"]).lm_names)


def test_unknown_vlm_family_lists_the_supported_ones(zoo, tmp_path):
    other = tmp_path / "qwen"
    shutil.copytree(zoo["vlm"], other)
    config = json.loads((other / "config.json").read_text())
    config["architectures"] = ["Qwen2VLForConditionalGeneration"]
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(SourceError) as err:
        validate_vlm_sources({"vlm": other, "llm": zoo["llm"]}, vlm="vlm")
    assert "Qwen2VLForConditionalGeneration" in str(err.value)
    for name in supported_architectures():
        assert name in str(err.value)
    with pytest.raises(SourceError, match="not a supported VLM"):  # an LLM marked as the VLM
        validate_vlm_sources({"vlm": zoo["llm"], "llm": zoo["base"]}, vlm="vlm")


# --------------------------------------------------------------------------- validation


def test_llm_of_another_size_is_refused(zoo):
    with pytest.raises(SourceError, match="hidden_size 64 .* has 32"):
        validate_vlm_sources({"vlm": zoo["vlm"], "wide": zoo["wide"]}, vlm="vlm")


def test_llm_of_another_family_is_refused(zoo, tmp_path):
    other = tmp_path / "mistral"
    shutil.copytree(zoo["llm"], other)
    config = json.loads((other / "config.json").read_text())
    config.update(model_type="mistral", architectures=["MistralForCausalLM"])
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(SourceError, match="is a mistral model but the language model of VLM 'vlm' is a llama"):
        validate_vlm_sources({"vlm": zoo["vlm"], "m": other}, vlm="vlm")


def test_valid_pair_reports_layers(zoo):
    info = validate_vlm_sources({"vlm": zoo["vlm"], "llm": zoo["llm"]}, vlm="vlm")
    assert info.num_layers == 2
    assert info.lm_shapes["model.embed_tokens.weight"][0] == 47


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("layout", ["vlm", "vlm_mem"])
def test_weight_zero_gives_the_vlm_back_exactly(zoo, tmp_path, layout):
    vlm = str(zoo[layout])
    sources = {vlm: zoo[layout], "llm": zoo["llm"]}
    for recipe in (_recipe("task_arithmetic", vlm, "llm", 0.0, base=vlm),
                   _recipe("linear", vlm, "llm", 0.0, w_vlm=1.0)):
        out = merge_vlm_to_dir(recipe, sources, tmp_path / recipe.merge_method, vlm=vlm)
        got, want = _tensors(out), _tensors(zoo[layout])
        assert list(got) == list(want)  # same names, same order, same layout
        for name in want:
            assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name


def test_weight_one_gives_the_llm_language_model(zoo, tmp_path):
    vlm = str(zoo["vlm"])
    out = merge_vlm_to_dir(_recipe("task_arithmetic", vlm, "llm", 1.0, base=vlm), {vlm: zoo["vlm"], "llm": zoo["llm"]},
                           tmp_path / "one", vlm=vlm)
    merged = read_lm_state_dict(open_vlm(out))
    llm = _tensors(zoo["llm"])
    source_lm = read_lm_state_dict(open_vlm(zoo["vlm"]))
    for name, tensor in llm.items():
        got = merged[name]
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            assert torch.equal(got[: tensor.shape[0]], tensor), name
            assert torch.equal(got[tensor.shape[0]:], source_lm[name][tensor.shape[0]:])  # image-token row kept
        else:
            assert torch.equal(got, tensor), name
    # The vision tower and projector are the VLM's, bit for bit.
    ckpt, before = open_vlm(out), _tensors(zoo["vlm"])
    after = _tensors(out)
    for name in ckpt.other_names:
        assert torch.equal(after[name], before[name]), name


def test_resident_vlm_matches_the_materialised_merge(zoo, tmp_path):
    vlm = str(zoo["vlm"])
    sources = {vlm: zoo["vlm"], "llm": zoo["llm"]}
    recipe = MergeRecipe(merge_method="ties", base_model=vlm,
                         models=[ModelEntry(model="llm", parameters={"weight": 0.7, "density": 0.5})])
    out = merge_vlm_to_dir(recipe, sources, tmp_path / "ties", vlm=vlm, dtype="float32")
    resident = ResidentVLM(sources, vlm=vlm, num_layers=2)
    vision_before = {k: v.clone() for k, v in resident.model.state_dict().items() if "vision_tower" in k or "projector" in k}
    resident.apply(recipe)
    state = resident.model.state_dict()
    disk = _tensors(out)
    ckpt = open_vlm(out)
    for canonical, disk_name in ckpt.lm_names.items():
        mem_name = ckpt.family.memory.vlm_name(canonical)
        assert torch.equal(state[mem_name], disk[disk_name].to(state[mem_name].dtype)), canonical
    for name, value in vision_before.items():
        assert torch.equal(state[name], value), name
    assert resident.tokenizer is resident.processor.tokenizer


def test_materialised_vlm_loads_and_answers(zoo, tmp_path):
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from evomerge_core.fitness.vqa import vqa_generate, vqa_prompts

    vlm = str(zoo["vlm"])
    out = merge_vlm_to_dir(_recipe("task_arithmetic", vlm, "llm", 0.5, base=vlm), {vlm: zoo["vlm"], "llm": zoo["llm"]},
                           tmp_path / "half", vlm=vlm, dtype="float32")
    assert (out / "chat_template.jinja").is_file() and (out / "processor_config.json").is_file()
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    texts = vqa_prompts(processor, ["what color", "how many"])
    answers = vqa_generate(model, processor, [image, image], texts, max_new_tokens=4)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert any(answers)  # a random tiny model still emits characters
    # one cap per prompt (fitness.budget.length_caps): each row equals that row alone with its cap
    capped = vqa_generate(model, processor, [image, image], texts, max_new_tokens=[1, 4])
    alone = vqa_generate(model, processor, [image], texts[:1], max_new_tokens=1)
    assert capped[1] == answers[1] and capped[0] == alone[0]
    with pytest.raises(ValueError, match="one per prompt"):
        vqa_generate(model, processor, [image, image], texts, max_new_tokens=[1])
