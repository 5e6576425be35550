"""The "cross" zoo's recipe and builder (issue 23, design d2; docs/toyworld.md).

The base trains on a mixture of every row kind at a constant learning rate and is chosen by a
measured target instead of a step count: from `check_from`, every `check_every` steps, it is
scored on en_hard validation (exact match) and ja_hard validation (number right); the first
checkpoint with both in `target` is the base (the one before, if either overshoots first).
The experts are fine-tuned from it: skill_a / skill_b on EN addition, lang on JA reading.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from .cross_world import TASK_KINDS, Check, CrossWorld, make_cross_world, number_rate, select_base_step
from .evaluate import generate_answers, save_model
from .tasks import SPLITS, write_rows
from .tokenizer import build_tokenizer, vocabulary
from .train import ModelShape, Stage, StageRun, deterministic_torch, new_model, seeded_stage

# Bump when a code change alters what the cross recipe builds.
CROSS_CODE_VERSION = 1
# Answers are up to 8 characters (`こたえは9999`): one more token sees the newline.
CROSS_MAX_NEW_TOKENS = 10


@dataclass(frozen=True)
class CrossRecipe:
    """Everything the cross builder needs; `seed` offsets every seed in it."""

    size: str
    n_hard: int  # hard pairs per validation and per test split
    n_train_rows: int  # rows per task train file (CROSS's fitness items)
    shape: ModelShape
    base: Stage  # trained up to `base.steps`, stopped at the chosen checkpoint
    target: tuple[float, float]  # the band both base measurements must reach
    check_from: int
    check_every: int
    experts: tuple[tuple[str, Stage], ...]
    threads: int

    def to_json(self) -> dict:
        return {"code_version": CROSS_CODE_VERSION, **asdict(self)}

    def hash(self, seed: int) -> str:
        blob = json.dumps({"seed": seed, **self.to_json()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _expert(mixture: dict[str, float], steps: int, lr: float, seed: int) -> Stage:
    return Stage(tuple(mixture.items()), steps, lr, batch_size=32, seed=seed, warmup=20, schedule="cosine")


CROSS = CrossRecipe(
    size="cross",
    n_hard=300,
    n_train_rows=200,
    shape=ModelShape(hidden=96, layers=3, heads=4, intermediate=256),
    base=Stage((("en_easy", 1.0), ("en_hard", 0.4), ("ja_easy", 0.4), ("ja_hard", 0.1), ("ja_read", 0.05),
                ("en_read", 0.2)), steps=2500, lr=2e-3, batch_size=32, seed=1, warmup=50, schedule="constant"),
    target=(0.10, 0.25),
    check_from=600,
    check_every=100,
    experts=(
        ("skill_a", _expert({"en_hard": 1.0, "en_easy": 0.3}, 600, 2e-3, seed=2)),
        ("skill_b", _expert({"en_hard": 1.0, "en_easy": 0.3, "en_read": 0.2}, 500, 2e-3, seed=4)),
        ("lang", _expert({"ja_read": 1.0, "ja_easy": 0.5}, 300, 1e-3, seed=3)),
    ),
    threads=1,
)


def write_cross_tasks(root: Path, world: CrossWorld, recipe: CrossRecipe, seed: int) -> None:
    """`tasks/{skill,cross,lang,union}/{split}.jsonl`; union interleaves skill and lang rows."""
    limits = {"train": recipe.n_train_rows, "validation": recipe.n_hard, "test": recipe.n_hard}
    for split in SPLITS:
        files = {task: world.rows(kind, split, limits[split], seed) for task, kind in TASK_KINDS.items()}
        files["union"] = [row for pair in zip(files["skill"], files["lang"]) for row in pair]
        for task, rows in files.items():
            write_rows(root / "tasks" / task / f"{split}.jsonl", rows)


def train_base(model, world: CrossWorld, recipe: CrossRecipe, seed: int,
               say: Callable[[str], None] | None = None) -> tuple[int, list[Check]]:
    """Train the base in place up to the chosen checkpoint; returns its step and every check."""
    vocab, tokenizer = vocabulary(), build_tokenizer()
    en_rows = world.rows("en_hard", "validation", recipe.n_hard, seed)
    ja_rows = world.rows("ja_hard", "validation", recipe.n_hard, seed)
    stage = seeded_stage(recipe.base, seed)
    run = StageRun(model, stage, vocab, world.sample)
    checks: list[Check] = []
    previous: dict | None = None  # the last checkpoint's weights (the overshoot rule's fallback)
    low, high = recipe.target
    while run.step < stage.steps:
        to_next = recipe.check_from if run.step < recipe.check_from else recipe.check_every
        run.advance(min(to_next, stage.steps - run.step))
        en = generate_answers(model, tokenizer, en_rows, max_new_tokens=CROSS_MAX_NEW_TOKENS)
        ja = generate_answers(model, tokenizer, ja_rows, max_new_tokens=CROSS_MAX_NEW_TOKENS)
        checks.append(Check(run.step, sum(o == r["answer"] for o, r in zip(en, en_rows)) / len(en_rows),
                            number_rate(ja, ja_rows)))
        if say is not None:
            say(f"base step {run.step}: en_hard {checks[-1].en_hard:.3f}, ja_hard number {checks[-1].ja_number:.3f}")
        chosen = select_base_step(checks, low, high)
        if chosen is not None:
            if chosen != run.step and previous is not None:
                model.load_state_dict(previous)
            return chosen, checks
        previous = copy.deepcopy(model.state_dict())
    return run.step, checks  # never reached the band: the last step


def build_cross_into(root: Path, recipe: CrossRecipe, seed: int, say: Callable[[str], None] | None) -> dict:
    """Write the task files and the four models of the cross zoo into `root`; returns the
    zoo.json fields specific to this world (the chosen base step, its checks, losses)."""
    world = make_cross_world(seed, n_hard=recipe.n_hard)
    write_cross_tasks(root, world, recipe, seed)
    vocab, tokenizer = vocabulary(), build_tokenizer()

    seconds: dict[str, float] = {}
    losses: dict[str, float] = {}
    with deterministic_torch(recipe.threads):
        t0 = time.time()
        base = new_model(recipe.shape, vocab, vocab["\n"], seed)
        step, checks = train_base(base, world, recipe, seed, say)
        base.eval()
        save_model(base, tokenizer, root / "models" / "base")
        seconds["base"] = round(time.time() - t0, 1)
        if say is not None:
            say(f"base: step {step} chosen in {seconds['base']}s")
        for name, expert_stage in recipe.experts:
            t0 = time.time()
            model = copy.deepcopy(base)
            stage = seeded_stage(expert_stage, seed)
            losses[name] = StageRun(model, stage, vocab, world.sample).advance(stage.steps)
            save_model(model, tokenizer, root / "models" / name)
            seconds[name] = round(time.time() - t0, 1)
            if say is not None:
                say(f"{name} done in {seconds[name]}s")
    return {"base_step": step, "base_checks": [asdict(c) for c in checks], "final_losses": losses,
            "model_seconds": seconds, "max_new_tokens": CROSS_MAX_NEW_TOKENS}
