"""The toy world's VLM pieces: seeded scenes, disjoint splits, VQA rows, the search config,
and that `train_vlm` trains (loss falls) a tiny LLaVA on image questions."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evomerge_core.config.schema import parse_run_config  # noqa: E402
from evomerge_core.toyworld.vlm import (  # noqa: E402
    COLOURS,
    Scene,
    VLMRecipe,
    VLMZoo,
    answer,
    draw_scene,
    split_scenes,
    train_vlm,
    vqa_row,
    vlm_search_config,
)


def test_scene_is_seeded_and_shows_its_colour_and_count():
    import numpy as np

    scene = Scene("blue", 3, 5)
    a, b = np.asarray(draw_scene(scene)), np.asarray(draw_scene(scene))
    assert a.shape == (32, 32, 3) and (a == b).all()
    blue = (a == np.array(COLOURS["blue"], dtype=np.uint8)).all(axis=2)
    assert blue.sum() == 3 * 36  # three 6x6 squares, never overlapping (one per grid cell)
    assert not (np.asarray(draw_scene(Scene("blue", 3, 6))) == a).all()


def test_answers_by_language():
    scene = Scene("red", 2, 0)
    assert answer(scene, "color", "en") == "red" and answer(scene, "count", "en") == "2"
    assert answer(scene, "count", "ja") == "２"  # full-width: the toy JA expert's script
    row = vqa_row(scene, "count", "ja", "images/x.png")
    assert row == {"image": "images/x.png", "prompt": "かず：", "answer": "２", "kind": "count", "lang": "ja"}


def test_splits_are_disjoint_and_cover_every_combination():
    splits = split_scenes(10, 2)
    seen = [set(splits[s]) for s in ("train", "validation", "test")]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    assert len(splits["test"]) == 2 * len(COLOURS) * 4 and len(splits["train"]) == 6 * len(COLOURS) * 4


def test_search_config_is_a_valid_vlm_run(tmp_path):
    zoo = VLMZoo(root=tmp_path, models={"vlm": tmp_path / "vlm", "lang": tmp_path / "lang", "base": tmp_path / "base"},
                 tasks={lang: {s: tmp_path / f"{lang}_{s}.jsonl" for s in ("train", "validation", "test")} for lang in ("en", "ja")})
    config = parse_run_config(vlm_search_config(zoo, seed=1, evaluations=16, storage="file:///tmp/x", run_key="k"))
    assert config.vlm == str(tmp_path / "vlm") and config.base == str(tmp_path / "base")
    assert config.fitness.scorer == "vqa_rouge_l" and config.fitness.options["target_script"] == "fullwidth"
    assert config.fitness.dataset.num_items == 160 and config.fitness.test.path.endswith("ja_test.jsonl")


def test_train_vlm_lowers_the_loss(tmp_path):
    from tiny_models import make_tiny_llama

    from evomerge_core.toyworld.vlm import make_tiny_llava
    from evomerge_core.kinds.vlm import load_processor, load_vlm_model

    torch.set_num_threads(1)
    base = make_tiny_llama(tmp_path / "base", 0)
    vlm_dir = make_tiny_llava(base, tmp_path / "vlm", seed=1)
    model, processor = load_vlm_model(vlm_dir), load_processor(vlm_dir)
    scenes = [Scene(c, n, 0) for c in ("red", "blue") for n in (1, 2)]
    images, rows = {}, []
    for s in scenes:
        name = f"{s.colour}{s.count}"
        images[name] = processor.image_processor(draw_scene(s), return_tensors="pt")["pixel_values"][0]
        # the tiny tokenizer has no ':'; the question text does not matter here
        rows.append({"image": name, "prompt": "color", "answer": s.colour})
    losses = []
    recipe = VLMRecipe(steps=60, lr=3e-3, batch_size=8)
    train_vlm(model, processor, {("en", "color"): rows}, images, VLMRecipe(**{**recipe.__dict__, "mixture": (("en", "color", 1.0),)}),
              on_step=lambda step, loss: losses.append(loss))
    assert len(losses) == 60
    assert sum(losses[-10:]) / 10 < 0.7 * sum(losses[:10]) / 10  # measured: 4.05 -> 2.30


def test_vlm_build_is_bit_identical(tmp_path):
    """The VLM zoo's model step (`make_trained_vlm`, what `build_vlm_zoo` runs) gives the same
    bytes twice: the cache keyed by the recipe hash may be rebuilt anywhere."""
    from tiny_models import make_tiny_llama

    from evomerge_core.toyworld.vlm import make_trained_vlm, write_vqa_split

    base = make_tiny_llama(tmp_path / "base", 0)
    scenes = [Scene(c, n, 0) for c in ("red", "blue") for n in (1, 3)]
    rows = write_vqa_split(tmp_path, "train", scenes)
    recipe = VLMRecipe(steps=6, batch_size=4)  # every mixture entry: en color/count, ja, ja_en
    blobs = []
    for run in ("a", "b"):
        make_trained_vlm(base, tmp_path / run, tmp_path / "tasks", rows, recipe)
        blobs.append((tmp_path / run / "model.safetensors").read_bytes())
    assert blobs[0] == blobs[1]
    from safetensors.torch import load_file

    trained, untrained = load_file(tmp_path / "a" / "model.safetensors"), load_file(base / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(trained[f"language_model.{name}"], untrained[name])  # it did train


def test_ja_en_pool_asks_in_ja_and_answers_in_ascii():
    from evomerge_core.toyworld.vlm import training_pool

    scene = Scene("red", 3, 0)
    rows = {"en": [vqa_row(scene, "count", "en", "x.png")], "ja": [vqa_row(scene, "count", "ja", "x.png")]}
    assert [(r["prompt"], r["answer"]) for r in training_pool(rows, "ja_en", "count")] == [("かず：", "3")]
    assert [r["answer"] for r in training_pool(rows, "ja", "count")] == ["３"]


def test_tiny_llava_does_not_depend_on_the_global_rng(tmp_path):
    """The LM's vocabulary grows by the image token (a new random embedding row): it is drawn
    from the build's seed, not from whatever state the global RNG is in."""
    from tiny_models import make_tiny_llama

    from evomerge_core.toyworld.vlm import make_tiny_llava

    base = make_tiny_llama(tmp_path / "base", 0, vocab_size=46)  # full: the image token needs a new row
    blobs = []
    for state in (1, 2):
        torch.manual_seed(state)
        make_tiny_llava(base, tmp_path / f"vlm{state}", seed=0)
        blobs.append((tmp_path / f"vlm{state}" / "model.safetensors").read_bytes())
    import json

    assert json.loads((tmp_path / "vlm1" / "config.json").read_text())["text_config"]["vocab_size"] == 47  # it grew
    assert blobs[0] == blobs[1]
