"""Bad-input matrix: every case goes through the CLI in process (`evomerge.flows.cli.main`) and
must give exactly one `error: ...` line on stderr (no traceback), the expected exit code (2 for
usage, config and source errors) and nothing half-written (the output / run dir does not exist
or is unchanged). `evolve` and `publish` cases must fail before any Prefect flow starts: the
flow modules are replaced by stubs that fail the test if called (and keep Prefect unimported).

The table (case id, expected exit code, expected text) is listed in docs/reliability.md
("Bad input matrix"); keep both in sync.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hubstub import HubStub  # noqa: E402
from tiny_models import make_tiny_family, make_tiny_llama  # noqa: E402

from evomerge.flows.cli import main  # noqa: E402

torch.set_num_threads(1)
pytestmark = pytest.mark.timeout(120)

STUB_TOKEN = "hf_matrixwritetoken0123456789"


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_tiny_family(tmp_path_factory.mktemp("matrix-family"), n_finetunes=1)


@pytest.fixture(scope="module")
def hub(family):
    """The local Hub stand-in with one private model repo (needs a token to be seen)."""
    stub = HubStub(write_tokens=(STUB_TOKEN,)).start()
    from huggingface_hub import HfApi

    api = HfApi(endpoint=stub.url, token=STUB_TOKEN)
    api.create_repo("stub-org/private-model", private=True)
    api.upload_folder(repo_id="stub-org/private-model", folder_path=str(family["ft1"]))
    yield stub
    stub.stop()


@dataclass
class Ctx:
    tmp: Path
    family: dict[str, Path]
    out: Path  # the path that must not appear (or stay unchanged)
    monkeypatch: pytest.MonkeyPatch


def _tree(folder: Path) -> dict[str, str]:
    if not folder.exists():
        return {}
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _yaml(path: Path, data) -> str:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return str(path)


# ----------------------------------------------------------------------------- merge helpers


def _recipe(c: Ctx, **over) -> dict:
    cfg = {
        "merge_method": "ties",
        "base_model": str(c.family["base"]),
        "models": [{"model": str(c.family["ft1"]), "parameters": {"weight": 0.6, "density": 0.5}}],
        "dtype": "float32",
    }
    cfg.update(over)
    return cfg


def _merge(c: Ctx, cfg, *extra: str) -> list[str]:
    c.out = c.tmp / "merged"
    return ["merge", _yaml(c.tmp / "merge.yaml", cfg), str(c.out), "--no-progress", *extra]


def _with_model(c: Ctx, model: str | Path) -> list[str]:
    cfg = _recipe(c)
    cfg["models"][0]["model"] = str(model)
    return _merge(c, cfg)


def _pickle_only(c: Ctx) -> Path:
    from safetensors.torch import load_file

    bad = c.tmp / "pickle-only"
    shutil.copytree(c.family["ft1"], bad)
    torch.save(load_file(bad / "model.safetensors"), bad / "pytorch_model.bin")
    (bad / "model.safetensors").unlink()
    return bad


def _corrupt(c: Ctx, mode: str) -> Path:
    bad = c.tmp / f"corrupt-{mode}"
    shutil.copytree(c.family["ft1"], bad)
    path = bad / "model.safetensors"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2] if mode == "truncated" else b"\xff" * 8 + raw[8:])
    return bad


def _other_layers(c: Ctx) -> Path:
    return make_tiny_llama(c.tmp / "three-layers", 5, layers=3, tokenizer=False)


def _hub_private(c: Ctx, hub: HubStub) -> list[str]:
    import huggingface_hub.constants as hf_constants

    c.monkeypatch.delenv("HF_TOKEN", raising=False)
    c.monkeypatch.setenv("HF_HOME", str(c.tmp / "hf-home"))
    c.monkeypatch.setattr(hf_constants, "ENDPOINT", hub.url)
    c.monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    c.monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    cfg = _recipe(c)
    cfg["models"][0]["model"] = "stub-org/private-model"
    return _merge(c, cfg, "--cache-dir", str(c.tmp / "cache"))


def _offline(c: Ctx, ref: str) -> list[str]:
    import huggingface_hub.constants as hf_constants

    c.monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    c.monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    cfg = _recipe(c)
    cfg["models"][0]["model"] = ref
    return _merge(c, cfg, "--cache-dir", str(c.tmp / "cache"))


# ----------------------------------------------------------------------------- evolve helpers


def _dataset(c: Ctx, text: str | None = None) -> Path:
    path = c.tmp / "train.jsonl"
    if text is None:
        text = "\n".join(json.dumps({"question": f"what is {i} plus 1? ", "target": str(i + 1)}) for i in range(4)) + "\n"
    path.write_text(text)
    return path


def _run_config(c: Ctx, **over) -> dict:
    config = {
        # Sources that do not exist: the checks must stop before anything reaches them.
        "sources": [{"model": str(c.tmp / "no-base"), "base": True}, {"model": str(c.tmp / "no-ft1")}],
        "storage": f"file://{c.tmp / 'runs'}",
        "optimizer": {"popsize": 3, "seed": 3, "generations": 2},
        "fitness": {
            "dataset": {"path": str(_dataset(c)), "columns": {"prompt": "question", "answer": "target"}},
            "scorer": "math_accuracy",
            "max_new_tokens": 3,
        },
    }
    config.update(over)
    return config


def _evolve(c: Ctx, mutate: Callable[[dict], None] | None = None, *extra: str, raw: str | None = None) -> list[str]:
    c.out = c.tmp / "runs"
    config = _run_config(c)
    if mutate is not None:
        mutate(config)
    return ["evolve", _yaml(c.tmp / "run.yaml", raw if raw is not None else config), *extra]


def _set(path: str, value) -> Callable[[dict], None]:
    def mutate(config: dict) -> None:
        *parents, last = path.split(".")
        node = config
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return mutate


def _drop(path: str) -> Callable[[dict], None]:
    def mutate(config: dict) -> None:
        *parents, last = path.split(".")
        node = config
        for key in parents:
            node = node[key]
        del node[last]
    return mutate


def _rows(c: Ctx, text: str) -> Callable[[dict], None]:
    return lambda config: config["fitness"]["dataset"].update(path=str(_dataset(c, text)))


def _unwritable_storage(c: Ctx) -> list[str]:
    blocker = c.tmp / "a-file"
    blocker.write_text("not a directory")
    c.out = blocker
    config = _run_config(c, storage=f"file://{blocker}/runs",
                         sources=[{"model": str(c.family["base"]), "base": True}, {"model": str(c.family["ft1"])}])
    return ["evolve", _yaml(c.tmp / "run.yaml", config)]


# ----------------------------------------------------------------------------- publish helpers


def _publish(c: Ctx, model_dir: Path | str | None = None, *extra: str) -> list[str]:
    c.monkeypatch.setenv("HF_HOME", str(c.tmp / "hf-home"))
    c.monkeypatch.setenv("HF_TOKEN", STUB_TOKEN)
    c.out = c.tmp / "dry"
    return ["publish", str(model_dir or c.family["ft1"]), "--repo-id", "stub-org/x", "--dry-run", str(c.out), *extra]


def _publish_no_token(c: Ctx) -> list[str]:
    argv = _publish(c)
    c.monkeypatch.delenv("HF_TOKEN")
    c.out = c.tmp / "nothing"
    return argv[: argv.index("--dry-run")]


def _publish_busy_dry_run(c: Ctx) -> list[str]:
    argv = _publish(c)
    c.out.mkdir()
    (c.out / "keep.txt").write_text("x")
    return argv


def _no_tokenizer(c: Ctx) -> Path:
    bad = c.tmp / "no-tokenizer"
    shutil.copytree(c.family["ft1"], bad)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bad / name).unlink()
    return bad


# ----------------------------------------------------------------------------- the table

# id -> (argv builder, exit code, text the error line must contain)
CASES: dict[str, tuple[Callable[..., list[str]], int, str]] = {
    # config: run config of `evomerge evolve`
    "config-typo-key": (lambda c: _evolve(c, _set("fitness.scorre", "x")), 2, "did you mean 'scorer'"),
    "config-typo-section": (lambda c: _evolve(c, lambda d: d.update(optimiser=d.pop("optimizer"))), 2, "did you mean 'optimizer'"),
    "config-wrong-type": (lambda c: _evolve(c, _set("optimizer.popsize", "four")), 2, "optimizer.popsize"),
    "config-out-of-range": (lambda c: _evolve(c, _set("optimizer.popsize", 1)), 2, "optimizer.popsize"),
    "config-negative": (lambda c: _evolve(c, _set("fitness.max_new_tokens", -5)), 2, "fitness.max_new_tokens"),
    "config-bounds-range": (lambda c: _evolve(c, _set("space", {"ps": {"method": "ties", "bounds": {"density": [0.0, 1.5]}}})),
                            2, "leaves the valid range"),
    "config-method-typo": (lambda c: _evolve(c, _set("space", {"ps": {"method": "dare_tie"}})), 2, "did you mean 'dare_ties'"),
    "config-scorer-typo": (lambda c: _evolve(c, _set("fitness.scorer", "math_acuracy")), 2, "unknown scorer 'math_acuracy'"),
    "config-no-base": (lambda c: _evolve(c, lambda d: d["sources"][0].pop("base")), 2, "needs a base model"),
    "config-not-yaml": (lambda c: _evolve(c, raw="sources: [\n  - {model: x\n"), 2, "is not valid YAML"),
    "config-not-mapping": (lambda c: _evolve(c, raw="- just\n- a list\n"), 2, "must be a YAML mapping"),
    "config-missing-file": (lambda c: ["evolve", str(c.tmp / "nope.yaml")], 2, "does not exist"),
    "config-bad-run-key": (lambda c: _evolve(c, None, "--run-key", "../escape"), 2, "run_key"),
    # sources
    "source-evolve-missing-dir": (lambda c: _evolve(c), 2, "is not an existing directory or a Hub id"),
    "source-missing-dir": (lambda c: _with_model(c, c.tmp / "does-not-exist"), 2, "not an existing directory"),
    "source-hub-offline": (lambda c: _offline(c, "no-such-org/no-such-model"), 2, "cannot download no-such-org/no-such-model"),
    "source-revision-offline": (lambda c: _offline(c, "no-such-org/no-such-model@v9"), 2, "cannot download no-such-org/no-such-model@v9"),
    "source-malformed-id": (lambda c: _with_model(c, "not a/valid id!"), 2, "not an existing directory, an fsspec URL or a Hub id"),
    "source-private-no-token": (None, 2, "cannot download stub-org/private-model"),  # built by _hub_private
    "source-pickle-only": (lambda c: _with_model(c, _pickle_only(c)), 2, "pass --allow-pickle"),
    "source-truncated-safetensors": (lambda c: _with_model(c, _corrupt(c, "truncated")), 2, "corrupted"),
    "source-garbage-header": (lambda c: _with_model(c, _corrupt(c, "header")), 2, "safetensors"),
    "source-other-depth": (lambda c: _with_model(c, _other_layers(c)), 2, "layers"),
    "source-bad-param-type": (lambda c: _merge(c, _recipe(c, models=[{"model": str(c.family["ft1"]), "parameters": {"weight": "heavy"}}])),
                              2, "weight"),
    "source-bad-dtype": (lambda c: _merge(c, _recipe(c), "--dtype", "int3"), 2, "unknown dtype"),
    "source-method-typo": (lambda c: _merge(c, _recipe(c, merge_method="tie")), 2, "did you mean 'ties'"),
    # datasets (fitness data of `evomerge evolve`)
    "data-missing-file": (lambda c: _evolve(c, _set("fitness.dataset.path", str(c.tmp / "nope.jsonl"))), 2, "does not exist"),
    "data-empty": (lambda c: _evolve(c, _rows(c, "")), 2, "has no rows"),
    "data-missing-column": (lambda c: _evolve(c, _set("fitness.dataset.columns", {"prompt": "question", "answer": "solution"})),
                            2, "columns.answer"),
    "data-malformed-row": (lambda c: _evolve(c, _rows(c, '{"question": "1+1? ", "target": "2"}\n{"question": \n')), 2, "JSON parse error"),
    "data-null-answer": (lambda c: _evolve(c, _rows(c, '{"question": "1+1? ", "target": null}\n')), 2, "no value (null) for 'answer'"),
    "data-hub-offline": (lambda c: (c.monkeypatch.setenv("HF_HUB_OFFLINE", "1"),
                                    _evolve(c, _set("fitness.dataset.path", "no-such-org/no-such-dataset")))[1], 2, "no-such-org/no-such-dataset"),
    # storage
    "storage-bad-scheme": (lambda c: _evolve(c, None, "--storage", "ftp://host/runs"), 2, "is not supported"),
    "storage-unwritable": (_unwritable_storage, 1, "a-file"),
    # output (merge) and publish
    "output-under-a-file": (lambda c: (c.tmp.joinpath("blocker").write_text("x"), setattr(c, "out", c.tmp / "blocker"),
                                       ["merge", _yaml(c.tmp / "m.yaml", _recipe(c)), str(c.tmp / "blocker" / "out"), "--no-progress"])[2],
                            2, "is not a directory"),
    "publish-bad-repo-id": (lambda c: [a if a != "stub-org/x" else "not a repo" for a in _publish(c)], 2, "malformed; use ORG/NAME"),
    "publish-missing-dir": (lambda c: _publish(c, c.tmp / "missing"), 2, "does not exist"),
    "publish-no-tokenizer": (lambda c: _publish(c, _no_tokenizer(c)), 2, "no tokenizer files"),
    "publish-bad-shard-size": (lambda c: _publish(c, None, "--shard-size", "0"), 2, "--shard-size must be positive"),
    "publish-busy-dry-run": (_publish_busy_dry_run, 2, "is not an empty directory"),
    "publish-no-token": (_publish_no_token, 1, "no Hugging Face token"),
    "publish-bad-run-url": (lambda c: _publish(c, None, "--run", "ftp://host/runs/x"), 2, "unsupported scheme 'ftp'"),
}


def _stub_flow_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a Prefect flow was started for bad input")

    for name, attr in (("evomerge.flows.evolve", "evolve"), ("evomerge.flows.publish", "publish")):
        module = types.ModuleType(name)
        setattr(module, attr, refuse)
        monkeypatch.setitem(sys.modules, name, module)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, family, tmp_path, monkeypatch, capsys, request):
    import evomerge_core.kinds.resident as resident

    def no_models(*args, **kwargs):
        raise AssertionError("a model was loaded for bad input")

    monkeypatch.setattr(resident.ResidentModel, "__init__", no_models)
    # Library loggers (datasets) keep the stderr of the test that first configured them; point
    # them at this test's captured stderr so their lines are checked like a real run's.
    import logging

    for handler in logging.getLogger("datasets").handlers:
        if isinstance(handler, logging.StreamHandler):
            monkeypatch.setattr(handler, "stream", sys.stderr)
    _stub_flow_modules(monkeypatch)
    monkeypatch.chdir(tmp_path)
    ctx = Ctx(tmp_path, family, tmp_path / "unset", monkeypatch)
    build, code, expected = CASES[case]
    argv = _hub_private(ctx, request.getfixturevalue("hub")) if build is None else build(ctx)
    before = _tree(ctx.out)
    existed = ctx.out.exists()
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert "Traceback" not in err, err
    assert len(errors) == 1, err
    assert rc == code, err
    assert expected in errors[0], errors[0]
    assert ctx.out.exists() == existed and _tree(ctx.out) == before, f"{ctx.out} was written"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".part-" in p.name]
    if os.environ.get("EVOMERGE_MATRIX_LOG"):  # collects the observed lines for docs/reliability.md
        with open(os.environ["EVOMERGE_MATRIX_LOG"], "a", encoding="utf-8") as log:
            log.write(json.dumps({"case": case, "rc": rc, "error": errors[0].replace(str(tmp_path), "$TMP")}) + "\n")

