"""Supply-chain guards: weights load from safetensors only (pickle `.bin` needs an explicit
`--allow-pickle`, or `allow_pickle: true` on an evolve source, and is then read with `weights_only=True`), no `trust_remote_code` anywhere,
and nothing in the code unpickles data it did not write with a restricted unpickler.

The run store's side (a pickled payload planted in the store is refused, never executed) is
`tests/core/test_runstore.py::test_loading_never_unpickles`; the plain refusal of pickle-only
sources and their conversion is `tests/core/test_sources.py::test_pickle_weights_refused_unless_opted_in`.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_models import make_tiny_llama  # noqa: E402

from evomerge_core.errors import SourceError  # noqa: E402
from evomerge_core.sources.resolve import PICKLE_PATTERNS, resolve_source  # noqa: E402

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[2]
CODE_DIRS = ("evomerge_core", "tasks", "flows")


def _code() -> dict[str, str]:
    files = {p.relative_to(REPO).as_posix(): p.read_text(encoding="utf-8")
             for d in CODE_DIRS for p in sorted((REPO / d).rglob("*.py"))}
    assert len(files) > 20, "the code directories were not found"
    return files


def test_no_trust_remote_code_anywhere():
    # No source may opt in today, so the flag must not appear with any value but False.
    hits = [f"{name}:{text.count('trust_remote_code')}" for name, text in _code().items()
            if re.search(r"trust_remote_code\s*=\s*(?!False\b)", text) or re.search(r"[\"']trust_remote_code[\"']\s*:\s*True", text)]
    assert hits == [], f"trust_remote_code is enabled in {hits}"


def test_every_torch_load_is_weights_only():
    calls = [(name, m.group(0)) for name, text in _code().items()
             for m in re.finditer(r"torch\.load\([^)]*\)", text)]
    assert calls, "expected the pickle converter's torch.load call"
    unsafe = [c for c in calls if "weights_only=True" not in c[1]]
    assert unsafe == [], f"torch.load without weights_only=True: {unsafe}"


def test_pickle_is_only_read_by_the_restricted_unpickler():
    readers = {name for name, text in _code().items()
               if re.search(r"\bpickle\.(load|loads|Unpickler)\b|\bdill\b|\bcloudpickle\.load|joblib\.load", text)}
    assert readers == {"evomerge_core/optim/cmaes.py"}, readers
    assert "class _RestrictedUnpickler(pickle.Unpickler)" in _code()["evomerge_core/optim/cmaes.py"]


def test_hub_downloads_skip_pickle_weights_unless_allowed(monkeypatch, tmp_path):
    import huggingface_hub

    seen: list[list[str]] = []

    def fake_snapshot(repo_id, **kwargs):
        seen.append(kwargs["allow_patterns"])
        raise RuntimeError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    for allow in (False, True):
        with pytest.raises(SourceError):
            resolve_source("org/model", allow_pickle=allow, cache_dir=tmp_path)
    assert not set(PICKLE_PATTERNS) & set(seen[0])
    assert set(PICKLE_PATTERNS) <= set(seen[1])


def test_allowed_pickle_with_code_is_refused_and_not_run(tmp_path):
    model = make_tiny_llama(tmp_path / "src", 1, tokenizer=False)
    bad = tmp_path / "exploit"
    shutil.copytree(model, bad)
    (bad / "model.safetensors").unlink()
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"model.norm.weight": Exploit()}, bad / "pytorch_model.bin")
    with pytest.raises(SourceError, match="--allow-pickle"):
        resolve_source(str(bad), cache_dir=tmp_path / "cache")
    with pytest.raises(SourceError, match="safely"):
        resolve_source(str(bad), allow_pickle=True, cache_dir=tmp_path / "cache")
    assert not marker.exists()


def test_evolve_sources_allow_pickle_only_when_the_source_says_so():
    # The evolve / DFS / VLM runs resolve sources with each source's own opt-in
    # (`sources[].allow_pickle`, default false); `evomerge merge` with --allow-pickle.
    from evomerge_core.config.schema import SourceSpec

    calls = [(name, m.group(0)) for name, text in _code().items() for m in re.finditer(r"resolve_source\([^)]*\)", text)
             if name != "evomerge_core/sources/resolve.py"]
    assert calls
    for name, call in calls:
        assert "allow_pickle=True" not in call, (name, call)
        if name != "flows/cmd_merge.py":
            assert "allow_pickle" not in call, (name, call)
    assert "allow_pickle=args.allow_pickle" in _code()["flows/cmd_merge.py"]
    assert "allow_pickle=spec.allow_pickle" in _code()["evomerge_core/sources/resolve.py"]
    assert SourceSpec(model="org/name").allow_pickle is False
