"""`evomerge evolve` fails before the search starts (issue 19): every setting of a run config and
every property of the sources that `evomerge merge` checks is checked before anything is written
or a flow starts. Each case goes through the CLI in process and must give exactly one `error:`
line naming the fix, exit code 2, no traceback and no run directory; the corrected config then
starts without --no-resume. Also: the `allow_pickle` way named by its error works, and every
file in examples/ validates (the toy-world one with every check, on a fresh toy world copy)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import types
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_models import make_tiny_family, make_tiny_llama, save_tiny_tokenizer  # noqa: E402

from evomerge.flows.cli import main  # noqa: E402

torch.set_num_threads(1)
pytestmark = pytest.mark.timeout(300)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    return make_tiny_family(tmp_path_factory.mktemp("preflight-family"), n_finetunes=1)


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory) -> dict[str, Path]:
    """Two tiny Mixtral models (stored per-expert tensor names, fused in transformers 5)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    root = tmp_path_factory.mktemp("preflight-mixtral")
    cfg = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1)
    out = {}
    for name, seed in (("base", 0), ("ft", 1)):
        torch.manual_seed(seed)
        MixtralForCausalLM(cfg).save_pretrained(root / name)
        save_tiny_tokenizer(root / name)
        out[name] = root / name
    return out


