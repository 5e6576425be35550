"""Fitness: number extraction, script checks, scorers, registry, datasets, evaluator."""

from __future__ import annotations

import json
import math
import sys
from decimal import Decimal
from pathlib import Path

import pytest
import torch

from evomerge_core.config.schema import DatasetSpec, FitnessConfig
from evomerge_core.errors import ConfigError
from evomerge_core.fitness.data import load_items
from evomerge_core.fitness.evaluator import Fitness
from evomerge_core.fitness.registry import SCORERS, ScoreContext, get_scorer, register_scorer
from evomerge_core.fitness.scorers import exact_match, math_accuracy, math_correct
from evomerge_core.fitness.text import in_script, last_number, script_fraction

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_models import make_tiny_llama  # noqa: E402


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is 1,000.", Decimal(1000)),
        ("so 12,345,678 in all", Decimal(12345678)),
        ("x = -5", Decimal(-5)),
        ("from 3-5", Decimal(5)),
        ("答えは１８です", Decimal(18)),
        ("合計は－１，２３４円", Decimal(-1234)),
        ("costs 12.50 dollars.", Decimal("12.50")),
        ("first 3 then 42", Decimal(42)),
        ("no digits here", None),
    ],
)
def test_last_number(text, expected):
    assert last_number(text) == expected


def test_scripts():
    assert in_script("答えは18です", "japanese")
    assert in_script("カタカナとひらがなと漢字", "japanese")
    assert not in_script("The answer is 18", "japanese")
    assert in_script("The answer is 18", "latin")
    assert not in_script("18", "latin")  # no letters: not in any script
    assert in_script("ＡＢＣ１２３", "fullwidth") and not in_script("ABC123", "fullwidth")
    assert script_fraction("ab答え", "japanese") == 0.5
    assert not in_script("ab答え", "japanese", min_fraction=0.6)


def test_math_correct_with_and_without_script_check():
    ja = {"target_script": "japanese"}
    assert math_correct("よって答えは1,000です", 1000, ja)
    assert math_correct("よって答えは１０００です", "1000", ja)  # full-width digits parse
    assert not math_correct("So the answer is 1000", 1000, ja)  # right number, wrong language
    assert math_correct("So the answer is 1000", 1000)
    assert math_correct("#### 18", "Natalia ... #### 18")  # GSM8K-style reference
    assert not math_correct("答えは17です", 18, ja)
    assert math_correct("ＡＢＣ　１２", 12, {"target_script": "fullwidth"})


def _ctx(outputs, answers, **options):
    ctx = ScoreContext(model=None, tokenizer=None, rows=[{"answer": a} for a in answers],
                       prompts=[""] * len(answers), options=options)
    ctx.cache["outputs"] = list(outputs)
    return ctx


def test_accuracy_scorers():
    ctx = _ctx(["答えは3です", "answer 4", "答えは5"], [3, 4, 6], target_script="japanese")
    assert math_accuracy(ctx) == pytest.approx(1 / 3)
    assert math_accuracy(ctx.with_options({})) == pytest.approx(2 / 3)
    em = _ctx([" Tokyo ", "kyoto", "ＯＳＡＫＡ"], ["Tokyo", "Kyoto", "OSAKA"])
    assert exact_match(em) == pytest.approx(2 / 3)
    assert exact_match(em.with_options({"ignore_case": True})) == 1.0


def test_registry_builtins_user_and_unknown(tmp_path, monkeypatch):
    assert get_scorer("math_accuracy").is_accuracy
    assert get_scorer("logprob").worst < -100
    mod = tmp_path / "my_scorers_for_test.py"
    mod.write_text("def s(ctx):\n    return {'fitness': len(ctx.genome), 'extra': 1}\ns.worst_fitness = -3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    user = get_scorer("my_scorers_for_test:s")
    assert user.worst == -3.0
    assert user(_ctx([], []).__class__(model=None, tokenizer=None, rows=[], prompts=[], genome=[1, 2])) == {"fitness": 2.0, "extra": 1.0}
    with pytest.raises(ConfigError, match="has no attribute"):
        get_scorer("my_scorers_for_test:nope")
    with pytest.raises(ConfigError, match="did you mean 'logprob'"):
        get_scorer("logprb")


def test_register_scorer_adds_a_named_scorer_in_one_place():
    def half(ctx):
        return 0.5

    register_scorer("half_for_test", half)
    try:
        assert get_scorer("half_for_test")(None) == {"fitness": 0.5}
        with pytest.raises(ValueError, match="already registered"):
            register_scorer("half_for_test", half)
    finally:
        SCORERS.remove("half_for_test")
    with pytest.raises(ValueError, match="must not contain ':'"):
        register_scorer("pkg:half", half)
    with pytest.raises(ConfigError, match="fitness.scorer: unknown scorer .half_for_test.; use one of .* or a user scorer"):
        get_scorer("half_for_test")


def test_lmeval_scorer_is_lazy_and_names_the_extra():
    scorer = get_scorer("lmeval")  # resolving the entry never imports lm_eval
    assert not scorer.needs_dataset
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"pip install evomerge\[lmeval\]"):
            scorer.check_options({"task": "t"})
    else:
        pytest.skip("lm_eval is installed; the missing-extra error cannot be shown")


