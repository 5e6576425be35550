"""`evomerge publish` end to end against a local stand-in for the Hugging Face Hub
(`tests/hubstub.py`, on 127.0.0.1): an LLM and a VLM (tiny, built here) are pushed, downloaded
back with `snapshot_download` + `from_pretrained`, and compared tensor by tensor; the card,
the dry run, idempotency, bad input and token hygiene are checked."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (hubstub, tiny_models)

# Prefect reads PREFECT_HOME when its settings load: set it before anything imports prefect.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="evomerge-prefect-home-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import torch  # noqa: E402
import yaml  # noqa: E402

from hubstub import HubStub  # noqa: E402

pytestmark = pytest.mark.timeout(600)

TOKEN = "hf_" + secrets.token_hex(20)  # write access on the stub
READ_TOKEN = "hf_" + secrets.token_hex(20)  # read-only on the stub
ORG = "stub-org"


@pytest.fixture(scope="module")
def hub():
    stub = HubStub(write_tokens=(TOKEN,), read_tokens=(READ_TOKEN,)).start()
    yield stub
    stub.stop()


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(autouse=True)
def hub_env(hub, tmp_path, monkeypatch):
    """The token in HF_TOKEN, no stored login, the stub as endpoint."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    hub.lfs_threshold = None
    hub.fail_commits = 0


def cli(*argv: str) -> int:
    from evomerge.flows.cli import main

    return main(list(argv))


def state_dict_of(model_dir: Path) -> dict[str, torch.Tensor]:
    from evomerge_core.io.model_files import LazyModelReader

    reader = LazyModelReader(model_dir)
    return {n: reader.get(n) for n in reader.names()}