class Flow:
    """Stands in for the evolve flow: records the calls the CLI makes."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, config: dict, resume: bool = True, run_key: str = "") -> dict:
        self.calls.append({"config": config, "resume": resume, "run_key": run_key})
        return {}


@pytest.fixture
def flow(monkeypatch) -> Flow:
    """No Prefect: the flow module is a recorder, the API check and any local API are no-ops."""
    import evomerge.flows.prefect_api as prefect_api
    import evomerge_core.kinds.resident as resident

    def no_models(*args, **kwargs):
        raise AssertionError("a model was loaded before the search started")

    monkeypatch.setattr(resident.ResidentModel, "__init__", no_models)
    recorder = Flow()
    module = types.ModuleType("evomerge.flows.evolve")
    module.evolve = recorder
    monkeypatch.setitem(sys.modules, "evomerge.flows.evolve", module)
    monkeypatch.setattr(prefect_api, "check_api", lambda: None)
    server = types.ModuleType("evomerge.flows.local_server")  # the command's own Prefect API, if any
    server.local_api = lambda: contextlib.nullcontext(None)
    server.using = lambda s: contextlib.nullcontext()
    monkeypatch.setitem(sys.modules, "evomerge.flows.local_server", server)
    return recorder


def _config(tmp: Path, family: dict[str, Path]) -> dict:
    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps({"question": f"what is {i} plus 1? ", "target": str(i + 1)}) + "\n"
                            for i in range(4)))
    return {
        "run_key": "preflight",
        "storage": f"file://{tmp / 'runs'}",
        "sources": [{"model": str(family["base"]), "base": True}, {"model": str(family["ft1"])}],
        "optimizer": {"popsize": 3, "seed": 3, "generations": 2},
        "fitness": {"dataset": {"path": str(data), "columns": {"prompt": "question", "answer": "target"}},
                    "scorer": "math_accuracy", "max_new_tokens": 3},
    }


def _copy_ft(c: dict, tmp: Path, name: str) -> Path:
    out = tmp / name
    shutil.copytree(c["_family"]["ft1"], out)
    return out


def _set_ft(make: Callable[[dict, Path], Path]) -> Callable[[dict, Path], None]:
    def mutate(c: dict, tmp: Path) -> None:
        c["sources"][1]["model"] = str(make(c, tmp))
    return mutate


def _pickle_only(c: dict, tmp: Path) -> Path:
    from safetensors.torch import load_file

    out = _copy_ft(c, tmp, "pickle-only")
    torch.save(load_file(out / "model.safetensors"), out / "pytorch_model.bin")
    (out / "model.safetensors").unlink()
    return out


def _truncated(c: dict, tmp: Path) -> Path:
    out = _copy_ft(c, tmp, "truncated")
    raw = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    return out


def _extra_tensor(c: dict, tmp: Path) -> Path:
    from safetensors.torch import load_file, save_file

    out = _copy_ft(c, tmp, "extra-tensor")
    state = load_file(out / "model.safetensors")
    state["model.extra.weight"] = torch.zeros(4)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _as_mistral(c: dict, tmp: Path) -> Path:
    out = _copy_ft(c, tmp, "mistral")
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(architectures=["MistralForCausalLM"], model_type="mistral")
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def _gemma_pair(c: dict, tmp: Path) -> None:
    """A DFS run over two Gemma models: model.layers.N naming, but not a DFS family."""
    pair = []
    for name in ("gemma-a", "gemma-b"):
        out = _copy_ft(c, tmp, name)
        cfg = json.loads((out / "config.json").read_text())
        cfg.update(architectures=["GemmaForCausalLM"], model_type="gemma")
        (out / "config.json").write_text(json.dumps(cfg))
        pair.append(str(out))
    c["sources"] = [{"model": p} for p in pair]
    c["space"] = {"dfs": {"model_a": pair[0], "model_b": pair[1]}}


def _deep(path: str, value) -> Callable[[dict, Path], None]:
    def mutate(c: dict, tmp: Path) -> None:
        *parents, last = path.split(".")
        node = c
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return mutate


# id -> (mutation, text the error line must contain)
CASES: dict[str, tuple[Callable[[dict, Path], None], str]] = {
    # settings (config load)
    "output-dtype": (_deep("output.dtype", "banana"), "output.dtype: unknown dtype 'banana'; use one of"),
    "runtime-dtype": (_deep("runtime.dtype", "banana"), "runtime.dtype: unknown dtype 'banana'"),
    "runtime-device-tpu": (_deep("runtime.device", "tpu"), "runtime.device: 'tpu' is not supported; use cpu, cuda"),
    "fixed-normalize-maybe": (_deep("space.ps.fixed.normalize", "maybe"),
                              "space.ps.fixed: parameter 'normalize' must be true or false, got 'maybe'"),
    "fixed-lambda-text": (_deep("space.ps.fixed.lambda", "big"), "space.ps.fixed: parameter 'lambda' must be a number"),
    "publish-repo-id": (_deep("output.publish.repo_id", "not a repo"), "output.publish.repo_id: repo id 'not a repo'"),
    "publish-without-best": (lambda c, t: (_deep("output.publish.repo_id", "org/name")(c, t),
                                           _deep("output.materialise_best", False)(c, t)), "set materialise_best: true"),
    "publish-revision": (_deep("output.publish.revision", "bad..rev"), "output.publish.revision: 'bad..rev'"),
    "publish-license": (_deep("output.publish.license", "see README!"), "output.publish.license: 'see README!'"),
    "accuracy-options": (lambda c, t: c["fitness"].update(accuracy_scorer="exact_match", accuracy_options={"ignorecase": True}),
                         "fitness.accuracy_options: unknown option 'ignorecase'"),
    "storage-file-host": (_deep("storage", "file://relative/runs"), "storage: storage URL 'file://relative/runs'"),
    # sources: what `evomerge merge` checks, and what in-place merging needs
    "source-hidden-size": (_set_ft(lambda c, t: make_tiny_llama(t / "hidden-48", 5, hidden=48)), "has shape"),
    "source-mistral-llama-mix": (_set_ft(_as_mistral), "only models of one architecture can be merged"),
    "source-truncated": (_set_ft(_truncated), "is corrupted"),
    "source-extra-tensor": (_set_ft(_extra_tensor), "has tensor model.extra.weight that"),
    "source-pickle-only": (_set_ft(_pickle_only), "set allow_pickle: true on this source in the run config"),
    "layer-groups-too-many": (_deep("space.ps.granularity", {"layer_groups": 9}),
                              "space.ps.granularity.layer_groups: 9 groups for 2 layers; use at most 2"),
    "family-mixtral": (lambda c, t: c.update(sources=[{"model": str(c["_mixtral"]["base"]), "base": True},
                                                     {"model": str(c["_mixtral"]["ft"])}]),
                       "evolve cannot merge its candidates in place"),
    "family-dfs-gemma": (_gemma_pair, "which DFS does not support"),
}
if not torch.cuda.is_available():
    CASES["runtime-device-cuda-absent"] = (_deep("runtime.device", "cuda"), "runtime.device is 'cuda' but this machine has no CUDA GPU")


def _run(argv: list[str], capsys) -> tuple[int, str]:
    rc = main(argv)
    return rc, capsys.readouterr().err


def _write(tmp: Path, config: dict) -> str:
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in config.items() if not k.startswith("_")}, sort_keys=False))
    return str(path)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_run_fails_before_anything_is_written(case, family, mixtral, flow, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = {**_config(tmp_path, family), "_family": family, "_mixtral": mixtral}
    mutate, expected = CASES[case]
    mutate(config, tmp_path)
    capsys.readouterr()  # what building the bad inputs printed
    rc, err = _run(["evolve", _write(tmp_path, config)], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0], lines[0]
    assert rc == 2, err
    assert not flow.calls, "the flow started"
    assert not (tmp_path / "runs").exists(), "a run directory was written"
    if os.environ.get("EVOMERGE_MATRIX_LOG"):  # collects the observed lines for docs/reliability.md
        with open(os.environ["EVOMERGE_MATRIX_LOG"], "a", encoding="utf-8") as log:
            log.write(json.dumps({"case": case, "rc": rc, "error": lines[0].replace(str(tmp_path), "$TMP")}) + "\n")


def test_corrected_config_starts_without_no_resume(family, flow, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = _config(tmp_path, family)
    config["output"] = {"dtype": "banana"}
    rc, err = _run(["evolve", _write(tmp_path, config)], capsys)
    assert rc == 2 and "output.dtype" in err
    config["output"] = {"dtype": "bfloat16"}
    rc, err = _run(["evolve", _write(tmp_path, config)], capsys)
    assert rc == 0, err
    assert len(flow.calls) == 1 and flow.calls[0]["resume"] is True
    assert flow.calls[0]["config"]["output"]["dtype"] == "bfloat16"


def test_allow_pickle_key_works_as_its_error_says(family, flow, tmp_path, capsys, monkeypatch):
    from evomerge_core.config.schema import parse_run_config

    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "cache"))  # where the converted weights go
    config = {**_config(tmp_path, family), "_family": family}
    config["sources"][1]["model"] = str(_pickle_only(config, tmp_path))
    rc, err = _run(["evolve", _write(tmp_path, config)], capsys)
    assert rc == 2 and "set allow_pickle: true on this source" in err
    config["sources"][1]["allow_pickle"] = True
    rc, err = _run(["evolve", _write(tmp_path, config)], capsys)
    assert rc == 0, err
    assert flow.calls[0]["config"]["sources"][1]["allow_pickle"] is True
    assert list((tmp_path / "cache").glob("converted-*/model.safetensors"))
    # How weights are read does not change results: same config hash with or without the key.
    plain = {k: v for k, v in config.items() if not k.startswith("_")}
    without = json.loads(json.dumps(plain))
    del without["sources"][1]["allow_pickle"]
    assert parse_run_config(plain).config_hash() == parse_run_config(without).config_hash()


def test_relative_file_storage_resolves_against_the_current_directory(tmp_path, monkeypatch):
    from evomerge_core.runs.storage import parse_storage_url

    monkeypatch.chdir(tmp_path)
    assert parse_storage_url("file://./runs").root == str(tmp_path / "runs")
    assert parse_storage_url("file://../x").root == str(tmp_path.parent / "x")


EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_validates(path):
    """Config load (every setting) and the checks that need no download; the Hub ids are well formed."""
    from evomerge.flows.cmd_evolve import check_local_sources
    from evomerge_core.config.schema import load_run_config
    from evomerge_core.sources.resolve import HUB_ID_RE
    from evomerge_core.runs.storage import parse_storage_url

    config = load_run_config(path)
    parse_storage_url(config.storage)
    if path.name.startswith("toyworld"):
        return  # checked in full below, on a toy world copy
    check_local_sources(config)
    refs = [s.model for s in config.sources] + [s.get("model") for st in config.stages or [] for s in st.sources or []]
    assert refs and all(HUB_ID_RE.match(r) for r in refs if not r.startswith("@")), refs


def test_toyworld_example_passes_every_check_on_a_fresh_copy(flow, tmp_path, capsys, monkeypatch):
    """`evomerge toyworld` then `evomerge evolve examples/toyworld-ps.yaml`, as the example's
    header says: every check passes and the flow is started with the example's config."""
    monkeypatch.chdir(tmp_path)
    rc, err = _run(["toyworld"], capsys)
    assert rc == 0, err
    assert (tmp_path / "toyworld" / "models" / "base" / "config.json").is_file()
    rc, err = _run(["evolve", str(REPO / "examples" / "toyworld-ps.yaml")], capsys)
    assert rc == 0, err
    (call,) = flow.calls
    assert call["run_key"] == "toyworld-ps" and call["resume"] is True
    assert call["config"]["sources"][0]["model"] == "./toyworld/models/base"
    assert main(["toyworld"]) == 0  # a second call keeps the copy
    assert "is up to date" in capsys.readouterr().out


def test_toyworld_never_replaces_a_folder_that_is_not_its_copy(tmp_path, capsys):
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("x")
    rc = main(["toyworld", "--out", str(keep)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: --out ") and "not a toy-world copy" in err
    assert [p.name for p in keep.iterdir()] == ["notes.txt"]