def _write_rows(path: Path, rows):
    if path.suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    elif path.suffix == ".csv":
        import csv

        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        import datasets

        datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_load_items_maps_columns(tmp_path, suffix):
    rows = [{"q": f"問題{i}", "a": i, "other": "x"} for i in range(5)]
    path = _write_rows(tmp_path / f"d{suffix}", rows)
    items = load_items(DatasetSpec(path=str(path), columns={"prompt": "q", "answer": "a"}, num_items=3))
    assert len(items) == 3
    assert items[1]["prompt"] == "問題1" and int(items[1]["answer"]) == 1 and items[1]["other"] == "x"


def test_load_items_errors(tmp_path):
    path = _write_rows(tmp_path / "d.jsonl", [{"q": "a", "a": 1}])
    with pytest.raises(ConfigError, match=r"columns.answer: column 'answer_number' is not in"):
        load_items(DatasetSpec(path=str(path), columns={"prompt": "q", "answer": "answer_number"}))
    with pytest.raises(ConfigError, match="column 'prompt' is missing"):
        load_items(DatasetSpec(path=str(path)))
    with pytest.raises(ConfigError, match="column 'lang'"):
        load_items(DatasetSpec(path=str(path), columns={"prompt": "q", "answer": "a"}), template="{prompt} {lang}")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ConfigError, match="no rows"):
        load_items(DatasetSpec(path=str(tmp_path / "empty.jsonl")))
    with pytest.raises(ConfigError, match="does not exist"):
        load_items(DatasetSpec(path=str(tmp_path / "missing.jsonl")))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    path = make_tiny_llama(tmp_path_factory.mktemp("tiny") / "m", seed=0)
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_fitness_scores_a_model_with_graded_fitness_and_accuracy(tiny, tmp_path):
    model, tok = tiny
    path = _write_rows(tmp_path / "d.jsonl", [{"q": f"what is {i} plus 1? ", "a": str(i + 1)} for i in range(3)])
    config = FitnessConfig(dataset=DatasetSpec(path=str(path), columns={"prompt": "q", "answer": "a"}),
                           scorer="logprob", accuracy_scorer="math_accuracy", max_new_tokens=3,
                           prompt_template="q: {prompt}")
    fit = Fitness(config)
    assert fit.prompts[0] == "q: what is 0 plus 1? "
    out = fit.score(model, tok)
    from evomerge_core.generation.hf_loop import answer_logprobs

    expected = answer_logprobs(model, tok, fit.prompts, ["1", "2", "3"])
    assert out["fitness"] == pytest.approx(sum(expected) / 3)
    assert out["fitness"] < 0 and 0.0 <= out["accuracy"] <= 1.0 and out["n_items"] == 3


def test_check_logits_flags_nan(tiny):
    from evomerge_core.kinds.evaluate import check_logits

    model, tok = tiny
    check_logits(model, tok, ["what is 1"])
    with torch.no_grad():
        saved = model.model.norm.weight.clone()
        model.model.norm.weight.fill_(float("nan"))
        try:
            with pytest.raises(ValueError, match="NaN"):
                check_logits(model, tok, ["what is 1"])
        finally:
            model.model.norm.weight.copy_(saved)


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_logprob_scorer_flags_nan_inf_logits_itself(tiny, poison):
    """`logprob` raises on NaN/inf logits in its own forward passes, so the evaluator skips
    its separate check pass for it (and only for scorers that declare it)."""
    from evomerge_core.fitness.registry import get_scorer
    from evomerge_core.generation.hf_loop import answer_logprobs

    assert get_scorer("logprob").checks_logits and not get_scorer("exact_match").checks_logits
    model, tok = tiny
    assert all(math.isfinite(v) for v in answer_logprobs(model, tok, ["what is 1"], [" 2"]))
    with torch.no_grad():
        saved = model.lm_head.weight.clone()
        model.lm_head.weight[3].fill_(poison)
        try:
            with pytest.raises(ValueError, match="the merged model produces NaN/inf logits"):
                answer_logprobs(model, tok, ["what is 1", "what is 2"], [" 2", " 3"])
        finally:
            model.lm_head.weight.copy_(saved)
