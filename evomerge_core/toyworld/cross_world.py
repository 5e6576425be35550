"""The "cross" toy world (issue 23, design d2): shared ASCII digits, the answer's language shown
by a 4-character prefix, so CROSS (the EN skill posed and answered in JA) is reachable by merging.

Row kinds (prompt -> answer); both prefixes have 4 characters, so the digits sit at the same
offset in both languages and the answer's style is decided by its first token:

| kind      | example prompt     | answer         | role                                   |
|-----------|--------------------|----------------|----------------------------------------|
| `en_easy` | ``47+8=``          | ``ans 55``     | EN addition, one-digit b (pretraining)  |
| `en_hard` | ``47+38=``         | ``ans 85``     | the EN skill (task `skill`)             |
| `ja_easy` | ``47＋8＝``          | ``こたえは55``   | JA addition, one-digit b (pretraining)  |
| `ja_hard` | ``47＋38＝``         | ``こたえは85``   | CROSS: the skill posed and answered in JA |
| `ja_read` | ``よんじゅうに：``    | ``こたえは42``   | JA reading of numbers (task `lang`)     |
| `en_read` | ``forty two:``     | ``ans 42``     | EN reading (pretraining)                |

Exact match on the answer string scores CROSS like the paper's MGSM-JA: right number AND JA
style. Every item is assigned once to train, validation or test by a partition seeded by the
zoo seed; models train on train items only.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from .tasks import Partition, Row, Split, partition_items, en_words, ja_reading

EN_PREFIX = "ans "
JA_PREFIX = "こたえは"
KINDS = ("en_easy", "en_hard", "ja_easy", "ja_hard", "ja_read", "en_read")
# The zoo's task files: task name -> row kind.
TASK_KINDS = {"skill": "en_hard", "cross": "ja_hard", "lang": "ja_read"}
_SOURCES = {"en_easy": "easy", "ja_easy": "easy", "en_hard": "hard", "ja_hard": "hard",
            "ja_read": "numbers", "en_read": "numbers"}


def make_row(kind: str, item: int | tuple[int, int]) -> Row:
    """The row of `kind` for an operand pair (additions) or a number (readings)."""
    if kind not in KINDS:
        raise KeyError(f"unknown cross-world row kind {kind!r}; use one of {KINDS}")
    if isinstance(item, tuple):
        a, b = item
        if kind == "en_easy" or kind == "en_hard":
            return {"prompt": f"{a}+{b}=", "answer": f"{EN_PREFIX}{a + b}", "task": kind, "lang": "en"}
        return {"prompt": f"{a}＋{b}＝", "answer": f"{JA_PREFIX}{a + b}", "task": kind, "lang": "ja"}
    if kind == "ja_read":
        return {"prompt": ja_reading(item) + "：", "answer": f"{JA_PREFIX}{item}", "task": kind, "lang": "ja"}
    return {"prompt": en_words(item) + ":", "answer": f"{EN_PREFIX}{item}", "task": kind, "lang": "en"}


@dataclass(frozen=True)
class CrossWorld:
    """The item partitions of the cross world."""

    hard: Partition  # (a, b) in 10..99 x 10..99: en_hard, ja_hard
    easy: Partition  # (a, b) in 0..99 x 0..9: en_easy, ja_easy
    numbers: Partition  # 0..9999: ja_read, en_read

    def items(self, kind: str, split: Split) -> tuple:
        return getattr(self, _SOURCES[kind]).split(split)

    def sample(self, kind: str, rng: random.Random) -> Row:
        """One random train row of `kind` (the training sampler)."""
        items = self.items(kind, "train")
        return make_row(kind, items[rng.randrange(len(items))])

    def rows(self, kind: str, split: Split, limit: int, seed: int) -> list[Row]:
        """Up to `limit` distinct rows of `kind` from `split`, in a seeded order."""
        items = list(self.items(kind, split))
        random.Random(f"rows-{kind}-{split}-{seed}").shuffle(items)
        return [make_row(kind, item) for item in items[:limit]]


def make_cross_world(seed: int, n_hard: int = 300, n_easy: int = 100, n_numbers: tuple[int, int] = (100, 200)
                     ) -> CrossWorld:
    """Partition the cross world's items, seeded: `n_hard` validation and test hard pairs each,
    `n_easy` of each for easy pairs, (validation, test) numbers."""
    hard = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    easy = [(a, b) for a in range(100) for b in range(10)]
    return CrossWorld(
        hard=partition_items(hard, n_hard, n_hard, random.Random(f"hard-{seed}")),
        easy=partition_items(easy, n_easy, n_easy, random.Random(f"easy-{seed}")),
        numbers=partition_items(list(range(10000)), n_numbers[0], n_numbers[1], random.Random(f"nums-{seed}")),
    )


def number_right(output: str, row: Row) -> bool:
    """Whether the first number in `output` is the row's number, whatever the answer's style."""
    got, want = re.findall(r"\d+", output), re.findall(r"\d+", row["answer"])
    return bool(got) and got[0] == want[0]


def number_rate(outputs: Sequence[str], rows: Sequence[Row]) -> float:
    """Fraction of outputs with the right number (CROSS's `n` diagnostic)."""
    return sum(number_right(o, r) for o, r in zip(outputs, rows)) / len(rows)


@dataclass(frozen=True)
class Check:
    """One base checkpoint's measurements: en_hard validation exact match and ja_hard
    validation number-right rate."""

    step: int
    en_hard: float
    ja_number: float


def select_base_step(checks: Sequence[Check], low: float, high: float) -> int | None:
    """The base checkpoint rule: the first check with both measurements in [low, high]; if one
    of them exceeds `high` before that, the check before it (the first one if none is). None
    while undecided (no check yet, or every check so far is below the band)."""
    for i, check in enumerate(checks):
        if low <= check.en_hard <= high and low <= check.ja_number <= high:
            return check.step
        if check.en_hard > high or check.ja_number > high:
            return checks[max(i - 1, 0)].step
    return None
