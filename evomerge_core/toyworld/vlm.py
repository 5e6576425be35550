"""The toy world's VLM pair: a tiny LLaVA that answers questions about synthetic images in EN,
and the JA language expert (the LLM zoo's `lang`); the target is answering in JA.

- Images (`draw_scene`): 32x32 RGB, one to four filled shapes (square, cross, bar) of one
  colour on a black background; `scene_rows` writes them as PNG files plus jsonl rows with an
  image-path column (``image``), ``prompt`` (the question) and ``answer``.
- Questions: EN ``color:`` / ``count:`` (answers ``red`` ... / ``3``) and JA ``いろ：`` /
  ``かず：`` (answers ``あか`` ... / ``さん``); JA answers are hiragana, so the `japanese` script
  check of `vqa_rouge_l` applies and an EN answer to a JA question scores 0.
- `make_tiny_llava(lm_dir, out_dir)`: a LLaVA around a saved Llama (tiny CLIP vision tower:
  hidden 32, 2 layers, image 32, patch 8; an ``<image>`` token added to the tokenizer; a
  LlavaProcessor with a one-turn chat template), loadable offline with
  `AutoModelForImageTextToText` / `AutoProcessor`.
- `build_vlm_zoo()`: trains the VLM from the LLM zoo's `base` on EN questions (plus a few JA
  ones) and caches it under ``<cache>/toyworld/vlm-<hash>/`` like the LLM zoo;
  `vlm_search_config` is the run config of the PS search (VLM + `lang`, `vqa_rouge_l` on JA).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

IMAGE_TOKEN = "<image>"
IMAGE_SIZE = 32
PATCH_SIZE = 8
# One user turn: the image then the question; the model's answer follows directly.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endfor %}"
)


def make_tiny_llava(lm_dir: Path | str, out_dir: Path | str, *, seed: int = 0, vision_hidden: int = 32,
                    vision_layers: int = 2, next_variant: bool = False) -> Path:
    """Write a tiny LLaVA (or LLaVA-NeXT) whose language model is the saved causal LM in
    `lm_dir` (weights copied), with a seeded tiny CLIP vision tower and projector, and its
    processor. Returns `out_dir`."""
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
    )

    out_dir = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(lm_dir))
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    saved = json.loads((Path(lm_dir) / "config.json").read_text())
    dtype = getattr(torch, str(saved.get("dtype") or saved.get("torch_dtype") or "float32"))
    lm = AutoModelForCausalLM.from_pretrained(str(lm_dir), dtype=torch.float32)
    if image_id >= lm.config.vocab_size:
        lm.resize_token_embeddings(image_id + 1, mean_resizing=False)
    vision = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                              num_hidden_layers=vision_layers, num_attention_heads=4,
                              image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    common = dict(text_config=lm.config, vision_config=vision, image_token_index=image_id,
                  vision_feature_select_strategy="default", vision_feature_layer=-1,
                  tie_word_embeddings=lm.config.tie_word_embeddings)
    torch.manual_seed(seed)
    if next_variant:
        config = LlavaNextConfig(**common, image_grid_pinpoints=[[IMAGE_SIZE, IMAGE_SIZE]])
        model = LlavaNextForConditionalGeneration(config)
    else:
        config = LlavaConfig(**common, image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2)
        model = LlavaForConditionalGeneration(config)
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.load_state_dict(lm.lm_head.state_dict())
    model.generation_config = lm.generation_config
    model = model.to(dtype)
    model.save_pretrained(out_dir)
    make_processor(tokenizer, next_variant=next_variant).save_pretrained(out_dir)
    return out_dir


def make_processor(tokenizer: Any, *, next_variant: bool = False) -> Any:
    """A LlavaProcessor (or LlavaNextProcessor) for 32x32 images around `tokenizer`."""
    import warnings

    from transformers import CLIPImageProcessor, LlavaNextProcessor, LlavaProcessor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        images = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                    do_center_crop=True, image_grid_pinpoints=[[IMAGE_SIZE, IMAGE_SIZE]])
    cls = LlavaNextProcessor if next_variant else LlavaProcessor
    return cls(image_processor=images, tokenizer=tokenizer, patch_size=PATCH_SIZE, vision_feature_select_strategy="default",
               chat_template=CHAT_TEMPLATE, image_token=IMAGE_TOKEN, num_additional_image_tokens=1)


# --------------------------------------------------------------------------- scenes

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40)}
JA_COLOURS = {"red": "あか", "green": "みどり", "blue": "あお", "yellow": "きいろ"}
EN_COUNTS = {1: "one", 2: "two", 3: "three", 4: "four"}
JA_COUNTS = {1: "いち", 2: "に", 3: "さん", 4: "よん"}
QUESTIONS = {"en": {"color": "color:", "count": "count:"}, "ja": {"color": "いろ：", "count": "かず："}}


@dataclass(frozen=True)
class Scene:
    """What an image shows: `count` shapes of one colour at seeded places."""

    colour: str
    count: int
    seed: int


def draw_scene(scene: Scene) -> Any:
    """The 32x32 RGB PIL image of a scene (seeded positions; 6x6 squares on a 4x4 grid)."""
    import numpy as np
    from PIL import Image

    rng = random.Random(f"scene-{scene.seed}")
    cells = rng.sample(range(16), scene.count)
    pixels = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for cell in cells:
        y, x = divmod(cell, 4)
        oy, ox = 8 * y + rng.randint(0, 2), 8 * x + rng.randint(0, 2)
        pixels[oy:oy + 6, ox:ox + 6] = COLOURS[scene.colour]
    return Image.fromarray(pixels)


def answer(scene: Scene, kind: str, lang: str) -> str:
    """The reference answer to a question of `kind` (color | count) in `lang` (en | ja)."""
    if kind == "color":
        return scene.colour if lang == "en" else JA_COLOURS[scene.colour]
    return EN_COUNTS[scene.count] if lang == "en" else JA_COUNTS[scene.count]


def all_scenes(seeds_per_combo: int) -> list[Scene]:
    """Every colour x count combination, `seeds_per_combo` layouts each."""
    return [Scene(c, n, s) for c in COLOURS for n in EN_COUNTS for s in range(seeds_per_combo)]
