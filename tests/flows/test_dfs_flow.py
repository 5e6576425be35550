"""DFS and PS+DFS runs of the evolve flow on tiny models, under the session's Prefect harness."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from evomerge_core.config.schema import parse_run_config
from evomerge_core.kinds.cache import clear_model_cache
from evomerge_core.runs.layout import open_store
from evomerge_core.fitness.evaluator import Fitness, minibatch_indices
from evomerge_core.spaces.dfs import DFSRecipe, DFSSpace

pytestmark = pytest.mark.timeout(300)
COLUMNS = {"prompt": "question", "answer": "target"}


def dfs_config(family, data, storage: Path, run_key: str, **over) -> dict:
    """DFS over two fine-tunes of the tiny family (A = ft1, B = ft2: 2 layers each)."""
    a, b = str(family["ft1"]), str(family["ft2"])
    config = {
        "run_key": run_key,
        "storage": f"file://{storage}",
        "sources": [{"model": a}, {"model": b}],
        "space": {"dfs": {"model_a": a, "model_b": b, "r": 1, "scales": "matrix"}},
        "optimizer": {"popsize": 4, "seed": 5, "generations": 2, "sigma0": 0.5},
        "fitness": {
            "dataset": {"path": str(data["train"]), "columns": COLUMNS},
            "scorer": "logprob",
            "accuracy_scorer": "none",
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
def dfs_run(tiny_family, tiny_dataset, tmp_path_factory):
    from evomerge.flows.evolve import evolve

    storage = tmp_path_factory.mktemp("dfs-runs")
    cfg = dfs_config(tiny_family, tiny_dataset, storage, "dfs")
    return cfg, storage, evolve(cfg)


def test_dfs_run_writes_the_run_layout(dfs_run):
    cfg, storage, result = dfs_run
    root = storage / "dfs"
    for rel in ["config.yaml", "generations/00000.json", "generations/00001.json", "latest.json", "result.json",
                "best/config.json", "best/recipe.yaml", "best/lineage.yaml", "report/report.md", "report/fitness.png"]:
        assert (root / rel).is_file(), rel
    assert not (root / "generations/00002.json").exists()
    assert result["space"]["kind"] == "dfs" and result["space"]["slots"] == 4  # (2 + 2 layers) x r=1
    assert result["space"]["scales"] == "matrix" and len(result["best_genome"]) == 4 + 16
    assert len(result["history"]) == 8
    assert result["best_fitness"] == max(h["fitness"] for h in result["history"])
    assert open_store(parse_run_config(cfg)).read_json("result.json") == json.loads(json.dumps(result))
    candidates = open_store(parse_run_config(cfg)).read_generation(1)["candidates"]
    assert all(c["error"] is None and math.isfinite(c["fitness"]) for c in candidates)
    assert all(c["recipe"]["kind"] == "dfs" for c in candidates)
    assert "model A" in (root / "report/report.md").read_text()


def test_dfs_best_loads_plainly_and_reproduces_recorded_fitness(dfs_run, tiny_family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, storage, result = dfs_run
    best_dir = storage / "dfs" / "best"
    config_json = json.loads((best_dir / "config.json").read_text())
    assert "auto_map" not in config_json  # standard architecture, no remote code
    model = AutoModelForCausalLM.from_pretrained(best_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(best_dir)
    config = parse_run_config(cfg)
    recipe = DFSRecipe.from_yaml(best_dir / "recipe.yaml")
    space = DFSSpace.from_sources(config.space.dfs, {str(tiny_family[m]): str(tiny_family[m]) for m in ("ft1", "ft2")})
    assert recipe.path == space.decode(result["best_genome"]).path
    assert model.config.num_hidden_layers == recipe.num_hops
    assert any(h.scale != 1.0 for h in recipe.path)  # the export had scales to fold in
    rescored = Fitness(config.fitness).score(model, tokenizer)
    assert rescored["fitness"] == pytest.approx(result["best_fitness"], abs=1e-5)
    lineage = yaml.safe_load((best_dir / "lineage.yaml").read_text())
    assert lineage["model_a"]["model"] == str(tiny_family["ft1"]) and lineage["model_b"]["model"] == str(tiny_family["ft2"])


def test_minibatch_and_validation_selection_are_deterministic(tiny_family, tiny_dataset, tmp_path):
    from evomerge.flows.evolve import evolve

    validation = {"path": str(tiny_dataset["test"]), "columns": COLUMNS}
    results = []
    for key in ("mb-a", "mb-b"):
        clear_model_cache()  # a cold worker each time
        cfg = dfs_config(tiny_family, tiny_dataset, tmp_path, key,
                         optimizer={"popsize": 4, "seed": 11, "generations": 3, "sigma0": 0.5},
                         fitness__scorer="dfs_test_scorers:logprob_and_items", fitness__minibatch=2,
                         fitness__validation=validation, fitness__selection="validation",
                         output={"materialise_best": False, "report": False})
        results.append(evolve(cfg))
    first, second = results
    assert first["history"] == second["history"]
    assert len({tuple(h["genome"]) for h in first["history"]}) == 12
    store = open_store(parse_run_config(cfg))
    for g in range(3):
        expected = minibatch_indices(4, 2, seed=11, generation=g)
        mask = float(sum(2 ** (i + 1) for i in expected))  # row i's answer is i + 1
        for cand in store.read_generation(g)["candidates"]:
            assert cand["n_items"] == 2 and cand["metrics"]["items"] == mask, (g, cand["index"])
    # the run's best: the generation best with the highest validation fitness
    gens = first["generations"]
    assert all(s["validation"]["n_items"] == 4 and s["validation"]["index"] == s["best_index"] for s in gens)
    top = max(gens, key=lambda s: s["validation"]["fitness"])
    assert first["selection"] == "validation"
    assert (first["best_generation"], first["best_index"]) == (top["generation"], top["best_index"])
    assert first["best_validation"]["fitness"] == top["validation"]["fitness"]


def test_minibatch_indices_depend_only_on_seed_and_generation():
    a = minibatch_indices(1069, 200, seed=0, generation=3)
    assert a == minibatch_indices(1069, 200, seed=0, generation=3) and len(set(a)) == 200 and a == sorted(a)
    assert a != minibatch_indices(1069, 200, seed=0, generation=4)
    assert a != minibatch_indices(1069, 200, seed=1, generation=3)


def test_ps_then_dfs_chain_records_lineage(tiny_family, tiny_dataset, tmp_path):
    from evomerge.flows.evolve import evolve
    from transformers import AutoModelForCausalLM

    cfg = {
        "run_key": "psdfs",
        "storage": f"file://{tmp_path}",
        "sources": [{"model": str(tiny_family["base"]), "base": True}, {"model": str(tiny_family["ft1"])},
                    {"model": str(tiny_family["ft2"])}],
        "optimizer": {"popsize": 3, "seed": 2, "generations": 1},
        "fitness": {"dataset": {"path": str(tiny_dataset["train"]), "columns": COLUMNS}, "scorer": "logprob",
                    "accuracy_scorer": "none", "batch_size": 4},
        "output": {"report": False},
        "stages": [
            {"name": "ps", "space": {"ps": {"method": "dare_ties", "params": ["density", "weight"]}}},
            {"name": "dfs", "space": {"dfs": {"model_a": "@ps", "model_b": str(tiny_family["ft2"]), "r": 1}},
             "optimizer": {"popsize": 4, "seed": 3, "generations": 2}},
        ],
    }
    result = evolve(cfg)
    root = tmp_path / "psdfs"
    for rel in ["config.yaml", "result.json", "stages/0/config.yaml", "stages/0/result.json", "stages/0/best/recipe.yaml",
                "stages/1/result.json", "stages/1/best/recipe.yaml", "stages/1/best/lineage.yaml"]:
        assert (root / rel).is_file(), rel
    ps_url = (root / "stages/0/best").as_uri()
    assert [s["kind"] for s in result["stages"]] == ["ps", "dfs"]
    assert result["stages"][0]["best_model"] == ps_url
    assert result["lineage"][1]["sources"] == [ps_url, str(tiny_family["ft2"])]
    assert result["lineage"][1]["inputs_from_stages"] == {"model_a": {"stage": 0, "name": "ps"}}
    assert result["lineage"][0]["best_recipe"]["merge_method"] == "dare_ties"
    assert result["best_recipe"]["model_a"] == ps_url and result["best_recipe"]["kind"] == "dfs"
    assert [h["stage"] for h in result["history"]] == [0] * 3 + [1] * 8
    assert result["evaluations"] == 11
    # the DFS model's lineage embeds the PS recipe it was built on
    lineage = yaml.safe_load((root / "stages/1/best/lineage.yaml").read_text())
    ps_recipe = yaml.safe_load((root / "stages/0/best/recipe.yaml").read_text())
    assert lineage["model_a"]["model"] == ps_url and lineage["model_a"]["recipe"] == ps_recipe
    assert result["best_model"] == (root / "stages/1/best").as_uri()
    model = AutoModelForCausalLM.from_pretrained(root / "stages/1/best")
    assert model.config.num_hidden_layers == len(result["best_recipe"]["path"])


BAD_DFS = {
    "three sources": (lambda c, f, w: c["sources"].append({"model": str(f["base"])}), "sources: a DFS run combines exactly two models"),
    "r below 1": (lambda c, f, w: c["space"]["dfs"].update(r=0), "space.dfs.r is 0"),
    "max_hops below 2": (lambda c, f, w: c["space"]["dfs"].update(max_hops=1), "space.dfs.max_hops is 1"),
    "bad scales mode": (lambda c, f, w: c["space"]["dfs"].update(scales="diag"), "space.dfs.scales"),
    "A not a source": (lambda c, f, w: c["space"]["dfs"].update(model_a="org/other"), "space.dfs.model_a"),
    "hidden sizes differ": (lambda c, f, w: (c["sources"].__setitem__(1, {"model": str(w)}),
                                              c["space"]["dfs"].update(model_b=str(w))), "hidden_size=32"),
    "selection without validation": (lambda c, f, w: c["fitness"].update(selection="validation"), "fitness.validation is not set"),
    "minibatch too large": (lambda c, f, w: c["fitness"].update(minibatch=9), "fitness.minibatch is 9"),
}


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    from tiny_models import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("wide") / "wide", 3, hidden=48)


@pytest.mark.parametrize("case", sorted(BAD_DFS))
def test_bad_dfs_input_exits_2_before_any_model_or_file(case, tiny_family, tiny_dataset, wide_model, tmp_path, capsys,
                                                        monkeypatch):
    import evomerge_core.kinds.dfs_model as dataflow
    from evomerge.flows.cli import main

    def no_models(*args, **kwargs):
        raise AssertionError("a model was loaded for bad input")

    monkeypatch.setattr(dataflow.DataflowModel, "from_pretrained", no_models)
    cfg = dfs_config(tiny_family, tiny_dataset, tmp_path / "runs", "bad")
    mutate, expected = BAD_DFS[case]
    mutate(cfg, tiny_family, wide_model)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    rc = main(["evolve", str(path)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and expected in err, err
    assert not (tmp_path / "runs").exists()  # nothing half-written
