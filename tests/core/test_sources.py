"""Resolving source references and validating that sources can be merged."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import fsspec
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_models import make_tiny_family, make_tiny_llama  # noqa: E402

from evomerge_core.errors import SourceError  # noqa: E402
from evomerge_core.io.model_files import LazyModelReader  # noqa: E402
from evomerge_core.sources.resolve import parse_hub_ref, resolve_source, validate_sources  # noqa: E402


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_tiny_family(tmp_path_factory.mktemp("src"), n_finetunes=1, tokenizer=False)


def test_local_and_file_url(family):
    assert resolve_source(str(family["base"])) == family["base"].resolve()
    assert resolve_source("file://" + str(family["base"])) == family["base"].resolve()


def test_missing_local_path_is_a_clear_error(tmp_path):
    with pytest.raises(SourceError, match="not an existing directory"):
        resolve_source(str(tmp_path / "nope"))
    with pytest.raises(SourceError, match="not an existing directory"):
        resolve_source("./relative/missing/dir/x")


def test_hub_ref_parsing_and_download_arguments(monkeypatch, tmp_path, family):
    assert parse_hub_ref("org/name@abc123") == ("org/name", "abc123")
    assert parse_hub_ref("org/name") == ("org/name", None)
    calls = {}

    def fake_snapshot_download(repo_id, **kwargs):
        calls.update(repo_id=repo_id, **kwargs)
        return str(family["base"])

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    out = resolve_source("org/name@v1.0", cache_dir=tmp_path, token="secret")
    assert out == family["base"]
    assert calls["repo_id"] == "org/name" and calls["revision"] == "v1.0" and calls["token"] == "secret"
    assert "*.safetensors" in calls["allow_patterns"] and "*.bin" not in calls["allow_patterns"]
    resolve_source("org/name", cache_dir=tmp_path, allow_pickle=True)
    assert "*.bin" in calls["allow_patterns"] and calls["revision"] is None


def test_hub_errors_do_not_leak_token(monkeypatch, tmp_path):
    import huggingface_hub

    def boom(repo_id, **kwargs):
        raise RuntimeError(f"401 for token {kwargs['token']}")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", boom)
    with pytest.raises(SourceError) as err:
        resolve_source("org/private", cache_dir=tmp_path, token="hf_secret_value")
    assert "hf_secret_value" not in str(err.value) and "org/private" in str(err.value)


def test_fsspec_url_is_copied_to_cache(family, tmp_path):
    fs = fsspec.filesystem("memory")
    for f in Path(family["ft1"]).iterdir():
        fs.pipe(f"/models/ft1/{f.name}", f.read_bytes())
    fs.pipe("/models/ft1/optimizer.pt", b"ignored")
    out = resolve_source("memory://models/ft1", cache_dir=tmp_path)
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert not (out / "optimizer.pt").exists()
    reader = LazyModelReader(out)
    assert torch.equal(reader.get("lm_head.weight"), LazyModelReader(family["ft1"]).get("lm_head.weight"))


def test_pickle_weights_refused_unless_opted_in(family, tmp_path):
    pdir = tmp_path / "pickled"
    pdir.mkdir()
    shutil.copy(family["base"] / "config.json", pdir / "config.json")
    state = {k: LazyModelReader(family["base"]).get(k) for k in LazyModelReader(family["base"]).names()}
    torch.save(state, pdir / "pytorch_model.bin")
    with pytest.raises(SourceError, match="--allow-pickle"):
        resolve_source(str(pdir), cache_dir=tmp_path / "cache")
    out = resolve_source(str(pdir), allow_pickle=True, cache_dir=tmp_path / "cache")
    reader = LazyModelReader(out)
    assert sorted(reader.names()) == sorted(state)
    assert torch.equal(reader.get("model.norm.weight"), state["model.norm.weight"])
    validate_sources({"a": out, "b": family["base"]}, base="b")


def test_validate_sources_reports_info(family):
    info = validate_sources({"b": family["base"], "f": family["ft1"]}, base="b")
    assert info.architecture == "LlamaForCausalLM" and info.num_layers == 2 and info.reference == "b"
    assert info.tensor_shapes["lm_head.weight"] == (64, 32)
    assert info.vocab_sizes == {"b": 64, "f": 64}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_different_architecture_is_refused(family, tmp_path):
    other = _copy(family["ft1"], tmp_path / "mistral")
    cfg = json.loads((other / "config.json").read_text())
    cfg.update(architectures=["MistralForCausalLM"], model_type="mistral")
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SourceError, match="'o' is a MistralForCausalLM.*LlamaForCausalLM"):
        validate_sources({"b": family["base"], "o": other}, base="b")


def test_mismatched_shapes_name_tensor_and_model(tmp_path, family):
    wide = make_tiny_llama(tmp_path / "wide", 5, hidden=48, tokenizer=False)
    with pytest.raises(SourceError, match=r"tensor \S+ has shape .* in model 'w'"):
        validate_sources({"b": family["base"], "w": wide}, base="b")


def test_missing_tensor_names_model(tmp_path, family):
    from safetensors.torch import load_file, save_file

    other = _copy(family["ft1"], tmp_path / "missing")
    state = load_file(other / "model.safetensors")
    del state["model.norm.weight"]
    save_file(state, other / "model.safetensors")
    with pytest.raises(SourceError, match="model.norm.weight.*'m'"):
        validate_sources({"b": family["base"], "m": other}, base="b")


def test_vocab_difference_is_allowed(tmp_path, family):
    big = make_tiny_llama(tmp_path / "bigvocab", 5, vocab_size=72, tokenizer=False)
    info = validate_sources({"b": family["base"], "v": big}, base="b")
    assert info.vocab_sizes == {"b": 64, "v": 72} and info.tensor_shapes["model.embed_tokens.weight"] == (64, 32)


def test_check_same_tensors_names_the_first_missing_or_extra_tensor():
    from evomerge_core.errors import SourceError
    from evomerge_core.sources.resolve import check_same_tensors

    ref = {"a.weight": 1, "b.weight": 2}
    check_same_tensors(ref, {"b.weight": 0, "a.weight": 0}, ref="'base'", model="ft")  # order does not matter
    with pytest.raises(SourceError, match=r"^tensor b.weight of 'base' is missing from model 'ft'; the models do not have the same tensors$"):
        check_same_tensors(ref, {"a.weight": 0}, ref="'base'", model="ft")
    with pytest.raises(SourceError, match=r"^model 'ft' has tensor c.bias that the language model of VLM 'v' lacks; "):
        check_same_tensors(ref, {**ref, "c.bias": 0}, ref="the language model of VLM 'v'", model="ft")
