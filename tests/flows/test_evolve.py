"""The evolve flow on tiny models, under the session's Prefect test harness."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from evomerge_core.config.schema import parse_run_config
from evomerge_core.errors import UsageError
from evomerge_core.kinds.cache import clear_model_cache
from evomerge_core.runs.layout import open_store
from evomerge_core.runs.search import check_run_free
from evomerge_core.fitness.evaluator import Fitness
from evomerge_core.spaces import build_space

pytestmark = pytest.mark.timeout(300)


def make_config(family, data, storage: Path, run_key: str, **over) -> dict:
    """A small run config over the tiny family (base + ft1 + ft2)."""
    config = {
        "run_key": run_key,
        "storage": f"file://{storage}",
        "sources": [
            {"model": str(family["base"]), "base": True},
            {"model": str(family["ft1"])},
            {"model": str(family["ft2"])},
        ],
        "space": {"ps": {"method": "dare_ties", "params": ["density", "weight"]}},
        "optimizer": {"popsize": 4, "seed": 7, "generations": 2},
        "fitness": {
            "dataset": {"path": str(data["train"]), "columns": {"prompt": "question", "answer": "target"}},
            "scorer": "logprob",
            "accuracy_scorer": "math_accuracy",
            "max_new_tokens": 3,
            "batch_size": 4,
        },
    }
    for key, value in over.items():
        section, _, leaf = key.partition("__")
        if leaf:
            config[section] = {**config[section], leaf: value}
        else:
            config[key] = value
    return config


@pytest.fixture(scope="module")
def finished_run(tiny_family, tiny_dataset, tmp_path_factory):
    """A complete run with a graded (log-likelihood) fitness and a held-out test split."""
    from evomerge.flows.evolve import evolve

    storage = tmp_path_factory.mktemp("runs")
    cfg = make_config(tiny_family, tiny_dataset, storage, "layout",
                      fitness__test={"path": str(tiny_dataset["test"]), "columns": {"prompt": "question", "answer": "target"}})
    result = evolve(cfg)
    return cfg, storage, result


def test_run_writes_documented_layout(finished_run):
    cfg, storage, result = finished_run
    root = storage / "layout"
    for rel in ["config.yaml", "generations/00000.json", "generations/00001.json", "latest.json", "result.json",
                "best/config.json", "best/recipe.yaml", "best/mergekit.yaml", "report/fitness.png", "report/report.md"]:
        assert (root / rel).is_file(), rel
    assert any((root / "best").glob("*.safetensors"))
    assert not (root / "generations/00002.json").exists()
    store = open_store(parse_run_config(cfg))
    gen1 = store.read_generation(1)
    assert len(gen1["candidates"]) == 4
    for cand in gen1["candidates"]:
        assert set(cand) >= {"genome", "recipe", "fitness", "accuracy", "seconds", "error"}
        assert cand["error"] is None and math.isfinite(cand["fitness"])
    assert gen1["optimizer_state"]["generation"] == 2
    assert store.read_latest()["generation"] == 1
    stored = store.read_json("result.json")
    assert stored == json.loads(json.dumps(result))
    mergekit = yaml.safe_load((root / "best/mergekit.yaml").read_text())
    assert mergekit["merge_method"] == "dare_ties" and mergekit["base_model"] == cfg["sources"][0]["model"]
    assert (root / "report/fitness.png").read_bytes()[:4] == b"\x89PNG"
    assert "best fitness" in (root / "report/report.md").read_text()


def test_result_best_is_best_of_history(finished_run):
    _, _, result = finished_run
    history = result["history"]
    assert len(history) == 8
    assert [(h["generation"], h["index"]) for h in history] == [(g, i) for g in range(2) for i in range(4)]
    top = max(history, key=lambda h: h["fitness"])
    assert result["best_fitness"] == top["fitness"]
    assert result["best_genome"] == top["genome"]
    assert result["test"]["n_items"] == 4  # the held-out split, scored for the best only
    assert result["test"]["error"] is None and math.isfinite(result["test"]["fitness"])


def test_best_model_dir_reproduces_recorded_fitness(finished_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, storage, result = finished_run
    best_dir = storage / "layout" / "best"
    model = AutoModelForCausalLM.from_pretrained(best_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(best_dir)
    config = parse_run_config(cfg)
    rescored = Fitness(config.fitness).score(model, tokenizer)
    assert rescored["fitness"] == pytest.approx(result["best_fitness"], abs=1e-5)
    space = build_space(config, num_layers=2)
    assert yaml.safe_load((best_dir / "recipe.yaml").read_text()) == space.decode(result["best_genome"]).to_yaml_dict()


def test_finished_run_key_is_refused_unless_no_resume(finished_run):
    cfg, _, _ = finished_run
    config = parse_run_config(cfg)
    with pytest.raises(UsageError, match="already finished.*--no-resume"):
        check_run_free(config, resume=True)
    check_run_free(config, resume=False)  # starting over is allowed


def test_same_config_and_seed_give_identical_history(tiny_family, tiny_dataset, tmp_path):
    from evomerge.flows.evolve import evolve

    results = []
    for key in ("twin-a", "twin-b"):
        clear_model_cache()  # a cold worker each time: nothing carried over in memory
        cfg = make_config(tiny_family, tiny_dataset, tmp_path, key, output={"materialise_best": False, "report": False})
        results.append(evolve(cfg))
    assert results[0]["history"] == results[1]["history"]
    assert len({tuple(h["genome"]) for h in results[0]["history"]}) == 8  # real, distinct candidates


def test_planted_optimum_is_found(tiny_family, tiny_dataset, tmp_path):
    from evomerge.flows.evolve import evolve
    from evolve_test_scorers import PLANTED

    cfg = make_config(
        tiny_family, tiny_dataset, tmp_path, "planted",
        optimizer={"popsize": 8, "seed": 1, "generations": 30},
        fitness__scorer="evolve_test_scorers:planted",
        fitness__accuracy_scorer="none",
        output={"materialise_best": False, "report": False},
    )
    result = evolve(cfg)
    values = result["best_values"]
    for model in ("ft1", "ft2"):
        ref = str(tiny_family[model])
        for param, target in PLANTED[model].items():
            assert values[f"{ref}:{param}"] == pytest.approx(target, abs=0.03), (model, param)
    assert result["best_fitness"] > -1e-3
    # the search moved: the first generation was far from the optimum
    assert result["generations"][0]["best_fitness"] < result["best_fitness"]


def test_failed_candidates_are_recorded_and_run_goes_on(tiny_family, tiny_dataset, tmp_path):
    from evomerge.flows.evolve import evolve
    from evolve_test_scorers import flaky

    cfg = make_config(
        tiny_family, tiny_dataset, tmp_path, "flaky",
        fitness__scorer="evolve_test_scorers:flaky",
        fitness__accuracy_scorer="none",
        output={"materialise_best": False, "report": True},
    )
    result = evolve(cfg)
    store = open_store(parse_run_config(cfg))
    candidates = [c for g in range(2) for c in store.read_generation(g)["candidates"]]
    failed = [c for c in candidates if c["error"]]
    ok = [c for c in candidates if not c["error"]]
    assert failed and ok
    for c in failed:
        assert "injected failure" in c["error"] and c["fitness"] == flaky.worst_fitness
        assert c["genome"][0] > 0.5
    assert all(c["genome"][0] <= 0.5 for c in ok)
    assert result["best_genome"][0] <= 0.5
    assert sum(s["failed"] for s in result["generations"]) == len(failed)
    assert (tmp_path / "flaky" / "report" / "report.md").is_file()
