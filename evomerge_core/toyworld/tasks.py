"""Data generators of the toy world: two "languages" with disjoint scripts and a few tasks.

EN uses ASCII digits and English number words; JA uses full-width digits and hiragana number
readings. Row kinds (prompt -> answer):

| kind          | example prompt            | answer | role                                   |
|---------------|---------------------------|--------|----------------------------------------|
| `skill`       | ``12+34=``                | ``46`` | the EN skill (addition); target task    |
| `lang`        | ``よんじゅうに：``          | ``４２`` | JA reading of numbers; target task      |
| `cross`       | ``１２＋３４＝``              | ``４６`` | the skill posed and answered in JA      |
| `en_read`     | ``forty two:``            | ``42`` | EN reading (pretraining only)           |
| `translit`    | ``42>``                   | ``４２`` | EN digits -> JA digits (pretraining only) |
| `cross_small` | ``３＋４＝``                  | ``７``  | `cross` with a one-digit first operand (pretraining only) |

Every operand pair and every number is assigned once to train, validation or test (a seeded
partition), and models are trained on train items only, so no test item is ever seen.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Row = dict[str, str]
Split = Literal["train", "validation", "test"]
SPLITS: tuple[Split, ...] = ("train", "validation", "test")

_EN_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen"
).split()
_EN_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_JA_DIGITS = ["", "いち", "に", "さん", "よん", "ご", "ろく", "なな", "はち", "きゅう"]
_JA_TENS = ["", "じゅう", "にじゅう", "さんじゅう", "よんじゅう", "ごじゅう", "ろくじゅう",
            "ななじゅう", "はちじゅう", "きゅうじゅう"]
_JA_HUNDREDS = ["", "ひゃく", "にひゃく", "さんびゃく", "よんひゃく", "ごひゃく", "ろっぴゃく",
                "ななひゃく", "はっぴゃく", "きゅうひゃく"]
_JA_THOUSANDS = ["", "せん", "にせん", "さんぜん", "よんせん", "ごせん", "ろくせん", "ななせん",
                 "はっせん", "きゅうせん"]


def fullwidth(text: str) -> str:
    """ASCII digits -> full-width digits (other characters unchanged)."""
    return "".join(chr(ord(c) - 0x30 + 0xFF10) if "0" <= c <= "9" else c for c in text)


def en_words(n: int) -> str:
    """English words for 0 <= n <= 9999 (``1342`` -> ``one thousand three hundred forty two``)."""
    if not 0 <= n <= 9999:
        raise ValueError(f"en_words handles 0..9999, got {n}")
    if n < 20:
        return _EN_ONES[n]
    parts = []
    thousands, n = divmod(n, 1000)
    if thousands:
        parts += [_EN_ONES[thousands], "thousand"]
    hundreds, rest = divmod(n, 100)
    if hundreds:
        parts += [_EN_ONES[hundreds], "hundred"]
    if rest >= 20:
        parts.append(_EN_TENS[rest // 10])
        if rest % 10:
            parts.append(_EN_ONES[rest % 10])
    elif rest:
        parts.append(_EN_ONES[rest])
    return " ".join(parts)


def ja_reading(n: int) -> str:
    """Hiragana reading for 0 <= n <= 9999 (``342`` -> ``さんびゃくよんじゅうに``)."""
    if not 0 <= n <= 9999:
        raise ValueError(f"ja_reading handles 0..9999, got {n}")
    if n == 0:
        return "ぜろ"
    return (_JA_THOUSANDS[n // 1000] + _JA_HUNDREDS[(n // 100) % 10] + _JA_TENS[(n // 10) % 10]
            + _JA_DIGITS[n % 10])


def skill_row(a: int, b: int) -> Row:
    return {"prompt": f"{a}+{b}=", "answer": str(a + b), "task": "skill", "lang": "en"}


def cross_row(a: int, b: int) -> Row:
    return {"prompt": fullwidth(f"{a}") + "＋" + fullwidth(f"{b}") + "＝",
            "answer": fullwidth(str(a + b)), "task": "cross", "lang": "ja"}


def lang_row(n: int) -> Row:
    return {"prompt": ja_reading(n) + "：", "answer": fullwidth(str(n)), "task": "lang", "lang": "ja"}


def en_read_row(n: int) -> Row:
    return {"prompt": en_words(n) + ":", "answer": str(n), "task": "en_read", "lang": "en"}


def translit_row(n: int) -> Row:
    return {"prompt": f"{n}>", "answer": fullwidth(str(n)), "task": "translit", "lang": "ja"}


@dataclass(frozen=True)
class Partition:
    """Items of one kind assigned to train / validation / test."""

    train: tuple
    validation: tuple
    test: tuple

    def split(self, name: Split) -> tuple:
        return getattr(self, name)


def partition_items(items: list, n_val: int, n_test: int, rng: random.Random) -> Partition:
    """Shuffle `items` with `rng` and split them into test, validation and the rest (train)."""
    if n_val + n_test >= len(items):
        raise ValueError(f"{len(items)} items cannot give {n_val} validation + {n_test} test items and a train split")
    items = list(items)
    rng.shuffle(items)
    return Partition(
        train=tuple(items[n_val + n_test :]),
        validation=tuple(items[n_test : n_test + n_val]),
        test=tuple(items[:n_test]),
    )


@dataclass(frozen=True)
class World:
    """The item partitions every row generator draws from."""

    pairs: Partition  # (a, b) operand pairs for `skill` and `cross`
    numbers: Partition  # numbers for `lang`, `en_read`, `translit`
    small_pairs: Partition  # the pairs with a single-digit `a` (for `cross_small`)


def make_world(max_a: int, max_b: int, max_number: int, n_val: int, n_test: int, seed: int) -> World:
    """Partition operand pairs (0..max_a) x (0..max_b) and numbers 0..max_number, seeded."""
    pairs = [(a, b) for a in range(max_a + 1) for b in range(max_b + 1)]
    numbers = list(range(max_number + 1))
    part = partition_items(pairs, n_val, n_test, random.Random(f"pairs-{seed}"))
    small = Partition(*(tuple(p for p in part.split(s) if p[0] < 10) for s in SPLITS))
    return World(
        pairs=part,
        numbers=partition_items(numbers, n_val, n_test, random.Random(f"numbers-{seed}")),
        small_pairs=small,
    )


ROW_MAKERS = {
    "skill": ("pairs", lambda item: skill_row(*item)),
    "cross": ("pairs", lambda item: cross_row(*item)),
    "cross_small": ("small_pairs", lambda item: cross_row(*item)),
    "lang": ("numbers", lang_row),
    "en_read": ("numbers", en_read_row),
    "translit": ("numbers", translit_row),
}


def sample_row(world: World, kind: str, rng: random.Random, split: Split = "train") -> Row:
    """One random row of `kind` drawn from `split` of its partition."""
    source, make = ROW_MAKERS[kind]
    items = getattr(world, source).split(split)
    return make(items[rng.randrange(len(items))])


def split_rows(world: World, kind: str, split: Split, limit: int, seed: int) -> list[Row]:
    """Up to `limit` distinct rows of `kind` from `split`, in a seeded order."""
    source, make = ROW_MAKERS[kind]
    items = list(getattr(world, source).split(split))
    random.Random(f"rows-{kind}-{split}-{seed}").shuffle(items)
    return [make(item) for item in items[:limit]]


def union_rows(world: World, split: Split, per_task: int, seed: int) -> list[Row]:
    """The UNION task: `skill` and `lang` rows interleaved (each keeps its own `task` field)."""
    skill = split_rows(world, "skill", split, per_task, seed)
    lang = split_rows(world, "lang", split, per_task, seed)
    rows: list[Row] = []
    for skill_row, lang_row in zip(skill, lang):
        rows += [skill_row, lang_row]
    return rows


def write_rows(path: Path, rows: list[Row]) -> None:
    """Write rows as one JSON object per line (UTF-8, parent folders created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
