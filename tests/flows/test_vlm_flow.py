"""The evolve flow on a tiny VLM + LLM pair: PS over the VLM's language model with the VQA
ROUGE-L fitness on image items; the best VLM loads with its processor and answers, its
vision tower and projector are the source VLM's; bad input fails before any model work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from evomerge_core.config.schema import parse_run_config
from evomerge_core.errors import ConfigError, SourceError
from evomerge_core.kinds.cache import clear_model_cache
from evomerge_core.kinds.evaluate import preflight_run
from evomerge_core.io.model_files import LazyModelReader

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def vlm_pair(tmp_path_factory) -> dict[str, Path]:
    from tiny_models import make_tiny_llama

    from evomerge_core.toyworld.vlm import Scene, draw_scene, make_tiny_llava

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("vlm-pair")
    base = make_tiny_llama(root / "base", 0)
    out = {
        "base": base,
        "llm": make_tiny_llama(root / "llm", 1, base=base, noise=0.05),
        "vlm": make_tiny_llava(base, root / "vlm", seed=2),
        "wide": make_tiny_llama(root / "wide", 3, hidden=64),
    }
    rows = []
    for i, (colour, count) in enumerate([("red", 1), ("blue", 2), ("green", 3)]):
        name = f"img{i}.png"
        draw_scene(Scene(colour, count, i)).save(root / name)
        rows.append({"image": name, "question": "what color", "target": colour})
    (root / "vqa.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out["data"] = root / "vqa.jsonl"
    return out


def _config(pair: dict[str, Path], storage: Path, run_key: str, *, llm: str = "llm", data: Path | None = None) -> dict:
    return {
        "run_key": run_key,
        "storage": f"file://{storage}",
        "sources": [{"model": str(pair["vlm"]), "vlm": True, "base": True}, {"model": str(pair[llm])}],
        "space": {"ps": {"method": "task_arithmetic"}},
        "optimizer": {"popsize": 3, "seed": 1, "generations": 2},
        "fitness": {
            "dataset": {"path": str(data or pair["data"]), "columns": {"prompt": "question", "answer": "target"}},
            "test": {"path": str(data or pair["data"]), "columns": {"prompt": "question", "answer": "target"}},
            "scorer": "vqa_rouge_l",
            "max_new_tokens": 4,
            "batch_size": 2,
        },
    }


def test_vlm_run_end_to_end(vlm_pair, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from evomerge.flows.evolve import evolve
    from evomerge_core.fitness.vqa import vqa_generate, vqa_prompts
    from evomerge_core.kinds.vlm import open_vlm

    clear_model_cache()
    result = evolve(_config(vlm_pair, tmp_path, "vlm-run"))
    assert result["evaluations"] == 6
    assert all(r["fitness"] is not None and 0.0 <= r["fitness"] <= 1.0 for r in result["history"])
    assert result["test"] is not None and result["test"]["error"] is None
    assert result["space"]["models"] == [str(vlm_pair["llm"])]  # the VLM is the base
    best = tmp_path / "vlm-run" / "best"
    assert (best / "recipe.yaml").is_file() and (best / "processor_config.json").is_file()
    # The vision tower and projector are the source VLM's, bit for bit.
    src, out = LazyModelReader(vlm_pair["vlm"]), LazyModelReader(best)
    kept = open_vlm(best).other_names
    assert kept and all(torch.equal(src.get(n), out.get(n)) for n in kept)
    model = AutoModelForImageTextToText.from_pretrained(best).eval()
    processor = AutoProcessor.from_pretrained(best)
    from PIL import Image

    image = Image.open(vlm_pair["data"].parent / "img0.png").convert("RGB")
    answers = vqa_generate(model, processor, [image], vqa_prompts(processor, ["what color"]), max_new_tokens=4)
    assert len(answers) == 1 and isinstance(answers[0], str)
    clear_model_cache()


def test_llm_of_another_size_fails_before_any_candidate(vlm_pair, tmp_path):
    from evomerge.flows.evolve import evolve

    with pytest.raises(SourceError, match="hidden_size 64"):
        evolve(_config(vlm_pair, tmp_path, "wide", llm="wide"))
    assert not (tmp_path / "wide" / "generations").exists()


def test_missing_image_fails_preflight(vlm_pair, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "nowhere.png", "question": "q", "target": "a"}) + "\n")
    with pytest.raises(ConfigError, match="image 'nowhere.png' of row 0 does not exist"):
        preflight_run(parse_run_config(_config(vlm_pair, tmp_path, "bad", data=bad)))


def test_demo_vlm_rows_on_a_tiny_pair(vlm_pair, tmp_path, monkeypatch):
    """`vlm_rows` (the demo's VLM table): one row per source VLM / unoptimised TIES / evolved PS,
    scores per seed on EN and JA test; the evolved scores are those of each run's best/, and
    selection never reads the test split."""
    import evomerge.flows.demo_vlm as demo_vlm
    from evomerge_core.runs.store import RunStore
    from evomerge_core.toyworld.vlm import VLMZoo, score_vlm_dir, split_scenes, write_vqa_split

    root = tmp_path / "zoo"
    for split, scenes in split_scenes(3, 1).items():  # 16 scenes per split
        write_vqa_split(root, split, scenes)
    zoo = VLMZoo(root=root, models={"vlm": vlm_pair["vlm"], "lang": vlm_pair["llm"], "base": vlm_pair["base"]},
                 tasks={lang: {s: root / "tasks" / f"{lang}_{s}.jsonl" for s in ("train", "validation", "test")}
                        for lang in ("en", "ja")})
    monkeypatch.setattr(demo_vlm, "build_vlm_zoo", lambda **_: zoo)
    clear_model_cache()
    rows = demo_vlm.vlm_rows(tmp_path / "out", seeds=2, evaluations=8, size="tiny")
    assert [r["kind"] for r in rows] == ["source", "merge", "evolved"]
    assert rows[1]["name"] == "unoptimised TIES (d=0.5, w=1)" and rows[2]["name"].endswith("2 seeds)")
    for row in rows:
        assert set(row["scores"]) == {"ja", "en"} and row["seconds"] > 0
        assert all(0.0 <= v <= 1.0 for values in row["scores"].values() for v in values)
    assert [len(r["scores"]["ja"]) for r in rows] == [1, 1, 2] and rows[2]["evaluated"] == 8
    assert rows[0]["scores"] == {k: [v] for k, v in score_vlm_dir(vlm_pair["vlm"], zoo).items()}
    storage = (tmp_path / "out" / "vlm" / "runs").as_uri()
    for seed in range(2):
        store = RunStore(storage, f"demo-vlm-tiny-seed{seed}")
        result, config = store.read_json("result.json"), store.read_config()
        assert result["evaluations"] == 8 and result["selection"] == "train"
        assert config["fitness"]["dataset"]["path"].endswith("ja_train.jsonl") and config["fitness"]["validation"] is None
        best = score_vlm_dir(tmp_path / "out" / "vlm" / "evolved" / f"seed{seed}", zoo)
        assert [rows[2]["scores"][lang][seed] for lang in ("ja", "en")] == [best["ja"], best["en"]]
    clear_model_cache()
