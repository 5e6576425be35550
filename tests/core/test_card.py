"""Model card, license derivation, source identities, repo ids and the contamination guard
(pure, no network)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub import ModelCard

from evomerge_core.publish.card import CardInputs, build_model_card, pipeline_tag_for, validate_card_text
from evomerge_core.fitness.contamination import check_run_contamination, describe_contamination, find_contamination
from evomerge_core.errors import ConfigError, UsageError
from evomerge_core.publish.licenses import (
    LicenseError,
    SourceLicense,
    describe_source,
    find_license,
    front_matter,
    merge_licenses,
)
from evomerge_core.publish.hub import check_repo_id

SHA = "0123456789abcdef0123456789abcdef01234567"


def spec(path: str, split: str = "train", data_files=None):
    return SimpleNamespace(path=path, split=split, data_files=data_files)


def run_cfg(dataset, allow: bool = False):
    return SimpleNamespace(fitness=SimpleNamespace(dataset=dataset, allow_benchmark_test_split=allow))


# ------------------------------------------------------------------ contamination guard


@pytest.mark.parametrize("path,split,bench", [
    ("openai/gsm8k", "test", "GSM8K"),
    ("gsm8k", "test[:100]", "GSM8K"),
    ("juletxara/mgsm", "train+test", "MGSM"),
    ("cais/mmlu", "test", "MMLU"),
    ("truthfulqa/truthful_qa", "validation", "TruthfulQA"),
    ("/data/gsm8k/test.jsonl", "train", "GSM8K"),
    ("./mmlu_test.parquet", "train", "MMLU"),
])
def test_selection_on_benchmark_eval_split_is_refused(path, split, bench):
    with pytest.raises(ConfigError, match=rf"{bench}.*allow_benchmark_test_split: true"):
        check_run_contamination(run_cfg(spec(path, split)))


def test_allowed_contamination_is_reported():
    findings = check_run_contamination(run_cfg(spec("openai/gsm8k", "test"), allow=True))
    assert [(f.benchmark, f.split, f.field) for f in findings] == [("GSM8K", "test", "fitness.dataset")]


@pytest.mark.parametrize("path,split,data_files", [
    ("openai/gsm8k", "train", None),
    ("SakanaAI/gsm8k-ja-test_250-1319", "test", None),  # disjoint from MGSM (the paper's data)
    ("cais/mmlu", "auxiliary_train", None),
    ("/data/latest/items.jsonl", "train", None),
    ("my-org/my-math", "test", None),
])
def test_clean_selection_data_passes(path, split, data_files):
    assert find_contamination(spec(path, split, data_files)) is None
    assert check_run_contamination(run_cfg(spec(path, split, data_files))) == []


def test_benchmark_test_files_via_data_files_are_caught():
    found = find_contamination(spec("openai/gsm8k", "train", data_files={"train": "main/test-00000-of-00001.parquet"}))
    assert found is not None and found.benchmark == "GSM8K"


def test_held_out_split_is_not_checked():
    config = {"fitness": {"dataset": {"path": "my/data", "split": "train"},
                          "test": {"path": "juletxara/mgsm", "split": "test"}}}
    assert describe_contamination(config) == []
    config["fitness"]["dataset"] = {"path": "juletxara/mgsm", "split": "test"}
    assert describe_contamination(config)[0]["benchmark"] == "MGSM"


def test_paper_example_config_passes_the_guard():
    from evomerge_core.config.schema import load_run_config

    example = Path(__file__).resolve().parents[2] / "examples" / "evollm-jp-ps.yaml"
    assert check_run_contamination(load_run_config(example)) == []


# ------------------------------------------------------------------ sources and licenses


def test_describe_source_recognises_hub_refs_and_snapshots(tmp_path):
    snap = tmp_path / "models--my-org--tiny-base" / "snapshots" / SHA
    snap.mkdir(parents=True)
    s = describe_source(str(snap))
    assert (s.repo_id, s.revision, s.path) == ("my-org/tiny-base", SHA, snap)
    s = describe_source("mistralai/Mistral-7B-v0.1", snap)
    assert (s.repo_id, s.revision) == ("mistralai/Mistral-7B-v0.1", SHA)
    s = describe_source("mistralai/Mistral-7B-v0.1@v1.0")
    assert (s.repo_id, s.revision, s.path) == ("mistralai/Mistral-7B-v0.1", "v1.0", None)
    local = tmp_path / "my-model"
    local.mkdir()
    s = describe_source(str(local))
    assert (s.repo_id, s.revision, s.display) == (None, None, "my-model")


def lic(name: str | None, display: str = "m", **kw) -> SourceLicense:
    return SourceLicense(describe_source(f"org/{display}"), name, origin="test", **kw)


def test_license_shared_by_all_sources_is_inherited():
    d = merge_licenses([lic("apache-2.0", "a"), lic("apache-2.0", "b")])
    assert (d.license, d.license_name) == ("apache-2.0", None)
    d = merge_licenses([lic("other", "a", license_name="llama-x", license_link="https://x"),
                        lic("other", "b", license_name="llama-x", license_link="https://x")])
    assert (d.license, d.license_name, d.license_link) == ("other", "llama-x", "https://x")


def test_permissive_mix_takes_the_most_demanding():
    assert merge_licenses([lic("mit", "a"), lic("apache-2.0", "b")]).license == "apache-2.0"
    assert merge_licenses([lic("mit", "a"), lic("bsd-3-clause", "b")]).license == "bsd-3-clause"


def test_conflicting_or_unknown_licenses_are_refused_unless_forced_or_named():
    with pytest.raises(LicenseError, match="conflict.*org/a: apache-2.0, org/b: cc-by-nc-4.0"):
        merge_licenses([lic("apache-2.0", "a"), lic("cc-by-nc-4.0", "b")])
    with pytest.raises(LicenseError, match="license of org/b is unknown"):
        merge_licenses([lic("apache-2.0", "a"), lic(None, "b")])
    with pytest.raises(LicenseError):
        merge_licenses([lic("other", "a", license_name="x"), lic("other", "b", license_name="y")])
    forced = merge_licenses([lic("apache-2.0", "a"), lic(None, "b")], force=True)
    assert (forced.license, forced.license_name) == ("other", "mixed-source-licenses")
    named = merge_licenses([lic("apache-2.0", "a"), lic("cc-by-nc-4.0", "b")], override="CC-BY-NC-4.0")
    assert named.license == "cc-by-nc-4.0" and "explicitly" in named.how


def test_find_license_reads_readme_then_hub_then_config(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "README.md").write_text("---\nlicense: MIT\ntags: [x]\n---\n# model\n")
    assert find_license(describe_source(str(d))).license == "mit"
    (d / "README.md").write_text("# no front matter\n")
    (d / "config.json").write_text('{"license": "apache-2.0"}')
    found = find_license(describe_source(str(d)))
    assert (found.license, found.origin) == ("apache-2.0", "config.json")
    hub = describe_source("org/hub-model@" + SHA)
    calls = []

    def fetch(repo_id, revision):
        calls.append((repo_id, revision))
        return "---\nlicense: llama3\n---\n"

    assert find_license(hub, fetch).license == "llama3"
    assert calls == [("org/hub-model", SHA)]
    assert find_license(hub, lambda r, v: None).license is None
    assert front_matter("---\n: [bad\n---\n") == {}


# ------------------------------------------------------------------ repo ids


@pytest.mark.parametrize("bad", ["noslash", "a/b/c", "org/", "/name", "org/na me", "org/--x", "org/a..b",
                                 "org/x.git", "-org/x", "o" * 97 + "/x", ""])
def test_malformed_repo_ids_are_refused(bad):
    with pytest.raises(UsageError, match="malformed; use ORG/NAME"):
        check_repo_id(bad)


def test_valid_repo_ids_pass():
    for good in ("my-org/EvoLLM-JP-7B", "u/m.v1", "SakanaAI/EvoVLM-JP-v1-7B"):
        assert check_repo_id(good) == good


# ------------------------------------------------------------------ the card


def card_inputs(model_config=None, *, test=True, contamination=(), dataset_path="my-org/train-items"):
    base = describe_source("my-org/base@" + SHA)
    ft = describe_source("my-org/ft@" + "f" * 40)
    result = {
        "run_key": "r1", "config_hash": "ab" * 32, "best_fitness": 0.625, "best_accuracy": 0.5,
        "best_values": {"my-org/ft.density": 0.83, "my-org/ft.weight": 0.55},
        "best_generation": 1, "best_index": 2, "evaluations": 8, "train_items": 40,
        "space": {"kind": "ps", "method": "dare_ties", "names": ["d", "w"], "params": ["density", "weight"]},
        "generations": [{"generation": g, "best_fitness": 0.5 + g / 8, "mean_fitness": 0.4, "failed": 0}
                        for g in range(2)],
        "test": {"fitness": 0.4375, "accuracy": 0.4375, "n_items": 16, "error": None} if test else None,
    }
    run_config = {
        "sources": [{"model": base.ref, "base": True}, {"model": ft.ref}],
        "space": {"ps": {"method": "dare_ties", "granularity": "model", "fixed": {"normalize": False}}},
        "optimizer": {"sigma0": 1 / 6, "popsize": 4, "seed": 0, "generations": 2},
        "fitness": {"dataset": {"path": dataset_path, "split": "train"},
                    "test": {"path": "juletxara/mgsm", "name": "ja", "split": "test"},
                    "scorer": "math_accuracy", "options": {"target_script": "japanese"}},
    }
    recipe = {"merge_method": "dare_ties", "base_model": base.ref,
              "models": [{"model": ft.ref, "parameters": {"density": 0.83, "weight": 0.55}}], "seed": 0}
    found = [SourceLicense(base, "apache-2.0", origin="README.md front matter"),
             SourceLicense(ft, "apache-2.0", origin="README.md front matter")]
    return CardInputs(
        repo_id="my-org/Evo-7B", model_config=model_config or {"architectures": ["MistralForCausalLM"]},
        recipe=recipe, licenses=found, license=merge_licenses(found), base=base.ref,
        mergekit_yaml="merge_method: dare_ties\n", result=result, run_config=run_config, fitness_plot=True,
        contamination=list(contamination))


def test_card_metadata_validates_and_separates_heldout_from_selection():
    text = str(build_model_card(card_inputs()))
    card = ModelCard(text, ignore_metadata_errors=False)  # huggingface_hub's strict parsing
    meta = card.data.to_dict()
    assert meta["base_model"] == ["my-org/base", "my-org/ft"]
    assert meta["base_model_relation"] == "merge"
    assert meta["base_model_revisions"] == {"my-org/base": SHA, "my-org/ft": "f" * 40}
    assert meta["license"] == "apache-2.0" and meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation"
    assert {"merge", "evolutionary-model-merge", "evomerge-ps", "dare-ties"} <= set(meta["tags"])
    results = card.data.eval_results
    assert [(r.dataset_type, r.dataset_split, r.metric_type, r.metric_value) for r in results] == [
        ("juletxara/mgsm", "test", "accuracy", 0.4375)]
    assert all(r.metric_value != 0.625 for r in results)  # the selection fitness is not an eval result
    body = card.text
    assert "Selection fitness (training data: not a held-out result)" in body and "0.6250" in body
    assert "| `juletxara/mgsm` | test | accuracy (held out) | 0.4375 | 16 |" in body
    assert "`my-org/train-items, split train`" in body and "evomerge evolve evomerge_config.yaml" in body
    assert f"`{SHA}`" in body and "![Fitness per generation" in body
    assert "Benchmark contamination" not in body
    for placeholder in ("{{", "}}", "[More Information Needed]", "TODO", "None |"):
        assert placeholder not in text


def test_card_without_heldout_split_has_no_model_index():
    card = validate_card_text(str(build_model_card(card_inputs(test=False))))
    assert card.data.eval_results is None and "model-index" not in str(card).split("---")[1]
    assert "no held-out split" in card.text


def test_card_says_when_benchmark_test_split_was_allowed():
    finding = {"field": "fitness.dataset", "dataset": "openai/gsm8k", "split": "test", "benchmark": "GSM8K"}
    body = build_model_card(card_inputs(contamination=[finding])).text
    assert "Selection used a benchmark's evaluation split" in body and "allow_benchmark_test_split: true" in body
    body = build_model_card(card_inputs(dataset_path="SakanaAI/gsm8k-ja-test_250-1319")).text
    assert "disjoint from MGSM" in body


def test_vlm_card_uses_image_text_to_text():
    config = {"architectures": ["LlavaForConditionalGeneration"], "vision_config": {"model_type": "clip_vision_model"},
              "text_config": {"model_type": "llama"}}
    assert pipeline_tag_for(config) == "image-text-to-text"
    assert pipeline_tag_for({"architectures": ["LlamaForCausalLM"]}) == "text-generation"
    card = build_model_card(card_inputs(config))
    assert card.data.pipeline_tag == "image-text-to-text"
    assert card.data.eval_results[0].task_type == "image-text-to-text"
    assert "AutoModelForImageTextToText" in card.text


def test_generation_table_is_thinned_for_long_runs():
    inputs = card_inputs()
    inputs.result["generations"] = [{"generation": g, "best_fitness": g / 200, "mean_fitness": 0.1, "failed": 0}
                                    for g in range(112)]
    body = build_model_card(inputs).text
    assert "| 1 | 0.0000 |" in body and "| 112 | 0.5550 |" in body
    assert "92 of 112 generations are left out" in body


# ------------------------------------------------------------------ the guard in config validation


def run_config_dict(**fitness) -> dict:
    return {"sources": [{"model": "org/base", "base": True}, {"model": "org/a"}],
            "fitness": {"scorer": "math_accuracy", **fitness}}


def test_config_validation_refuses_benchmark_test_selection_unless_allowed():
    from evomerge_core.config.schema import parse_run_config

    gsm8k_test = {"path": "openai/gsm8k", "name": "main", "split": "test"}
    with pytest.raises(ConfigError, match="openai/gsm8k split 'test'.*GSM8K.*allow_benchmark_test_split: true"):
        parse_run_config(run_config_dict(dataset=gsm8k_test))
    config = parse_run_config(run_config_dict(dataset=gsm8k_test, allow_benchmark_test_split=True))
    assert describe_contamination(config.model_dump(mode="json"))[0]["benchmark"] == "GSM8K"
    # the held-out split may be a benchmark's test split; selection on it via validation may not
    parse_run_config(run_config_dict(dataset={"path": "my/train"}, test=gsm8k_test))
    parse_run_config(run_config_dict(dataset={"path": "my/train"}, validation=gsm8k_test))
    with pytest.raises(ConfigError, match="fitness.validation selects on openai/gsm8k"):
        parse_run_config(run_config_dict(dataset={"path": "my/train"}, validation=gsm8k_test, selection="validation"))
