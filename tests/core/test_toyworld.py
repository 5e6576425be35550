"""Tests of the toy world: tokenizer, task data, the micro zoo build (cache, atomicity,
bit-identical rebuilds), exact-match evaluation, batched generation and the merge effect."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from evomerge_core.errors import UsageError
from evomerge_core.generation.hf_loop import greedy_generate
from evomerge_core.toyworld import (
    MODEL_NAMES,
    RECIPES,
    TASK_NAMES,
    build_zoo,
    evaluate_exact_match,
    generate_answers,
    in_script,
    load_model,
    load_tokenizer,
    zoo_dir,
)
from evomerge_core.toyworld import recipes as recipes_mod
from evomerge_core.toyworld import zoo as zoo_mod
from evomerge_core.toyworld.measure import merged_model
from evomerge_core.toyworld.tasks import en_words, ja_reading, make_world, split_rows, union_rows
from evomerge_core.toyworld.tokenizer import build_tokenizer, encode, vocabulary


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/core/conftest.py


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    return build_zoo("micro", cache_dir=tmp_path_factory.mktemp("cache"), progress=False)


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "zoo.json"
    }


# --- tokenizer and data -------------------------------------------------------------------


def test_tokenizer_roundtrip_through_autotokenizer(tmp_path):
    build_tokenizer().save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    text = "47+8=55\nよんじゅうに：４２\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == encode(text, vocabulary())
    assert len(ids) == len(text)  # one token per character
    assert tok.decode(ids) == text
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert len(tok) < 200


def test_encode_rejects_foreign_characters():
    with pytest.raises(ValueError, match="not in the toy vocabulary"):
        encode("ABC", vocabulary())


def test_number_readings():
    assert en_words(342) == "three hundred forty two"
    assert en_words(1005) == "one thousand five"
    assert ja_reading(342) == "さんびゃくよんじゅうに"
    assert ja_reading(8600) == "はっせんろっぴゃく"
    assert ja_reading(0) == "ぜろ"


def test_partitions_are_disjoint_and_rows_well_formed():
    world = make_world(99, 9, 9999, 100, 200, seed=0)
    for part in (world.pairs, world.numbers):
        sets = [set(part.train), set(part.validation), set(part.test)]
        assert len(sets[1]) == 100 and len(sets[2]) == 200
        assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    for kind, lang in [("skill", "en"), ("lang", "ja"), ("cross", "ja")]:
        rows = split_rows(world, kind, "test", 50, seed=0)
        assert len(rows) == 50
        for row in rows:
            assert set(row) == {"prompt", "answer", "task", "lang"}
            assert row["task"] == kind and row["lang"] == lang
            assert in_script(row["answer"], "fullwidth") == (lang == "ja")
    union = union_rows(world, "validation", 30, seed=0)
    assert [r["task"] for r in union[:4]] == ["skill", "lang", "skill", "lang"]
    assert len(union) == 60


def test_in_script():
    assert in_script("１２３", "fullwidth")
    assert not in_script("12３", "fullwidth")
    assert not in_script("", "fullwidth")
    with pytest.raises(ValueError, match="unknown script"):
        in_script("1", "klingon")


# --- the micro zoo ------------------------------------------------------------------------


def test_micro_zoo_layout(micro):
    assert set(micro.models) == set(MODEL_NAMES)
    for path in micro.models.values():
        for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json"):
            assert (path / name).is_file(), path / name
    assert set(micro.tasks) == set(TASK_NAMES)
    recipe = RECIPES["micro"]
    sizes = {"train": recipe.n_train_rows, "validation": recipe.n_validation, "test": recipe.n_test}
    for task, splits in micro.tasks.items():
        for split, path in splits.items():
            rows = micro.rows(task, split)
            expected = sizes[split] * (2 if task == "union" else 1)
            assert len(rows) == expected, (task, split)
            assert all(r["prompt"] and r["answer"] for r in rows)
    test_prompts = {r["prompt"] for r in micro.rows("union", "test")}
    train_prompts = {r["prompt"] for r in micro.rows("union", "train")}
    assert not test_prompts & train_prompts
    assert micro.prompt_template.format(prompt="1+2=") == "1+2="
    assert micro.stop_strings == ["\n"] and micro.target_script == "fullwidth"
    assert micro.root == zoo_dir("micro", cache_dir=micro.root.parent.parent)


def test_rebuild_is_bit_identical(micro, tmp_path):
    again = build_zoo("micro", cache_dir=tmp_path, progress=False)
    assert again.root != micro.root
    first, second = _digest(micro.root), _digest(again.root)
    assert any(name.endswith("model.safetensors") for name in first)
    assert first == second


def test_cached_zoo_is_reused(micro, monkeypatch):
    stamp = (micro.root / "zoo.json").stat().st_mtime_ns

    def no_build(*args, **kwargs):
        raise AssertionError("the cached zoo should have been reused")

    monkeypatch.setattr(zoo_mod, "_build_into", no_build)
    assert build_zoo("micro", cache_dir=micro.root.parent.parent, progress=False).root == micro.root
    assert (micro.root / "zoo.json").stat().st_mtime_ns == stamp


def test_recipe_or_code_version_change_moves_the_zoo(tmp_path, monkeypatch):
    original = RECIPES["micro"]
    root = zoo_dir("micro", cache_dir=tmp_path)
    monkeypatch.setitem(RECIPES, "micro", dataclasses.replace(original, n_test=150))
    assert zoo_dir("micro", cache_dir=tmp_path) != root
    monkeypatch.setitem(RECIPES, "micro", original)
    assert zoo_dir("micro", cache_dir=tmp_path) == root
    monkeypatch.setattr(recipes_mod, "CODE_VERSION", recipes_mod.CODE_VERSION + 1)
    assert zoo_dir("micro", cache_dir=tmp_path) != root
    assert zoo_dir("micro", cache_dir=tmp_path, seed=1) != zoo_dir("micro", cache_dir=tmp_path)


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    def boom(root, recipe, seed, progress):
        (root / "half-written").write_text("x")
        raise RuntimeError("disk full")

    monkeypatch.setattr(zoo_mod, "_build_into", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        build_zoo("micro", cache_dir=tmp_path, progress=False)
    assert list((tmp_path / "toyworld").iterdir()) == []


def test_unknown_size_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="unknown toy-world size"):
        build_zoo("huge", cache_dir=tmp_path)


def test_env_var_sets_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path))
    assert zoo_dir("micro").parent == tmp_path / "toyworld"


# --- generation and evaluation --------------------------------------------------------------


def test_batched_left_padded_generation_matches_unbatched(micro):
    model = load_model(micro.models["lang"])
    tok = load_tokenizer(micro.models["lang"])
    rows = micro.rows("union", "validation")[:24]
    prompts = [r["prompt"] for r in rows]
    assert len({len(p) for p in prompts}) > 3  # lengths differ, so batches really are padded
    one = greedy_generate(model, tok, prompts, max_new_tokens=8, stop_strings=["\n"], batch_size=1)
    many = greedy_generate(model, tok, prompts, max_new_tokens=8, stop_strings=["\n"], batch_size=24)
    assert one == many
    assert any(o == r["answer"] for o, r in zip(one, rows))


def test_evaluate_exact_match_counts_correct_rows(micro):
    rows = micro.rows("skill", "validation")[:40]
    model = load_model(micro.models["skill_a"])
    tok = load_tokenizer(micro.models["skill_a"])
    answers = generate_answers(model, tok, rows)
    expected = sum(a == r["answer"] for a, r in zip(answers, rows)) / len(rows)
    assert evaluate_exact_match(micro.models["skill_a"], None, rows) == expected
    assert evaluate_exact_match(model, tok, rows) == expected
    wrong = [dict(r, answer=r["answer"] + "0") for r in rows]
    assert evaluate_exact_match(model, tok, wrong) < expected or expected == 0
    with pytest.raises(ValueError):
        evaluate_exact_match(model, tok, [])


def test_each_expert_masters_its_task_and_forgets_the_other(micro):
    tok = load_tokenizer(micro.models["base"])
    skill = micro.rows("skill", "validation")
    lang = micro.rows("lang", "validation")
    acc = {
        name: (evaluate_exact_match(load_model(micro.models[name]), tok, skill),
               evaluate_exact_match(load_model(micro.models[name]), tok, lang))
        for name in ("base", "skill_a", "lang")
    }
    assert acc["skill_a"][0] > acc["lang"][0] + 0.2  # skill expert wins on the skill
    assert acc["lang"][1] > acc["skill_a"][1] + 0.4  # language expert wins on JA
    assert acc["lang"][1] > acc["base"][1] + 0.3  # and learned it in fine-tuning


def test_a_fixed_merge_beats_both_experts_on_union_train(micro):
    tok = load_tokenizer(micro.models["base"])
    rows = micro.rows("union", "train")
    experts = {name: evaluate_exact_match(micro.models[name], tok, rows) for name in ("skill_a", "lang")}
    merged = evaluate_exact_match(merged_model(micro, {"skill_a": 0.7, "lang": 0.7}), tok, rows)
    assert merged > max(experts.values()), (merged, experts)


def _reference_generate(model, tok, prompt: str, max_new_tokens: int, stops: list[str]) -> str:
    """The definition: one prompt, no cache, the whole text checked after every token."""
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(input_ids=torch.tensor([ids + new])).logits[0, -1]
        tok_id = int(logits.argmax())
        if tok_id == tok.eos_token_id:
            break
        new.append(tok_id)
        if any(s in tok.decode(new, skip_special_tokens=True) for s in stops):
            break
    text = tok.decode(new, skip_special_tokens=True)
    cut = min([text.find(s) for s in stops if s in text] or [len(text)])
    return text[:cut]


@pytest.mark.parametrize("stops", [["\n"], ["5", "\n"], ["\n\n", "00"], []])
def test_generation_with_row_dropping_matches_the_definition(micro, stops):
    """Rows leave the batch when they stop (one-character stops by token lookup, longer ones by
    a decoded tail), yet every output equals the plain one-prompt, no-cache definition."""
    model = load_model(micro.models["lang"])
    tok = load_tokenizer(micro.models["lang"])
    rows = micro.rows("union", "validation")[:20]
    prompts = [r["prompt"] for r in rows]
    got = greedy_generate(model, tok, prompts, max_new_tokens=7, stop_strings=stops, batch_size=8)
    want = [_reference_generate(model, tok, p, 7, stops) for p in prompts]
    assert got == want
    if stops:
        assert len({len(g) for g in got}) > 1  # rows really stopped at different steps
