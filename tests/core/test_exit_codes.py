"""The one exit-code rule of every `evomerge` command (docs/reliability.md, "Exit codes"):
0 done, 2 bad input, 1 the environment or the work failed, 130 interrupted; every failure but an
internal error is exactly one `error:` line. Also: the license refusal of `publish` is one line
before the flow starts (it was a failed flow run's 74-line traceback)."""

from __future__ import annotations

import errno
import sys
import types
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_models import make_tiny_llama  # noqa: E402

import evomerge.flows.cmd_toyworld as cmd_toyworld  # noqa: E402
from evomerge.flows.cli import main  # noqa: E402
from evomerge.flows.prefect_api import PrefectAPIError  # noqa: E402
from evomerge.flows.runners import CandidateRunError  # noqa: E402
from evomerge_core.publish.card import CardError  # noqa: E402
from evomerge_core.errors import (ConfigError, EvomergeError, MergeError, SourceError, StorageError,  # noqa: E402
                                  StorageURLError, UsageError)
from evomerge_core.kinds.evaluate import CandidateOutOfMemory  # noqa: E402
from evomerge_core.publish.licenses import LicenseError  # noqa: E402
from evomerge_core.publish.hub import PublishError  # noqa: E402
from evomerge_core.runs.store import CorruptObjectError  # noqa: E402

BAD_INPUT, FAILED = 2, 1
RULE: dict[type[EvomergeError], int] = {
    UsageError: BAD_INPUT, ConfigError: BAD_INPUT, SourceError: BAD_INPUT, MergeError: BAD_INPUT,
    LicenseError: BAD_INPUT, StorageURLError: BAD_INPUT,
    StorageError: FAILED, CorruptObjectError: FAILED, PublishError: FAILED, CandidateOutOfMemory: FAILED,
    PrefectAPIError: FAILED, CandidateRunError: FAILED, CardError: FAILED,
}


def _raising(exc: BaseException):
    def run(args):
        raise exc
    return run


@pytest.mark.parametrize("cls", list(RULE), ids=lambda c: c.__name__)
def test_each_error_class_exits_by_the_rule_in_one_line(cls, monkeypatch, capsys):
    monkeypatch.setattr(cmd_toyworld, "run", _raising(cls("what is wrong; how to fix it")))
    rc = main(["toyworld"])
    err = capsys.readouterr().err
    assert rc == RULE[cls] == cls.exit_code
    assert err == "error: what is wrong; how to fix it\n"


def test_every_error_class_has_a_code_of_the_rule():
    def all_subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from all_subclasses(sub)

    assert {sub.exit_code for sub in all_subclasses(EvomergeError)} <= {BAD_INPUT, FAILED}


def test_is_bad_input_follows_the_rule():
    from evomerge_core.errors import is_bad_input

    assert all(is_bad_input(cls("x")) == (code == BAD_INPUT) for cls, code in RULE.items())
    assert not is_bad_input(ValueError("not ours"))


def test_disk_full_interrupt_and_usage(monkeypatch, capsys):
    monkeypatch.setattr(cmd_toyworld, "run", _raising(OSError(errno.ENOSPC, "No space left on device")))
    assert main(["toyworld"]) == FAILED
    assert capsys.readouterr().err.startswith("error: a write failed: No space left on device")
    monkeypatch.setattr(cmd_toyworld, "run", _raising(KeyboardInterrupt()))
    assert main(["toyworld"]) == 130
    with pytest.raises(SystemExit) as exit_info:  # argparse: a bad command line is bad input
        main(["toyworld", "--size", "huge"])
    assert exit_info.value.code == BAD_INPUT


def test_publish_license_refusal_is_one_line_before_the_flow(tmp_path, monkeypatch, capsys):
    import evomerge.flows.prefect_api as prefect_api

    def refuse(*args, **kwargs):
        raise AssertionError("the publish flow started")

    module = types.ModuleType("evomerge.flows.publish")
    module.publish = refuse
    monkeypatch.setitem(sys.modules, "evomerge.flows.publish", module)
    monkeypatch.setattr(prefect_api, "check_api", lambda: None)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    sources = {}
    for name, lic in (("nc-src", "cc-by-nc-4.0"), ("mit-src", "mit")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "README.md").write_text(f"---\nlicense: {lic}\n---\n")
        sources[name] = str(tmp_path / name)
    model = make_tiny_llama(tmp_path / "merged", 0)
    (model / "recipe.yaml").write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": sources["nc-src"], "parameters": {"weight": 0.5}},
        {"model": sources["mit-src"], "parameters": {"weight": 0.5}}]}, sort_keys=False))
    capsys.readouterr()
    rc = main(["publish", str(model), "--repo-id", "org/merged", "--dry-run", str(tmp_path / "dry")])
    err = capsys.readouterr().err
    assert rc == BAD_INPUT, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: the sources' licenses conflict"), err
    assert "--license SPDX-ID" in lines[0] and "--force-license" in lines[0]
    assert not (tmp_path / "dry").exists()
