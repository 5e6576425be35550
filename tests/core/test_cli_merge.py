"""`evomerge merge`: outputs load and generate; bad input gives one clear error, a non-zero
exit and nothing left behind."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_models import make_tiny_family, make_tiny_llama  # noqa: E402

from evomerge.flows.cli import main  # noqa: E402
from evomerge_core.io.model_files import LazyModelReader  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_tiny_family(tmp_path_factory.mktemp("cli"), n_finetunes=2)


def _dare(f, **over):
    cfg = {
        "merge_method": "dare_ties",
        "base_model": str(f["base"]),
        "models": [
            {"model": str(f["ft1"]), "parameters": {"weight": 0.55, "density": 0.83}},
            {"model": str(f["ft2"]), "parameters": {"weight": 0.72, "density": 0.47}},
        ],
        "parameters": {"int8_mask": True},
        "dtype": "bfloat16",
        "seed": 3,
    }
    cfg.update(over)
    return cfg


def _run(tmp_path: Path, cfg: dict, out: Path, *extra: str) -> int:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return main(["merge", str(path), str(out), "--no-progress", *extra])


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name]


def test_output_loads_and_generates(family, tmp_path, capsys):
    out = tmp_path / "merged"
    assert _run(tmp_path, _dare(family), out) == 0
    assert "int8_mask" in capsys.readouterr().err
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    ids = tok("hello", return_tensors="pt")
    gen = model.generate(**ids, min_new_tokens=4, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] == ids.input_ids.shape[1] + 4
    assert isinstance(tok.decode(gen[0]), str)
    assert (out / "generation_config.json").is_file() and (out / "recipe.yaml").is_file()  # THE recipe (io.model_dir)
    assert not (out / "evomerge_recipe.yaml").exists()  # the old name is read, no longer written
    assert not _leftovers(tmp_path)


def test_dare_same_seed_same_output_different_seed_differs(family, tmp_path):
    assert _run(tmp_path, _dare(family), tmp_path / "a") == 0
    assert _run(tmp_path, _dare(family), tmp_path / "b") == 0
    assert _run(tmp_path, _dare(family, seed=4), tmp_path / "c") == 0
    a, b, c = (LazyModelReader(tmp_path / n) for n in "abc")
    name = "model.layers.1.mlp.up_proj.weight"
    assert all(torch.equal(a.get(k), b.get(k)) for k in a.names())
    assert not torch.equal(a.get(name), c.get(name))


def test_sharded_output_and_dtype_flag(family, tmp_path):
    out = tmp_path / "sharded"
    assert _run(tmp_path, _dare(family), out, "--shard-size", "20000", "--dtype", "float16") == 0
    assert (out / "model.safetensors.index.json").is_file()
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.float16


def test_overwrite(family, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert _run(tmp_path, _dare(family), out) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err and (out / "keep.txt").is_file()
    assert _run(tmp_path, _dare(family), out, "--overwrite") == 0
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()


def _corrupt(family, tmp_path):
    bad = tmp_path / "corrupt"
    shutil.copytree(family["ft2"], bad)
    raw = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    return bad


def _no_weights(family, tmp_path):
    bad = tmp_path / "noweights"
    shutil.copytree(family["ft2"], bad)
    (bad / "model.safetensors").unlink()
    return bad


def _other_arch(family, tmp_path):
    bad = tmp_path / "otherarch"
    shutil.copytree(family["ft2"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg.update(architectures=["MistralForCausalLM"], model_type="mistral")
    (bad / "config.json").write_text(json.dumps(cfg))
    return bad


def _wide(family, tmp_path):
    return make_tiny_llama(tmp_path / "wide", 9, hidden=48, tokenizer=False)


@pytest.mark.parametrize(
    "case, match",
    [
        ("unknown_method", "unknown merge method 'dare_tie' (did you mean 'dare_ties'?)"),
        ("missing_base", "needs a base model"),
        ("density", "'density' must be in [0.0, 1.0]"),
        ("t", "'t' must be in [0.0, 1.0]"),
        ("duplicate", "listed twice"),
        ("other_arch", "is a MistralForCausalLM"),
        ("shapes", "has shape"),
        ("corrupt", "corrupted"),
        ("no_weights", "no safetensors weights"),
        ("missing_dir", "not an existing directory"),
        ("unsupported", "'modules'"),
        ("bad_dtype", "unknown dtype"),
    ],
)
def test_bad_input_one_line_error_nothing_written(family, tmp_path, capsys, case, match):
    f = family
    cfg = _dare(f)
    extra: list[str] = []
    if case == "unknown_method":
        cfg["merge_method"] = "dare_tie"
    elif case == "missing_base":
        del cfg["base_model"]
    elif case == "density":
        cfg["models"][1]["parameters"]["density"] = 1.2
    elif case == "t":
        cfg = {"merge_method": "slerp", "base_model": str(f["base"]), "models": [{"model": str(f["ft1"])}], "parameters": {"t": [0.0, 1.5]}}
    elif case == "duplicate":
        cfg["models"].append(cfg["models"][0])
    elif case == "other_arch":
        cfg["models"][1]["model"] = str(_other_arch(f, tmp_path))
    elif case == "shapes":
        cfg["models"][1]["model"] = str(_wide(f, tmp_path))
    elif case == "corrupt":
        cfg["models"][1]["model"] = str(_corrupt(f, tmp_path))
    elif case == "no_weights":
        cfg["models"][1]["model"] = str(_no_weights(f, tmp_path))
    elif case == "missing_dir":
        cfg["models"][1]["model"] = str(tmp_path / "does-not-exist")
    elif case == "unsupported":
        cfg["modules"] = {"text": {}}
    elif case == "bad_dtype":
        extra = ["--dtype", "int3"]
    out = tmp_path / "out"
    code = _run(tmp_path, cfg, out, *extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len([line for line in err if line.startswith("error:")]) == 1
    assert match in err[-1]
    assert not out.exists()
    assert not _leftovers(tmp_path)


def test_failure_during_merge_leaves_nothing(family, tmp_path, monkeypatch, capsys):
    from evomerge_core.errors import MergeError
    from evomerge_core.merge import engine

    def fail(*args, **kwargs):
        raise MergeError("boom")

    monkeypatch.setattr(engine, "_write_aux", fail)
    assert _run(tmp_path, _dare(family), tmp_path / "out") == 2
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path)


def test_slices_config_is_read_as_whole_model(family, tmp_path):
    cfg = {
        "merge_method": "slerp",
        "base_model": str(family["base"]),
        "slices": [{"sources": [{"model": str(family["base"]), "layer_range": [0, 2]}, {"model": str(family["ft1"]), "layer_range": [0, 2]}]}],
        "parameters": {"t": 0.5},
    }
    assert _run(tmp_path, cfg, tmp_path / "s") == 0
    cfg["slices"][0]["sources"][0]["layer_range"] = [0, 1]
    cfg["slices"][0]["sources"][1]["layer_range"] = [0, 1]
    assert _run(tmp_path, cfg, tmp_path / "s2") == 2
