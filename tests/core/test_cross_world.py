"""Tests of the cross toy world (issue 23, design d2): row formats, partitions, the base
checkpoint rule, piecewise training and a miniature zoo build."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from evomerge_core.toyworld import build_zoo, load_zoo
from evomerge_core.toyworld import zoo as zoo_mod
from evomerge_core.toyworld.cross_world import (
    KINDS,
    Check,
    make_cross_world,
    make_row,
    number_right,
    select_base_step,
)
from evomerge_core.toyworld.cross_zoo import CROSS, CROSS_MAX_NEW_TOKENS
from evomerge_core.toyworld.tasks import SPLITS
from evomerge_core.toyworld.tokenizer import build_tokenizer, encode, vocabulary
from evomerge_core.toyworld.train import ModelShape, Stage, StageRun, new_model


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/core/conftest.py


def test_row_formats():
    assert make_row("en_easy", (47, 8)) == {"prompt": "47+8=", "answer": "ans 55", "task": "en_easy", "lang": "en"}
    assert make_row("en_hard", (47, 38))["answer"] == "ans 85"
    assert make_row("ja_easy", (47, 8))["prompt"] == "47＋8＝"
    assert make_row("ja_hard", (47, 38)) == {"prompt": "47＋38＝", "answer": "こたえは85", "task": "ja_hard",
                                              "lang": "ja"}
    assert make_row("ja_read", 42) == {"prompt": "よんじゅうに：", "answer": "こたえは42", "task": "ja_read", "lang": "ja"}
    assert make_row("en_read", 42)["prompt"] == "forty two:" and make_row("en_read", 42)["answer"] == "ans 42"
    with pytest.raises(KeyError):
        make_row("cross", (1, 2))


def test_every_row_fits_the_vocabulary_and_the_generation_cap():
    vocab = vocabulary()
    world = make_cross_world(0)
    for kind in KINDS:
        for row in world.rows(kind, "train", 50, seed=0) + [make_row(kind, 9999 if "read" in kind else (99, 99))]:
            encode(row["prompt"] + row["answer"], vocab)  # raises on a foreign character
            assert len(row["answer"]) + 1 <= CROSS_MAX_NEW_TOKENS  # the answer and its newline


def test_exact_match_needs_the_number_and_the_ja_prefix():
    row = make_row("ja_hard", (47, 38))
    assert number_right("ans 85", row) and "ans 85" != row["answer"]
    assert number_right("こたえは85", row) and not number_right("こたえは84", row) and not number_right("こたえは", row)


def test_partitions_are_disjoint_and_sized():
    world = make_cross_world(3)
    for part, (n_val, n_test) in ((world.hard, (300, 300)), (world.easy, (100, 100)), (world.numbers, (100, 200))):
        train, val, test = (set(part.split(s)) for s in SPLITS)
        assert (len(val), len(test)) == (n_val, n_test)
        assert not (train & val or train & test or val & test)
    assert all(10 <= a <= 99 and 10 <= b <= 99 for a, b in world.hard.train)
    assert make_cross_world(3) == world and make_cross_world(4).hard.test != world.hard.test
    rows = world.rows("ja_hard", "test", 300, seed=0)
    assert len({r["prompt"] for r in rows}) == 300


def test_base_step_rule():
    def checks(*values):
        return [Check(600 + 100 * i, en, ja) for i, (en, ja) in enumerate(values)]

    band = (0.10, 0.25)
    assert select_base_step([], *band) is None
    assert select_base_step(checks((0.02, 0.05), (0.08, 0.12)), *band) is None  # still below
    assert select_base_step(checks((0.02, 0.05), (0.12, 0.11), (0.2, 0.2)), *band) == 700  # first in band
    assert select_base_step(checks((0.05, 0.05), (0.09, 0.12), (0.31, 0.16)), *band) == 700  # overshoot: previous
    assert select_base_step(checks((0.05, 0.30)), *band) == 600  # overshoot at the first check
    assert select_base_step(checks((0.25, 0.10)), *band) == 600  # the band is closed


def test_stage_run_in_pieces_equals_one_run():
    vocab = vocabulary()
    world = make_cross_world(0)
    shape = ModelShape(hidden=16, layers=1, heads=2, intermediate=32)
    stage = Stage((("en_hard", 1.0), ("ja_read", 0.5)), steps=6, lr=1e-3, batch_size=4, seed=5, warmup=2,
                  schedule="cosine")
    one = new_model(shape, vocab, vocab["\n"], 0)
    two = copy.deepcopy(one)
    StageRun(one, stage, vocab, world.sample).advance(6)
    run = StageRun(two, stage, vocab, world.sample)
    run.advance(2)
    run.advance(4)
    assert run.step == 6
    for (name, a), b in zip(one.state_dict().items(), two.state_dict().values()):
        assert torch.equal(a, b), name


def test_miniature_cross_zoo_build(tmp_path, monkeypatch):
    tiny = dataclasses.replace(
        CROSS, n_hard=20, n_train_rows=10, shape=ModelShape(hidden=16, layers=1, heads=2, intermediate=32),
        base=dataclasses.replace(CROSS.base, steps=4, batch_size=4, warmup=1), check_from=2, check_every=1,
        experts=tuple((name, dataclasses.replace(stage, steps=2, batch_size=4)) for name, stage in CROSS.experts),
    )
    monkeypatch.setattr(zoo_mod, "CROSS", tiny)
    zoo = build_zoo("cross", cache_dir=tmp_path, progress=False)
    meta = json.loads((zoo.root / "zoo.json").read_text())
    assert meta["size"] == "cross" and meta["max_new_tokens"] == CROSS_MAX_NEW_TOKENS
    assert meta["base_step"] in (2, 3, 4) and [c["step"] for c in meta["base_checks"]][0] == 2
    assert all((zoo.models[name] / "config.json").is_file() for name in ("base", "skill_a", "skill_b", "lang"))
    assert len(zoo.rows("cross", "train")) == 10 and len(zoo.rows("cross", "test")) == 20
    assert zoo.rows("cross", "test")[0]["answer"].startswith("こたえは")
    assert zoo.rows("skill", "validation")[0]["answer"].startswith("ans ")
    assert [r["task"] for r in zoo.rows("union", "test")[:2]] == ["en_hard", "ja_read"]
    assert load_zoo(zoo.root).max_new_tokens == CROSS_MAX_NEW_TOKENS
    tokenizer = build_tokenizer()
    assert tokenizer.decode(tokenizer(zoo.rows("cross", "test")[0]["prompt"])["input_ids"]) == \
        zoo.rows("cross", "test")[0]["prompt"]
