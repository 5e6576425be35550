"""Build (or reuse from the cache) the toy world's model zoo and task files.

Layout of a zoo folder `<cache>/toyworld/<size>-<recipe hash>/`:
`models/{base,skill_a,skill_b,lang}/` (Hugging Face model dirs with tokenizer),
`tasks/{union,skill,lang,cross}/{train,validation,test}.jsonl`, and `zoo.json` (recipe, hash,
build seconds). A zoo is built in a temporary sibling folder and renamed into place, so a
folder with that name is always complete.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from evomerge_core.errors import UsageError
from .evaluate import MAX_NEW_TOKENS, PROMPT_TEMPLATE, STOP_STRINGS, save_model
from .cross_zoo import CROSS, CrossRecipe, build_cross_into
from .recipes import CODE_VERSION, MODEL_NAMES, RECIPES, Recipe
from .tasks import SPLITS, World, make_world, split_rows, union_rows, write_rows
from .tokenizer import build_tokenizer, vocabulary
from .train import Stage, deterministic_torch, new_model, seeded_stage, train_stage

TASK_NAMES = ("union", "skill", "lang", "cross")
TARGET_SCRIPT = "fullwidth"


@dataclass(frozen=True)
class Zoo:
    """A built toy world: model dirs, task files and how to prompt and score."""

    root: Path
    size: str
    recipe_hash: str
    models: dict[str, Path]
    tasks: dict[str, dict[str, Path]]
    prompt_template: str = PROMPT_TEMPLATE
    stop_strings: list[str] = dataclasses.field(default_factory=lambda: list(STOP_STRINGS))
    max_new_tokens: int = MAX_NEW_TOKENS
    target_script: str = TARGET_SCRIPT

    def rows(self, task: str, split: str) -> list[dict[str, str]]:
        """Read one task split's rows."""
        return read_rows(self.tasks[task][split])


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def default_cache_dir() -> Path:
    """`$EVOMERGE_CACHE`, else `$XDG_CACHE_HOME/evomerge`, else `~/.cache/evomerge`."""
    if os.environ.get("EVOMERGE_CACHE"):
        return Path(os.environ["EVOMERGE_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "evomerge"


def zoo_dir(size: str, *, cache_dir: Path | None = None, seed: int = 0) -> Path:
    """Where the zoo of this size and seed lives (built or not)."""
    recipe = _recipe(size)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    name = f"{size}-{recipe.hash(seed)}" if seed == 0 else f"{size}-s{seed}-{recipe.hash(seed)}"
    return root / "toyworld" / name


def build_zoo(size: str = "micro", *, cache_dir: Path | None = None, seed: int = 0, progress: bool = True) -> Zoo:
    """Return the zoo of `size` ("micro", "demo" or "cross": the CROSS world of
    `cross_world`), building it first unless the cache holds it.

    `cache_dir` replaces the evomerge cache root (default `default_cache_dir()`); the zoo lives
    in `<cache_dir>/toyworld/<size>-<recipe hash>/` and is rebuilt only when its recipe or the
    builder's code version changes. Same size and seed on the same machine: bit-identical files.
    """
    recipe = _recipe(size)
    target = zoo_dir(size, cache_dir=cache_dir, seed=seed)
    if not (target / "zoo.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
        try:
            _build_into(tmp, recipe, seed, progress)
            publish_build(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    elif progress:
        _say(f"toyworld[{size}]: using cached zoo {target}")
    return load_zoo(target)


def load_zoo(root: Path) -> Zoo:
    """Open a built zoo folder (as written by `build_zoo`)."""
    root = Path(root)
    meta_path = root / "zoo.json"
    if not meta_path.is_file():
        raise UsageError(f"{root} is not a built toy-world zoo (no zoo.json); build it with build_zoo()")
    meta = json.loads(meta_path.read_text())
    return Zoo(
        root=root,
        size=meta["size"],
        recipe_hash=meta["recipe_hash"],
        models={name: root / "models" / name for name in MODEL_NAMES},
        tasks={t: {s: root / "tasks" / t / f"{s}.jsonl" for s in SPLITS} for t in TASK_NAMES},
        max_new_tokens=meta.get("max_new_tokens", MAX_NEW_TOKENS),
    )


def publish_build(tmp: Path, target: Path) -> None:
    """Rename a finished build (`zoo.json` written last) into place. If another process
    finished the same build first, its files are identical and the rename is skipped."""
    try:
        os.rename(tmp, target)
    except OSError:
        if not (target / "zoo.json").is_file():
            raise


def _recipe(size: str) -> Recipe | CrossRecipe:
    if size == CROSS.size:
        return CROSS
    if size not in RECIPES:
        raise UsageError(f"unknown toy-world size {size!r}; use one of {sorted(RECIPES) + [CROSS.size]}")
    return RECIPES[size]


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _write_tasks(root: Path, world: World, recipe: Recipe, seed: int) -> None:
    limits = {"train": recipe.n_train_rows, "validation": recipe.n_validation, "test": recipe.n_test}
    for split in SPLITS:
        files = {
            "skill": split_rows(world, "skill", split, limits[split], seed),
            "lang": split_rows(world, "lang", split, limits[split], seed),
            "cross": split_rows(world, "cross", split, limits[split], seed),
            "union": union_rows(world, split, limits[split], seed),
        }
        for task, rows in files.items():
            write_rows(root / "tasks" / task / f"{split}.jsonl", rows)


def _build_cross(root: Path, recipe: CrossRecipe, seed: int, progress: bool) -> None:
    started = time.time()
    say = (lambda msg: _say(f"toyworld[{recipe.size}]: {msg}")) if progress else None
    fields = build_cross_into(root, recipe, seed, say)
    meta = {"size": recipe.size, "seed": seed, "recipe_hash": recipe.hash(seed), "recipe": recipe.to_json(),
            **fields, "build_seconds": round(time.time() - started, 1)}
    # zoo.json is written last: its presence marks a complete zoo.
    (root / "zoo.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def _build_into(root: Path, recipe: Recipe | CrossRecipe, seed: int, progress: bool) -> None:
    if isinstance(recipe, CrossRecipe):
        _build_cross(root, recipe, seed, progress)
        return
    started = time.time()
    world = make_world(recipe.max_a, recipe.max_b, recipe.max_number, recipe.n_validation, recipe.n_test, seed)
    _write_tasks(root, world, recipe, seed)
    vocab = vocabulary()
    tokenizer = build_tokenizer()
    losses: dict[str, float] = {}

    def run(name: str, model, stage: Stage) -> None:
        t0 = time.time()
        every = max(1, stage.steps // 4)

        def on_step(step: int, loss: float) -> None:
            if progress and (step + 1) % every == 0:
                _say(f"toyworld[{recipe.size}]: {name} step {step + 1}/{stage.steps} loss {loss:.3f}")

        losses[name] = train_stage(model, world, seeded_stage(stage, seed), vocab, on_step)
        save_model(model, tokenizer, root / "models" / name)
        if progress:
            _say(f"toyworld[{recipe.size}]: {name} done in {time.time() - t0:.1f}s")

    with deterministic_torch(recipe.threads):
        base = new_model(recipe.shape, vocab, vocab["\n"], seed)
        run("base", base, recipe.base)
        for name, stage in recipe.experts:
            run(name, copy.deepcopy(base), stage)
    meta = {
        "size": recipe.size,
        "seed": seed,
        "recipe_hash": recipe.hash(seed),
        "code_version": CODE_VERSION,
        "recipe": recipe.to_json(),
        "final_losses": losses,
        "build_seconds": round(time.time() - started, 1),
    }
    # zoo.json is written last: its presence marks a complete zoo.
    (root / "zoo.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
