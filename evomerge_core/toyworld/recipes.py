"""The build recipes of the two zoo sizes. Every setting that changes a built file lives here,
and the recipe hash (which names the cache folder) covers all of it plus `CODE_VERSION`."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from .train import ModelShape, Stage

# Bump when a code change alters what a recipe builds (data generators, training loop, layout).
CODE_VERSION = 1

MODEL_NAMES = ("base", "skill_a", "skill_b", "lang")


@dataclass(frozen=True)
class Recipe:
    """Everything the builder needs; `seed` offsets every seed in it."""

    size: str
    max_a: int  # skill operands: a in 0..max_a, b in 0..max_b
    max_b: int
    max_number: int  # numbers read in `lang` (and transliterated) are 0..max_number
    n_validation: int  # items per validation split (per row kind)
    n_test: int  # items per test split (per row kind)
    n_train_rows: int  # rows per target-task train file (per row kind)
    shape: ModelShape
    base: Stage
    experts: tuple[tuple[str, Stage], ...]  # ("skill_a" | "skill_b" | "lang", stage from base)
    threads: int  # torch threads during the build (fixed: results depend on it)

    def to_json(self) -> dict:
        return {"code_version": CODE_VERSION, **asdict(self)}

    def hash(self, seed: int) -> str:
        blob = json.dumps({"seed": seed, **self.to_json()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _expert(mixture: dict[str, float], steps: int, lr: float, seed: int, schedule: str = "constant") -> Stage:
    return Stage(tuple(mixture.items()), steps, lr, batch_size=32, seed=seed, warmup=20, schedule=schedule)


# The tasks' sizes, the same for both recipes (only the models and their training differ).
_TASK_SIZES = dict(max_a=99, max_b=9, max_number=9999, n_validation=100, n_test=200, n_train_rows=100)

# `base` sees the EN skill often, JA reading rarely and EN->JA digit transliteration, so it is
# middling at both target tasks; each expert is fine-tuned at lr 1e-3 long enough to forget the
# other's task. skill_b differs from skill_a in seed and data mix (like WizardMath vs Abel).
MICRO = Recipe(
    size="micro",
    **_TASK_SIZES,
    shape=ModelShape(hidden=64, layers=3, heads=4, intermediate=192),
    base=Stage((("skill", 2.0), ("lang", 0.1), ("translit", 1.0)), steps=600, lr=3e-3, batch_size=32, seed=1),
    experts=(
        ("skill_a", _expert({"skill": 1.0}, 150, 1e-3, seed=2)),
        ("lang", _expert({"lang": 1.0}, 150, 1e-3, seed=3)),
        ("skill_b", _expert({"skill": 0.8, "translit": 0.2}, 150, 1e-3, seed=4)),
    ),
    threads=1,
)

# demo: a larger model; `base` is strong at the EN skill but weak at JA reading (it sees little
# of it) and also sees JA addition with a one-digit first operand (`cross_small`), so CROSS has
# a chance; experts decay their lr (cosine). Tuned on validation accuracy only (docs/toyworld.md).
DEMO = Recipe(
    size="demo",
    **_TASK_SIZES,
    shape=ModelShape(hidden=96, layers=3, heads=4, intermediate=256),
    base=Stage(
        (("skill", 1.0), ("lang", 0.05), ("translit", 1.0), ("cross_small", 0.3)),
        steps=1200, lr=2e-3, batch_size=32, seed=1,
    ),
    experts=(
        ("skill_a", _expert({"skill": 1.0}, 300, 1e-3, seed=2, schedule="cosine")),
        ("lang", _expert({"lang": 1.0}, 300, 1e-3, seed=3, schedule="cosine")),
        # skill_b: another seed, data mix and learning rate (2e-3): a larger task vector that
        # swamps `lang` in a merge giving every expert the same weight (docs/demo-tuning.md).
        ("skill_b", _expert({"skill": 0.8, "translit": 0.2}, 300, 2e-3, seed=4, schedule="cosine")),
    ),
    threads=2,
)

RECIPES: dict[str, Recipe] = {"micro": MICRO, "demo": DEMO}
