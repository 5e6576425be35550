"""The card of an `evomerge merge` output records the resolved commit of every Hub source (also
for a Hub id given without `@revision`) and no local absolute path, in its metadata, its text
and the pushed recipe. The Hub is the local stub (`tests/hubstub.py`, 127.0.0.1)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hubstub import HubStub, StoredFile  # noqa: E402
from tiny_models import make_tiny_family  # noqa: E402

from evomerge.flows.cli import main  # noqa: E402

torch.set_num_threads(1)
REPO = "stub-org/tiny-base"


@pytest.fixture(scope="module")
def hub():
    stub = HubStub().start()
    yield stub
    stub.stop()


@pytest.fixture
def hub_source(hub, tmp_path, monkeypatch):
    """A tiny base model on the stub Hub and a local fine-tune of it: (family, commit)."""
    import huggingface_hub.constants as hf_constants

    family = make_tiny_family(tmp_path / "models", n_finetunes=1)
    repo = hub.create_repo(REPO)
    files = {p.name: StoredFile(p.read_bytes(), False) for p in family["base"].iterdir() if p.is_file()}
    commit = hub.new_commit(repo, "main", files)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setattr(hf_constants, "ENDPOINT", hub.url)  # read when huggingface_hub was imported
    monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return family, commit


def test_card_records_hub_commit_and_no_local_paths(hub_source, tmp_path):
    from evomerge_core.publish.hub import plan_publication

    family, commit = hub_source
    cfg = {"merge_method": "task_arithmetic", "base_model": REPO,
           "models": [{"model": str(family["ft1"]), "parameters": {"weight": [{"filter": "mlp", "value": 0.7}, {"value": 0.5}]}}]}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "merged"
    assert main(["merge", str(tmp_path / "cfg.yaml"), str(out), "--no-progress", "--cache-dir", str(tmp_path / "cache")]) == 0
    record = json.loads((out / "evomerge_sources.json").read_text())
    assert record == {REPO: {"repo_id": REPO, "commit": commit}}  # local sources are not recorded

    pub = plan_publication(out, "me/merged", force_license=True, fetch_readme=lambda repo_id, revision: None)
    from huggingface_hub import ModelCard

    meta = ModelCard(pub.card_text).data.to_dict()
    assert meta["base_model"] == [REPO]
    assert meta["base_model_revisions"] == {REPO: commit}
    assert f"`{commit}`" in pub.card_text  # the sources table
    assert "`ft1` (local directory)" in pub.card_text
    local = str(tmp_path)
    assert local not in pub.card_text
    assert local not in yaml.safe_dump(pub.recipe) and local not in (pub.mergekit_yaml or "")
    assert pub.recipe["models"][0]["model"] == "ft1" and pub.recipe["base_model"] == REPO


def test_public_path_helpers_leave_hub_ids_and_urls_alone():
    from evomerge_core.publish.card import _public_path, public_names, scrub_yaml_text
    from evomerge_core.publish.licenses import SourceModel

    sources = [SourceModel("org/a@v1", "org/a", "v1"), SourceModel("/data/models/b", None, None),
               SourceModel("/c/models--org--c/snapshots/" + "0" * 40, "org/c", "0" * 40)]
    names = public_names(sources)
    assert names == {"/data/models/b": "b", "/c/models--org--c/snapshots/" + "0" * 40: "org/c"}
    text = "models:\n- model: /data/models/b\n- model: org/a@v1\n"
    assert scrub_yaml_text(text, names) == "models:\n- model: b\n- model: org/a@v1\n"
    assert _public_path("/home/me/data/train.jsonl") == "train.jsonl"
    assert _public_path("file:///home/me/data") == "data"
    assert _public_path("SakanaAI/gsm8k-ja-test_250-1319") == "SakanaAI/gsm8k-ja-test_250-1319"
    assert _public_path("s3://bucket/data.jsonl") == "s3://bucket/data.jsonl"


def test_staged_publish_folder_has_umask_permissions(tmp_path):
    import os

    from evomerge_core.publish.hub import plan_publication, stage_folder

    family = make_tiny_family(tmp_path / "models", n_finetunes=1)
    cfg = {"merge_method": "linear", "models": [{"model": str(family["base"]), "parameters": {"weight": 0.5}},
                                                 {"model": str(family["ft1"]), "parameters": {"weight": 0.5}}]}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["merge", str(tmp_path / "cfg.yaml"), str(tmp_path / "merged"), "--no-progress"]) == 0
    pub = plan_publication(tmp_path / "merged", "me/merged", force_license=True, fetch_readme=lambda r, v: None)
    old = os.umask(0o022)
    try:
        out = stage_folder(pub, tmp_path / "staged")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755 and (out / "README.md").is_file()
    assert str(tmp_path) not in (out / "recipe.yaml").read_text()


def test_recipe_under_its_old_names_is_still_read(tmp_path):
    """`recipe.yaml` is THE recipe; model dirs written before it was (`evomerge_recipe.yaml` from
    `evomerge merge`, an evolve `best/` holding both) publish as they did, evolved or not."""
    import shutil

    from evomerge_core.publish.hub import plan_publication

    family = make_tiny_family(tmp_path / "models", n_finetunes=1)
    cfg = {"merge_method": "linear", "models": [{"model": str(family["base"]), "parameters": {"weight": 0.5}},
                                                 {"model": str(family["ft1"]), "parameters": {"weight": 0.5}}]}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    new = tmp_path / "merged"
    assert main(["merge", str(tmp_path / "cfg.yaml"), str(new), "--no-progress"]) == 0
    assert (new / "recipe.yaml").is_file() and not (new / "evomerge_recipe.yaml").exists()
    legacy = tmp_path / "legacy-merge"
    shutil.copytree(new, legacy)
    (legacy / "recipe.yaml").rename(legacy / "evomerge_recipe.yaml")
    evolved = tmp_path / "legacy-best"  # an evolve best/ of before: both names, mergekit.yaml beside them
    shutil.copytree(legacy, evolved)
    shutil.copy(legacy / "evomerge_recipe.yaml", evolved / "recipe.yaml")
    (evolved / "mergekit.yaml").write_text(yaml.safe_dump(cfg))

    def plan(model_dir: Path):
        return plan_publication(model_dir, "me/merged", force_license=True, fetch_readme=lambda r, v: None)

    fresh, old, best = plan(new), plan(legacy), plan(evolved)
    assert old.recipe == fresh.recipe and best.recipe == fresh.recipe
    assert fresh.recipe["merge_method"] == "linear" and len(fresh.recipe["models"]) == 2
    assert "evolutionary-model-merge" not in fresh.card_text and "evolutionary-model-merge" not in old.card_text
    assert "evolutionary-model-merge" in best.card_text
    (legacy / "evomerge_recipe.yaml").unlink()
    from evomerge_core.errors import SourceError

    with pytest.raises(SourceError, match="has no recipe.yaml"):
        plan(legacy)