def tree_hash(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def writes(hub: HubStub) -> list[str]:
    return [f"{r.method} {r.path}" for r in hub.requests if r.method in ("POST", "PUT") and "validate-yaml" not in r.path
            and "/preupload/" not in r.path]


# ------------------------------------------------------------------------ the LLM run


@pytest.fixture(scope="module")
def llm_run(hub, tmp_path_factory):
    """Tiny sources on the stub (README license there only), snapshots of them (weights, config,
    tokenizer), a merged best model, and a finished-run store around it."""
    from huggingface_hub import HfApi, snapshot_download

    from evomerge_core.merge.engine import merge_to_dir
    from evomerge_core.merge.mergekit_yaml import to_mergekit_yaml
    from evomerge_core.merge.recipe import MergeRecipe
    from evomerge_core.runs.report import write_report
    from evomerge_core.runs.store import RunStore
    from evomerge_core.sources.resolve import AUX_PATTERNS, WEIGHT_PATTERNS
    from tiny_models import make_tiny_family

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("llm")
    family = make_tiny_family(root / "family", n_finetunes=2, seed=0, noise=0.02)
    api = HfApi(endpoint=hub.url, token=TOKEN)
    refs, paths = {}, {}
    for name, path in family.items():
        repo = f"{ORG}/tiny-{name}"
        (path / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny source\n")
        api.create_repo(repo, exist_ok=True)
        sha = api.upload_folder(repo_id=repo, folder_path=str(path), commit_message="source").oid
        local = snapshot_download(repo, revision=sha, endpoint=hub.url, token=TOKEN, cache_dir=str(root / "cache"),
                                  allow_patterns=WEIGHT_PATTERNS + AUX_PATTERNS)
        assert not (Path(local) / "README.md").exists()  # the license must come from the Hub README
        refs[name] = f"{repo}@{sha}"
        paths[refs[name]] = local
    recipe = MergeRecipe.model_validate({
        "merge_method": "dare_ties", "base_model": refs["base"], "seed": 0,
        "models": [{"model": refs["ft1"], "parameters": {"density": 0.8, "weight": 0.6}},
                   {"model": refs["ft2"], "parameters": {"density": 0.5, "weight": 0.7}}]})
    best = merge_to_dir(recipe, {k: Path(v) for k, v in paths.items()}, root / "best", progress=False)
    (best / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_yaml_dict(), sort_keys=False))
    (best / "mergekit.yaml").write_text(to_mergekit_yaml(recipe))
    config = {
        "run_key": "llm-run", "storage": f"file://{root / 'runs'}",
        "sources": [{"model": refs["base"], "base": True}, {"model": refs["ft1"]}, {"model": refs["ft2"]}],
        "space": {"ps": {"method": "dare_ties", "params": ["density", "weight"], "granularity": "model"}},
        "optimizer": {"sigma0": 0.1667, "popsize": 4, "seed": 7, "generations": 2},
        "fitness": {"dataset": {"path": "/data/train.jsonl", "split": "train"},
                    "test": {"path": "/data/heldout.jsonl", "split": "train"},
                    "scorer": "logprob", "accuracy_scorer": "math_accuracy"},
    }
    names = [f"{refs[m]}.{p}" for m in ("ft1", "ft2") for p in ("density", "weight")]
    result = {
        "run_key": "llm-run", "config_hash": "c" * 64, "best_fitness": -1.2345, "best_accuracy": 0.75,
        "best_genome": [0.8, 0.6, 0.5, 0.7], "best_values": dict(zip(names, [0.8, 0.6, 0.5, 0.7])),
        "best_recipe": recipe.to_yaml_dict(), "best_generation": 1, "best_index": 3, "evaluations": 8,
        "space": {"kind": "ps", "method": "dare_ties", "base": refs["base"], "models": [refs["ft1"], refs["ft2"]],
                  "params": ["density", "weight"], "layer_groups": None, "names": names},
        "generations": [{"generation": g, "best_fitness": -2.0 + g, "mean_fitness": -2.5 + g, "best_accuracy": 0.5,
                         "mean_accuracy": 0.4, "failed": 0, "candidates": 4, "seconds": 1.0} for g in range(2)],
        "test": {"fitness": -1.5, "accuracy": 0.3125, "n_items": 16, "error": None},
        "best_model": None, "history": [],
    }
    store = RunStore(config["storage"], "llm-run")
    store.write_config(config)
    store.write_generation(0, {"generation": 0, "candidates": [{"n_items": 4}], "summary": {}, "optimizer_state": {}})
    with tempfile.TemporaryDirectory() as tmp:
        store.put_dir(write_report(Path(tmp) / "report", result, config), "report")
    store.put_dir(best, "best")
    store.write_json("result.json", result)
    return {"best": best, "run_url": store.url(), "store": store, "refs": refs, "root": root, "result": result}


def test_llm_dry_run_push_idempotent_and_download(hub, llm_run, prefect_api, tmp_path, capfd):
    best, run_url = llm_run["best"], llm_run["run_url"]
    before_model = tree_hash(best)
    repo = f"{ORG}/evo-llm"

    # Dry run: exactly the folder that would be pushed, nothing pushed.
    writes_before = writes(hub)
    dry = tmp_path / "dry"
    assert cli("publish", str(best), "--repo-id", repo, "--run", run_url, "--dry-run", str(dry),
               "--shard-size", "30000") == 0
    assert writes(hub) == writes_before and repo not in hub.repos
    staged = sorted(p.name for p in dry.iterdir())
    shards = [n for n in staged if n.startswith("model-") and n.endswith(".safetensors")]
    assert len(shards) > 1 and all((dry / n).stat().st_size <= 30000 for n in shards)  # resharded
    for name in ("README.md", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "model.safetensors.index.json", "recipe.yaml", "mergekit.yaml", "fitness.png", "evomerge_config.yaml"):
        assert name in staged, name
    assert "model.safetensors" not in staged
    assert state_dict_of(dry).keys() == state_dict_of(best).keys()
    assert all(torch.equal(state_dict_of(dry)[k], v) for k, v in state_dict_of(best).items())

    # Push: the Hub holds exactly the dry-run folder.
    assert cli("publish", str(best), "--repo-id", repo, "--run", run_url, "--shard-size", "30000") == 0
    pushed = hub.files(repo)
    assert set(pushed) - {".gitattributes"} == set(staged)
    assert all(pushed[n] == (dry / n).read_bytes() for n in staged)
    head = hub.repos[repo].branches["main"]
    marker = llm_run["store"].read_json("published.json")
    assert [(p["repo_id"], p["revision"], p["commit_sha"]) for p in marker["pushes"]] == [(repo, "main", head)]
    assert not hub.repos[repo].private

    # Re-running does not push twice.
    commits = hub.commit_count(repo)
    assert cli("publish", str(best), "--repo-id", repo, "--run", run_url, "--shard-size", "30000") == 0
    assert hub.commit_count(repo) == commits
    assert "already holds this run's model" in capfd.readouterr().out
    assert len(llm_run["store"].read_json("published.json")["pushes"]) == 1
    assert tree_hash(best) == before_model  # the local model is never modified

    # Download back and compare.
    from huggingface_hub import snapshot_download
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(snapshot_download(repo, endpoint=hub.url, token=TOKEN, cache_dir=str(tmp_path / "dl")))
    assert local.name == head
    model = AutoModelForCausalLM.from_pretrained(local, dtype=torch.float32)
    expected = state_dict_of(best)
    got = model.state_dict()
    assert set(expected) <= set(got)
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    assert AutoTokenizer.from_pretrained(local).decode([5, 6]) == AutoTokenizer.from_pretrained(best).decode([5, 6])

    # The card: strict metadata parsing, recipe, sources, held-out numbers.
    from huggingface_hub import HfApi, ModelCard

    card = ModelCard((local / "README.md").read_text(), ignore_metadata_errors=False)
    meta = card.data.to_dict()
    refs = llm_run["refs"]
    assert meta["base_model"] == [f"{ORG}/tiny-base", f"{ORG}/tiny-ft1", f"{ORG}/tiny-ft2"]
    assert meta["base_model_revisions"][f"{ORG}/tiny-base"] == refs["base"].split("@")[1]
    assert meta["base_model_relation"] == "merge" and meta["license"] == "apache-2.0"
    assert meta["pipeline_tag"] == "text-generation"
    assert [(r.metric_type, r.metric_value) for r in card.data.eval_results] == [("accuracy", 0.3125), ("logprob", -1.5)]
    text = card.text
    assert "merge_method: dare_ties" in text and "density: 0.8" in text
    for name in ("tiny-base", "tiny-ft1", "tiny-ft2"):
        assert f"[{ORG}/{name}](https://huggingface.co/{ORG}/{name})" in text
    # local dataset paths appear by file name only (no local absolute path on the card)
    assert "| `heldout.jsonl` | train | accuracy (held out) | 0.3125 | 16 |" in text
    assert "| `train.jsonl, split train` | `logprob` | -1.2345 | 0.7500 | 4 |" in text
    assert "/data/" not in str(card)
    assert "read from Hub README.md front matter" in text
    info = HfApi(endpoint=hub.url, token=TOKEN).model_info(repo)
    assert info.sha == head and info.pipeline_tag == "text-generation"

    # The token is in no file and no log.
    out = capfd.readouterr()
    assert TOKEN not in out.out + out.err
    roots = [llm_run["root"], tmp_path, Path(os.environ["PREFECT_HOME"])]
    leaks = [p for r in roots for p in r.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
    assert leaks == []


def test_publish_to_a_branch(hub, llm_run, prefect_api):
    repo = f"{ORG}/evo-llm-branch"
    assert cli("publish", str(llm_run["best"]), "--repo-id", repo, "--revision", "candidate", "--private") == 0
    r = hub.repos[repo]
    assert r.private and "candidate" in r.branches and r.branches["candidate"] != r.branches["main"]
    assert "README.md" in hub.files(repo, "candidate") and "README.md" not in hub.files(repo, "main")
    card = hub.files(repo, "candidate")["README.md"].decode()
    assert "evolutionary-model-merge" in card and "## Search" not in card  # no run: no search claims


# ------------------------------------------------------------------------ the VLM


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    """A tiny random LLaVA (CLIP vision tower + tiny Llama) saved with tokenizer and image
    processor, plus a recipe over two local sources whose READMEs carry MIT and Apache-2.0."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    from tiny_models import save_tiny_tokenizer, tiny_llama_config

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("vlm")
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=16, patch_size=8, projection_dim=16)
    config = LlavaConfig(text_config=tiny_llama_config(), vision_config=vision, image_token_index=63)
    sources = {}
    for name, lic in (("llava-src", "mit"), ("llm-src", "apache-2.0")):
        d = root / name
        d.mkdir()
        (d / "README.md").write_text(f"---\nlicense: {lic}\n---\n")
        sources[name] = d
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    out = root / "merged-vlm"
    model.save_pretrained(out)
    save_tiny_tokenizer(out)
    CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(out)
    recipe = {"merge_method": "linear", "models": [
        {"model": str(sources["llava-src"]), "parameters": {"weight": 0.5}},
        {"model": str(sources["llm-src"]), "parameters": {"weight": 0.5}}]}
    (out / "evomerge_recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return out


def test_vlm_push_with_lfs_and_download(hub, vlm_dir, prefect_api, tmp_path, monkeypatch):
    from huggingface_hub import ModelCard, constants, snapshot_download
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # the stub speaks the LFS batch API, not Xet
    hub.lfs_threshold = 4096
    repo = f"{ORG}/evo-vlm"
    assert cli("publish", str(vlm_dir), "--repo-id", repo, "--private") == 0
    stored = hub.repos[repo].commits[hub.repos[repo].branches["main"]]
    assert stored["model.safetensors"].lfs and not stored["README.md"].lfs
    assert hub.repos[repo].private

    with pytest.raises(Exception):  # private: invisible without a token
        snapshot_download(repo, endpoint=hub.url, token=False, cache_dir=str(tmp_path / "anon"))
    local = Path(snapshot_download(repo, endpoint=hub.url, token=TOKEN, cache_dir=str(tmp_path / "dl")))
    assert {"preprocessor_config.json", "tokenizer.json", "recipe.yaml", "mergekit.yaml"} <= {p.name for p in local.iterdir()}
    model = LlavaForConditionalGeneration.from_pretrained(local, dtype=torch.float32)
    original = LlavaForConditionalGeneration.from_pretrained(vlm_dir, dtype=torch.float32).state_dict()
    got = model.state_dict()
    assert set(got) == set(original) and all(torch.equal(got[k], v) for k, v in original.items())
    assert AutoProcessor.from_pretrained(local) is not None

    card = ModelCard((local / "README.md").read_text(), ignore_metadata_errors=False)
    assert card.data.pipeline_tag == "image-text-to-text"
    assert card.data.license == "apache-2.0"  # MIT + Apache-2.0 sources
    assert "base_model" not in card.data.to_dict()  # local sources are not Hub models
    assert "`llava-src` (local directory)" in card.text and "AutoModelForImageTextToText" in card.text
    assert "evolutionary-model-merge" not in card.data.tags  # a hand-written `evomerge merge`, no run


# ------------------------------------------------------------------------ bad input


def test_bad_input_gives_one_clear_error_each(hub, llm_run, prefect_api, tmp_path, monkeypatch, capfd):
    best = llm_run["best"]
    before = tree_hash(best)

    def err() -> str:
        out = capfd.readouterr()
        assert TOKEN not in out.out + out.err and READ_TOKEN not in out.out + out.err
        return [line for line in out.err.splitlines() if line.startswith("error: ")][-1]

    assert cli("publish", str(best), "--repo-id", "not a repo") == 2
    assert "malformed; use ORG/NAME" in err()

    broken = tmp_path / "broken"
    shutil.copytree(best, broken)
    (broken / "tokenizer.json").unlink()
    (broken / "tokenizer_config.json").unlink()
    assert cli("publish", str(broken), "--repo-id", f"{ORG}/x") == 2
    assert "no tokenizer files" in err()
    for f in broken.glob("*.safetensors"):
        f.unlink()
    assert cli("publish", str(broken), "--repo-id", f"{ORG}/x") == 2
    assert "no safetensors weights" in err()
    assert cli("publish", str(tmp_path / "missing"), "--repo-id", f"{ORG}/x") == 2
    assert "does not exist" in err()

    monkeypatch.delenv("HF_TOKEN")
    assert cli("publish", str(best), "--repo-id", f"{ORG}/x") == 1
    assert "no Hugging Face token: set HF_TOKEN" in err()

    monkeypatch.setenv("HF_TOKEN", "hf_" + secrets.token_hex(20))
    assert cli("publish", str(best), "--repo-id", f"{ORG}/x") == 1
    assert "rejected the token (HTTP 401)" in err()

    monkeypatch.setenv("HF_TOKEN", READ_TOKEN)
    assert cli("publish", str(best), "--repo-id", f"{ORG}/x") == 1
    assert "may not write to stub-org/x (HTTP 403)" in err()
    assert f"{ORG}/x" not in hub.repos

    # A failed upload leaves the model intact and can be retried.
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub.fail_commits = 1
    assert cli("publish", str(best), "--repo-id", f"{ORG}/retry") == 1
    message = err()
    assert "HTTP 507" in message and "the local model is unchanged" in message and "evomerge publish` again" in message
    assert hub.commit_count(f"{ORG}/retry") == 0
    assert tree_hash(best) == before
    assert not [p for p in best.parent.iterdir() if p.name.startswith("evomerge-publish-")]  # staging cleaned up
    assert cli("publish", str(best), "--repo-id", f"{ORG}/retry") == 0
    assert hub.commit_count(f"{ORG}/retry") == 1 and "README.md" in hub.files(f"{ORG}/retry")

    # Conflicting source licenses are refused unless forced.
    vlm_like = tmp_path / "conflict"
    shutil.copytree(best, vlm_like)
    src = tmp_path / "nc-src"
    src.mkdir()
    (src / "README.md").write_text("---\nlicense: cc-by-nc-4.0\n---\n")
    recipe = yaml.safe_load((vlm_like / "recipe.yaml").read_text())
    recipe["models"][0]["model"] = str(src)
    (vlm_like / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert cli("publish", str(vlm_like), "--repo-id", f"{ORG}/conflict", "--dry-run", str(tmp_path / "d1")) == 2
    assert "licenses conflict" in err() and not (tmp_path / "d1").exists()
    assert cli("publish", str(vlm_like), "--repo-id", f"{ORG}/conflict", "--dry-run", str(tmp_path / "d2"),
               "--force-license") == 0
    assert "license: other" in (tmp_path / "d2" / "README.md").read_text()


# ------------------------------------------------------------------------ the evolve flow's publish step


def test_evolve_flow_publishes_best_when_repo_id_is_set(hub, prefect_api, tmp_path):
    """A tiny evolve run with output.publish.repo_id pushes best/ with a card built from the run."""
    from evomerge.flows.evolve import evolve
    from evomerge_core.runs.store import RunStore
    from tiny_models import make_tiny_family

    torch.set_num_threads(1)
    family = make_tiny_family(tmp_path / "family", n_finetunes=2, seed=1, noise=0.02)
    for path in family.values():
        (path / "README.md").write_text("---\nlicense: mit\n---\n")
    rows = [{"question": f"what is {i} plus 1? ", "target": str(i + 1)} for i in range(3)]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    repo = f"{ORG}/evolved"
    config = {
        "run_key": "publish-step", "storage": f"file://{tmp_path / 'runs'}",
        "sources": [{"model": str(family["base"]), "base": True}, {"model": str(family["ft1"])},
                    {"model": str(family["ft2"])}],
        "space": {"ps": {"method": "dare_ties", "params": ["density", "weight"]}},
        "optimizer": {"popsize": 2, "seed": 3, "generations": 1},
        "fitness": {"dataset": {"path": str(data), "columns": {"prompt": "question", "answer": "target"}},
                    "test": {"path": str(data), "columns": {"prompt": "question", "answer": "target"}},
                    "scorer": "logprob", "accuracy_scorer": "math_accuracy", "max_new_tokens": 2, "batch_size": 4},
        "output": {"publish": {"repo_id": repo, "private": True}},
    }
    result = evolve(config)
    files = hub.files(repo)
    assert {"README.md", "recipe.yaml", "mergekit.yaml", "fitness.png", "evomerge_config.yaml"} <= set(files)
    card = files["README.md"].decode()
    assert "## Search" in card and "evolutionary-model-merge" in card and "license: mit" in card
    held_out = result["test"]
    assert held_out["accuracy"] is not None
    assert f"| accuracy (held out) | {held_out['accuracy']:.4f} | 3 |" in card
    marker = RunStore(config["storage"], "publish-step").read_json("published.json")
    assert marker["pushes"][0]["commit_sha"] == hub.repos[repo].branches["main"]
