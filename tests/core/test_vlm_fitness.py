"""ROUGE-L (closed forms, tokenisation per script, the script check), VQA items from jsonl with
an image-path column and from an imagefolder, bad input (missing images/column), and VLM run
configs (the example included, validated without downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evomerge_core.config.schema import load_run_config, parse_run_config
from evomerge_core.errors import ConfigError
from evomerge_core.fitness.evaluator import Fitness
from evomerge_core.fitness.registry import ScoreContext, get_scorer
from evomerge_core.fitness.vqa import item_score, lcs_length, rouge_l, tokens

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "evovlm-jp.yaml"


def test_lcs_and_rouge_l_closed_forms():
    assert lcs_length(list("abcde"), list("ace")) == 3
    assert lcs_length([], list("a")) == 0
    # words: LCS("the cat sat", "the cat is here") = 2 -> P 2/3, R 2/4, F = 4/7
    assert rouge_l("the cat sat", "The cat is here") == pytest.approx(4 / 7)
    assert rouge_l("same words", "same words") == 1.0
    assert rouge_l("", "anything") == 0.0


def test_japanese_is_scored_by_characters():
    assert tokens("赤い 車", "auto") == ["赤", "い", "車"]
    assert tokens("a red car", "auto") == ["a", "red", "car"]
    # chars: LCS("赤い車です", "赤い車") = 3 -> P 3/5, R 1, F = 0.75
    assert rouge_l("赤い車です", "赤い車") == pytest.approx(0.75)
    # auto follows the reference: a JA reference scores a prediction by characters too
    assert rouge_l("ＡＢ", "AB") == 1.0  # NFKC


def test_wrong_script_scores_zero():
    options = {"target_script": "japanese"}
    assert item_score("red car", "赤い車", options) == 0.0
    assert item_score("赤い車", "赤い車", options) == 1.0
    assert item_score("red car", "red car", {}) == 1.0
    assert item_score("あか", ["あお", "あか"], options) == 1.0  # best of several references


def test_rouge_l_text_scorer_reports_fitness_and_accuracy():
    scorer = get_scorer("rouge_l")
    ctx = ScoreContext(model=None, tokenizer=None, rows=[{"answer": "あかい"}, {"answer": "two cats"}],
                       prompts=["", ""], options={"target_script": "japanese"})
    ctx.cache["outputs"] = ["あかい", "two cats"]
    result = scorer(ctx)
    assert result == {"fitness": 0.5, "accuracy": 0.5}  # the EN answer fails the JA script check


def _png(path: Path, colour=(255, 0, 0)) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


def _vqa_config(path: str, **extra) -> dict:
    return {
        "sources": [{"model": "./vlm", "vlm": True, "base": True}, {"model": "./llm"}],
        "space": {"ps": {"method": "task_arithmetic"}},
        "fitness": {"scorer": "vqa_rouge_l", "dataset": {"path": path, **extra},
                    "prompt_template": "{prompt}", "options": {"target_script": "japanese"}},
    }


def test_vqa_items_from_jsonl_with_image_paths(tmp_path):
    _png(tmp_path / "img" / "a.png")
    _png(tmp_path / "img" / "b.png", (0, 0, 255))
    rows = [{"image": "img/a.png", "prompt": "いろ：", "answer": "あか"},
            {"image": "img/b.png", "prompt": "いろ：", "answer": "あお"}]
    data = tmp_path / "vqa.jsonl"
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    fitness = Fitness(parse_run_config(_vqa_config(str(data))).fitness)
    assert len(fitness.rows) == 2
    assert fitness.rows[1]["image"].size == (8, 8) and fitness.rows[1]["image"].getpixel((0, 0)) == (0, 0, 255)
    assert fitness.prompts == ["いろ：", "いろ："]


def test_vqa_items_from_an_imagefolder(tmp_path):
    folder = tmp_path / "folder"
    _png(folder / "x.png")
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "x.png", "prompt": "q", "answer": "あか"}) + "\n")
    fitness = Fitness(parse_run_config(_vqa_config(str(folder))).fitness)
    assert len(fitness.rows) == 1 and fitness.rows[0]["image"].getpixel((1, 1)) == (255, 0, 0)


def test_missing_image_is_a_clear_error(tmp_path):
    _png(tmp_path / "ok.png")
    data = tmp_path / "vqa.jsonl"
    data.write_text(json.dumps({"image": "ok.png", "prompt": "q", "answer": "a"}) + "\n"
                    + json.dumps({"image": "gone.png", "prompt": "q", "answer": "a"}) + "\n")
    with pytest.raises(ConfigError, match="image 'gone.png' of row 1 does not exist"):
        Fitness(parse_run_config(_vqa_config(str(data))).fitness)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    data.write_text(json.dumps({"image": "broken.png", "prompt": "q", "answer": "a"}) + "\n")
    with pytest.raises(ConfigError, match="cannot be read"):
        Fitness(parse_run_config(_vqa_config(str(data))).fitness)


def test_missing_image_column_is_a_clear_error(tmp_path):
    data = tmp_path / "vqa.jsonl"
    data.write_text(json.dumps({"picture": "x.png", "prompt": "q", "answer": "a"}) + "\n")
    with pytest.raises(ConfigError, match="no image column 'image'.*image_column"):
        Fitness(parse_run_config(_vqa_config(str(data))).fitness)


def test_vlm_config_checks(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    ok = parse_run_config(_vqa_config(str(data)))
    assert ok.vlm == "./vlm"
    both = _vqa_config(str(data))
    both["sources"][1]["vlm"] = True
    with pytest.raises(ConfigError, match="2 models are marked vlm: true"):
        parse_run_config(both)
    unmarked = _vqa_config(str(data))
    unmarked["sources"][0]["vlm"] = False
    with pytest.raises(ConfigError, match="scores a VLM on images; mark the VLM source with vlm: true"):
        parse_run_config(unmarked)
    bad_option = _vqa_config(str(data))
    bad_option["fitness"]["options"] = {"tokenize": "bytes"}
    with pytest.raises(ConfigError, match="tokenize"):
        parse_run_config(bad_option)


def test_llm_configs_dump_without_the_vlm_key():
    config = parse_run_config({"sources": [{"model": "./a", "base": True}, {"model": "./b"}],
                               "fitness": {"scorer": "logprob", "dataset": {"path": "org/data"}}})
    assert all("vlm" not in s for s in config.model_dump(mode="json")["sources"])


def test_evovlm_example_validates_without_downloads():
    config = load_run_config(EXAMPLE)
    assert config.vlm == "llava-hf/llava-v1.6-mistral-7b-hf"
    assert [s.model for s in config.sources] == ["llava-hf/llava-v1.6-mistral-7b-hf", "augmxnt/shisa-gamma-7b-v1",
                                                 "mistralai/Mistral-7B-v0.1"]
    assert config.base == "mistralai/Mistral-7B-v0.1"
    assert config.fitness.scorer == "vqa_rouge_l" and config.fitness.dataset.path == "SakanaAI/JA-VG-VQA-500"
    assert config.fitness.dataset.split == "train" and config.fitness.test.split == "test"
    assert config.fitness.options["target_script"] == "japanese"
    assert get_scorer(config.fitness.scorer).needs_images
    from evomerge_core.spaces import build_space

    recipe = build_space(config).decode([0.5] * 4)
    assert recipe.base_model == "mistralai/Mistral-7B-v0.1"
    assert [m.model for m in recipe.models] == ["llava-hf/llava-v1.6-mistral-7b-hf", "augmxnt/shisa-gamma-7b-v1"]


def test_evovlm_example_fitness_reads_ja_vg_vqa_rows(tmp_path):
    """The example's templates on rows shaped like JA-VG-VQA-500 (a list of QAs per image)."""
    _png(tmp_path / "1.png")
    row = {"image_id": 1, "image": "1.png",
           "qas": [{"question": "何色ですか？", "answer": "赤色", "qa_id": 7}, {"question": "他", "answer": "x", "qa_id": 8}]}
    data = tmp_path / "vg.jsonl"
    data.write_text(json.dumps(row, ensure_ascii=False) + "\n")
    raw = load_run_config(EXAMPLE).model_dump(mode="json")
    raw["fitness"]["dataset"] = {"path": str(data)}
    raw["fitness"]["test"] = None
    fitness = Fitness(parse_run_config(raw).fitness)
    assert fitness.prompts == ["何色ですか？"]
    assert fitness.rows[0]["answer"] == "赤色" and fitness.rows[0]["image"].size == (8, 8)
