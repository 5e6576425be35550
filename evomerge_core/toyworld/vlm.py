"""The toy world's VLM pair: a tiny LLaVA that answers questions about synthetic images in EN,
and the JA language expert (the LLM zoo's `lang`); the target is answering in JA.

- Images (`draw_scene`): 32x32 RGB, one to four filled shapes (square, cross, bar) of one
  colour on a black background; `scene_rows` writes them as PNG files plus jsonl rows with an
  image-path column (``image``), ``prompt`` (the question) and ``answer``.
- Questions: EN ``color:`` / ``count:`` (answers ``red`` ... / ``3``) and JA ``かず：`` (how
  many; answer ``３``, full-width, the script the toy JA expert writes). The target is the JA
  question, scored with the ``fullwidth`` script check: an ASCII ``3`` scores 0.
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
import math
import random
import shutil
import sys
import tempfile
import time
import unicodedata
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evomerge_core.errors import UsageError
from evomerge_core.fitness.vqa import item_score, vqa_generate, vqa_prompts
from evomerge_core.kinds import vlm as vlm_core
from evomerge_core.merge.recipe import MergeRecipe, ModelEntry

from .evaluate import quiet_progress
from .tasks import fullwidth
from .train import deterministic_torch, optimise
from .zoo import build_zoo, default_cache_dir, publish_build, read_rows

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
    from transformers import (  # deferred: 1.5 s import; only the VLM toy world needs it
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
    # Seed before the resize too: the image token's new embedding row is drawn at random.
    torch.manual_seed(seed)
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
    from transformers import CLIPImageProcessor, LlavaNextProcessor, LlavaProcessor  # deferred: 1.5 s import; only the VLM toy world needs it

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
COUNTS = (1, 2, 3, 4)
QUESTIONS = {"en": {"color": "color:", "count": "count:"}, "ja": {"color": "いろ：", "count": "かず："}}


@dataclass(frozen=True)
class Scene:
    """What an image shows: `count` shapes of one colour at seeded places."""

    colour: str
    count: int
    seed: int


def draw_scene(scene: Scene) -> Any:
    """The 32x32 RGB PIL image of a scene (seeded positions; 6x6 squares on a 4x4 grid)."""
    from PIL import Image  # deferred: Pillow is optional, only VLM worlds draw images

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
    # Counts are digits: ASCII in EN, full-width in JA (what the toy JA expert writes).
    return str(scene.count) if lang == "en" else fullwidth(str(scene.count))


def all_scenes(seeds_per_combo: int) -> list[Scene]:
    """Every colour x count combination, `seeds_per_combo` layouts each."""
    return [Scene(c, n, s) for c in COLOURS for n in COUNTS for s in range(seeds_per_combo)]


# --------------------------------------------------------------------------- VQA rows

Row = dict[str, Any]


def vqa_row(scene: Scene, kind: str, lang: str, image: str) -> Row:
    """One VQA item: image path, question, reference answer."""
    return {"image": image, "prompt": QUESTIONS[lang][kind], "answer": answer(scene, kind, lang),
            "kind": kind, "lang": lang}


def split_scenes(layouts: int, test_layouts: int) -> dict[str, list[Scene]]:
    """Scenes by split: layouts [0, layouts - 2*test) train, then validation, then test."""
    train_n = layouts - 2 * test_layouts
    scenes = all_scenes(layouts)
    return {
        "train": [s for s in scenes if s.seed < train_n],
        "validation": [s for s in scenes if train_n <= s.seed < train_n + test_layouts],
        "test": [s for s in scenes if s.seed >= train_n + test_layouts],
    }


# --------------------------------------------------------------------------- training

# Mixture languages: "en", "ja", and "ja_en" (a JA question answered in EN, ASCII digits: what
# an English VLM does with a question in another language it half understands).
MIXTURE_LANGS = ("en", "ja", "ja_en")


def training_pool(train_rows: dict[str, list[Row]], lang: str, kind: str) -> list[Row]:
    """The train rows of one mixture entry (`lang` in MIXTURE_LANGS)."""
    if lang not in MIXTURE_LANGS:
        raise ValueError(f"unknown mixture language {lang!r}; use one of {', '.join(MIXTURE_LANGS)}")
    if lang == "ja_en":
        return [{**r, "answer": unicodedata.normalize("NFKC", r["answer"])} for r in train_rows["ja"] if r["kind"] == kind]
    return [r for r in train_rows[lang] if r["kind"] == kind]



@dataclass(frozen=True)
class VLMRecipe:
    """Everything that changes the built VLM zoo (hashed into its folder name)."""

    layouts: int = 40  # image layouts per colour x count combination
    test_layouts: int = 6  # layouts held out for validation and for test each
    # EN questions, JA count questions mostly answered in EN (ASCII digits) and a few in JA
    # (full-width): the source VLM then answers JA questions in EN, as LLaVA does (docs/vlm.md).
    mixture: tuple[tuple[str, str, float], ...] = (("en", "color", 1.0), ("en", "count", 1.0), ("ja", "count", 0.01),
                                                   ("ja_en", "count", 0.1))
    steps: int = 600
    lr: float = 1e-3
    batch_size: int = 32
    vision_hidden: int = 32
    seed: int = 0
    threads: int = 1
    code_version: int = 3  # 3: the image token's embedding row is seeded (builds were not reproducible)

    def hash(self, llm_zoo_hash: str) -> str:
        blob = json.dumps({"llm_zoo": llm_zoo_hash, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


# Per LLM zoo size: "demo" is the demo's VLM; "micro" is a quick build around the micro LLM zoo
# for tests of the demo's VLM path (its numbers are not meaningful).
VLM_RECIPES: dict[str, VLMRecipe] = {
    "demo": VLMRecipe(),
    "micro": VLMRecipe(layouts=8, test_layouts=2, steps=120),
}


def _encode_rows(processor: Any, rows: list[Row], images: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """Token ids (prompt + answer + newline) and answer-only labels per row."""
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    n_image = (IMAGE_SIZE // PATCH_SIZE) ** 2
    out = []
    for row in rows:
        text = vqa_prompts(processor, [row["prompt"]])[0]
        prompt_ids: list[int] = []
        for i, piece in enumerate(text.split(IMAGE_TOKEN)):
            if i:  # the processor expands each image token to one token per patch
                prompt_ids += [image_id] * n_image
            prompt_ids += tok(piece, add_special_tokens=False)["input_ids"] if piece else []
        answer_ids = tok(row["answer"] + "\n", add_special_tokens=False)["input_ids"]
        out.append({"ids": prompt_ids + answer_ids, "labels": [-100] * len(prompt_ids) + answer_ids,
                    "pixels": images[row["image"]]})
    return out


def _collate(items: list[dict[str, Any]], pad: int) -> dict[str, torch.Tensor]:
    width = max(len(i["ids"]) for i in items)
    ids = torch.full((len(items), width), pad, dtype=torch.long)
    labels = torch.full((len(items), width), -100, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for r, item in enumerate(items):
        n = len(item["ids"])
        ids[r, :n] = torch.tensor(item["ids"])
        labels[r, :n] = torch.tensor(item["labels"])
        mask[r, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask,
            "pixel_values": torch.stack([i["pixels"] for i in items])}


def train_vlm(model: Any, processor: Any, pools: dict[tuple[str, str], list[Row]], images: dict[str, torch.Tensor],
              recipe: VLMRecipe, on_step: Any = None) -> float:
    """Train the whole VLM in place on the recipe's mixture of (lang, kind) pools; returns
    the mean loss of the last 10% of steps."""
    encoded = {key: _encode_rows(processor, rows, images) for key, rows in pools.items()}
    keys = [(lang, kind) for lang, kind, _ in recipe.mixture]
    weights = [w for _, _, w in recipe.mixture]
    rng = random.Random(f"vlm-train-{recipe.seed}")
    torch.manual_seed(recipe.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01, betas=(0.9, 0.98))
    pad = processor.tokenizer.pad_token_id

    def lr_at(step: int) -> float:
        warm = min(1.0, (step + 1) / 50)
        return recipe.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / recipe.steps)))

    def next_batch() -> dict[str, torch.Tensor]:
        batch = [rng.choice(encoded[key]) for key in rng.choices(keys, weights, k=recipe.batch_size)]
        return _collate(batch, pad)

    return optimise(model, opt, recipe.steps, lr_at, next_batch, on_step)


# --------------------------------------------------------------------------- the zoo

VLM_TASKS = ("en", "ja")


@dataclass(frozen=True)
class VLMZoo:
    """A built VLM zoo: models (``vlm``, ``lang``, ``base``) and VQA task files per language."""

    root: Path
    models: dict[str, Path]
    tasks: dict[str, dict[str, Path]]  # {"en" | "ja": {split: jsonl}}
    target_script: str = "fullwidth"
    max_new_tokens: int = 6
    stop_strings: list[str] = field(default_factory=lambda: ["\n"])


def write_vqa_split(root: Path, split: str, scenes: list[Scene]) -> dict[str, list[Row]]:
    """Write one split's images (``root/tasks/images/``) and its EN/JA VQA rows
    (``root/tasks/{en,ja}_{split}.jsonl``, shuffled); returns the rows by language."""
    rows: dict[str, list[Row]] = {"en": [], "ja": []}
    for scene in scenes:
        name = f"images/{scene.colour}-{scene.count}-{scene.seed}.png"
        path = root / "tasks" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            draw_scene(scene).save(path)
        rows["en"] += [vqa_row(scene, "color", "en", name), vqa_row(scene, "count", "en", name)]
        rows["ja"] += [vqa_row(scene, "count", "ja", name)]
    for lang, items in rows.items():
        random.Random(f"vlm-rows-{split}-{lang}").shuffle(items)  # so a prefix (num_items) mixes all scenes
        with open(root / "tasks" / f"{lang}_{split}.jsonl", "w", encoding="utf-8") as fh:
            for row in items:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return rows


def make_trained_vlm(lm_dir: Path, out_dir: Path, tasks_dir: Path, train_rows: dict[str, list[Row]],
                     recipe: VLMRecipe, on_step: Any = None) -> float:
    """Write the tiny LLaVA around the LM in `lm_dir` to `out_dir` and train it on the recipe's
    mixture of `train_rows` (images under `tasks_dir`); returns the final loss. Deterministic:
    the same inputs give the same bytes (fixed threads, deterministic kernels, seeded)."""
    from PIL import Image  # deferred: Pillow is optional, only VLM worlds draw images

    with deterministic_torch(recipe.threads), quiet_progress():
        vlm_dir = make_tiny_llava(lm_dir, out_dir, seed=recipe.seed, vision_hidden=recipe.vision_hidden)
        model = vlm_core.load_vlm_model(vlm_dir)
        processor = vlm_core.load_processor(vlm_dir)
        names = {r["image"] for rows in train_rows.values() for r in rows}
        images = {n: processor.image_processor(Image.open(tasks_dir / n).convert("RGB"), return_tensors="pt")["pixel_values"][0]
                  for n in sorted(names)}
        pools = {(lang, kind): training_pool(train_rows, lang, kind) for lang, kind, _ in recipe.mixture}
        final = train_vlm(model, processor, pools, images, recipe, on_step)
        model.save_pretrained(vlm_dir)
    return final


def build_vlm_zoo(*, llm_size: str = "demo", cache_dir: Path | None = None, recipe: VLMRecipe | None = None,
                  progress: bool = True) -> VLMZoo:
    """The VLM zoo (built once, then reused from the cache): the tiny LLaVA trained from the
    LLM zoo's `base` on EN questions (and a few JA ones), the JA expert `lang`, and VQA files."""
    if recipe is None:
        if llm_size not in VLM_RECIPES:
            raise UsageError(f"no VLM toy world for size {llm_size!r}; choose one of {', '.join(VLM_RECIPES)}")
        recipe = VLM_RECIPES[llm_size]
    llm_zoo = build_zoo(llm_size, cache_dir=cache_dir, progress=progress)
    root_parent = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "toyworld"
    target = root_parent / f"vlm-{llm_size}-{recipe.hash(llm_zoo.recipe_hash)}"
    if not (target / "zoo.json").is_file():
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=root_parent))
        try:
            started = time.time()
            splits = split_scenes(recipe.layouts, recipe.test_layouts)
            rows = {split: write_vqa_split(tmp, split, scenes) for split, scenes in splits.items()}

            def on_step(step: int, loss: float) -> None:
                if progress and (step + 1) % max(1, recipe.steps // 4) == 0:
                    print(f"toyworld[vlm]: step {step + 1}/{recipe.steps} loss {loss:.3f}", file=sys.stderr, flush=True)

            final = make_trained_vlm(llm_zoo.models["base"], tmp / "models" / "vlm", tmp / "tasks", rows["train"], recipe,
                                     on_step)
            meta = {"recipe": asdict(recipe), "llm_zoo": str(llm_zoo.root), "final_loss": final,
                    "build_seconds": round(time.time() - started, 1)}
            (tmp / "zoo.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
            publish_build(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return VLMZoo(
        root=target,
        models={"vlm": target / "models" / "vlm", "lang": llm_zoo.models["lang"], "base": llm_zoo.models["base"]},
        tasks={lang: {s: target / "tasks" / f"{lang}_{s}.jsonl" for s in ("train", "validation", "test")} for lang in VLM_TASKS},
    )


# The search settings, chosen on JA validation only (docs/vlm.md, benchmarks/vlm_tuning.py).
VLM_SEARCH_METHOD = "ties"
DEFAULT_VLM_EVALUATIONS = 144  # 18 generations of 8


def vlm_search_label(method: str = VLM_SEARCH_METHOD) -> str:
    """How the demo table names the search (``TIES, CMA-ES``)."""
    names = {"ties": "TIES", "dare_ties": "DARE-TIES", "task_arithmetic": "task arithmetic"}
    return f"{names.get(method, method)}, CMA-ES"


def vlm_search_config(zoo: VLMZoo, *, seed: int, evaluations: int, storage: str, run_key: str,
                      method: str = VLM_SEARCH_METHOD, fitness_items: int | None = 160) -> dict[str, Any]:
    """The run config of the toy EvoVLM search: PS (density, weight per model from x0 0.5, task
    vectors against the LLM zoo's base) over the VLM's language model and the JA expert,
    fitness = ROUGE-L of JA answers with the full-width script check on JA train; selection
    sees JA train only, JA test is held out."""
    def data(split: str, num_items: int | None = None) -> dict[str, Any]:
        return {"path": str(zoo.tasks["ja"][split]), **({"num_items": num_items} if num_items else {})}

    return {
        "run_key": run_key,
        "storage": storage,
        "sources": [{"model": str(zoo.models["vlm"]), "vlm": True}, {"model": str(zoo.models["lang"])},
                    {"model": str(zoo.models["base"]), "base": True}],
        "space": {"ps": {"method": method, "params": ["density", "weight"], "merge_seed": seed}},
        "optimizer": {"seed": seed, "evaluations": evaluations},
        "fitness": {
            "dataset": data("train", fitness_items),
            "test": data("test"),
            "scorer": "vqa_rouge_l",
            "options": {"target_script": zoo.target_script, "tokenize": "chars"},
            "max_new_tokens": zoo.max_new_tokens,
            "stop_strings": list(zoo.stop_strings),
            "batch_size": 64,
        },
        "runtime": {"device": "cpu", "dtype": "float32", "torch_threads": 1},
        "output": {"materialise_best": True, "report": False},
    }


# --------------------------------------------------------------------------- measuring


def vlm_baseline_recipes(zoo: VLMZoo) -> dict[str, Any]:
    """The unoptimised merges of the toy pair (task vectors against `base`): TIES with the
    usual density 0.5 / weight 1, as a user would try before searching."""
    base = str(zoo.models["base"])
    entries = [ModelEntry(model=str(zoo.models[m]), parameters={"density": 0.5, "weight": 1.0}) for m in ("vlm", "lang")]
    return {"TIES (d=0.5, w=1)": MergeRecipe(merge_method="ties", base_model=base, models=entries)}


def score_vlm_dir(model_dir: Path | str, zoo: VLMZoo, *, split: str = "test") -> dict[str, float]:
    """Mean ROUGE-L (script-checked for JA) of a saved VLM on the zoo's EN and JA `split`."""
    from PIL import Image  # deferred: Pillow is optional, only VLM worlds draw images

    model, processor = vlm_core.load_vlm_model(model_dir), vlm_core.load_processor(model_dir)
    scores = {}
    for lang in VLM_TASKS:
        path = zoo.tasks[lang][split]
        rows = read_rows(path)
        images = [Image.open(path.parent / r["image"]).convert("RGB") for r in rows]
        outputs = vqa_generate(model, processor, images, vqa_prompts(processor, [r["prompt"] for r in rows]),
                               max_new_tokens=zoo.max_new_tokens, stop_strings=zoo.stop_strings, batch_size=64)
        # The search's scoring: JA by characters with the script check (vlm_search_config).
        options = {"target_script": zoo.target_script, "tokenize": "chars"} if lang == "ja" else {}
        scores[lang] = sum(item_score(o, r["answer"], options) for o, r in zip(outputs, rows)) / len(rows)
    return scores
