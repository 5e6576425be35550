"""The run kinds (issue 20): one registry holds llm / vlm / dfs, `run_kind` is the one place that
picks a config's kind, and one worker-side cache holds at most one resident model, shared by all
kinds and the evaluator; the run-kind example of docs/architecture.md runs."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

import evomerge_core.kinds.base as kinds_base
import evomerge_core.kinds.dfs_model as dfs_model
import evomerge_core.kinds.resident as resident
import evomerge_core.kinds.vlm as vlm
from evomerge_core.config.schema import parse_run_config
from evomerge_core.errors import ConfigError, SourceError
from evomerge_core.kinds import RUN_KINDS, run_kind
from evomerge_core.kinds.cache import CACHE, EVALUATOR, MODEL, WorkerCache, cached_model, clear_model_cache
from evomerge_core.kinds.dfs import DFSKind
from evomerge_core.kinds.llm import LLMKind
from evomerge_core.kinds.vlm import VLMKind

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from doc_examples import registered_by_doc_example  # noqa: E402
from tiny_models import make_tiny_llama  # noqa: E402

FITNESS = {"dataset": {"path": "org/data"}, "scorer": "logprob"}
PS = {"sources": [{"model": "org/base", "base": True}, {"model": "org/x"}], "fitness": FITNESS}
VLM = {"sources": [{"model": "./vlm", "vlm": True, "base": True}, {"model": "./llm"}], "fitness": FITNESS}
DFS = {"sources": [{"model": "org/a"}, {"model": "org/b"}], "space": {"dfs": {"model_a": "org/a", "model_b": "org/b"}},
       "fitness": FITNESS}
CHAIN = {"sources": [{"model": "org/base", "base": True}, {"model": "org/x"}, {"model": "org/y"}], "fitness": FITNESS,
         "stages": [{"name": "ps", "space": {"ps": {"method": "dare_ties"}}},
                    {"name": "dfs", "space": {"dfs": {"model_a": "@ps", "model_b": "org/y"}}}]}


def test_the_registry_holds_the_three_kinds():
    assert RUN_KINDS.names() == ["dfs", "llm", "vlm"]
    assert all(RUN_KINDS.get(name).name == name for name in RUN_KINDS.names())
    with pytest.raises(ConfigError, match="unknown run kind 'dsf'; did you mean 'dfs'"):
        RUN_KINDS.get("dsf")


@pytest.mark.parametrize("raw, kind", [(PS, LLMKind), (VLM, VLMKind), (DFS, DFSKind)])
def test_run_kind_picks_the_kind_of_a_config(raw, kind):
    assert type(run_kind(parse_run_config(raw))) is kind


def test_a_chained_run_has_the_kind_of_each_stage():
    config = parse_run_config(CHAIN)
    assert [run_kind(config.stage_config(i)).name for i in range(2)] == ["llm", "dfs"]


@pytest.mark.parametrize("raw, allowed", [(PS, True), (VLM, False), (DFS, False)])
def test_scoring_sources_alone_is_refused_outside_llm_runs(raw, allowed):
    budget = {"subset": {"size": 1, "include_sources": True}}
    raw = {**raw, "fitness": {**FITNESS, "budget": budget}}
    if allowed:
        assert parse_run_config(raw).fitness.budget.subset.include_sources
    else:
        with pytest.raises(ConfigError, match="include_sources scores each source model alone"):
            parse_run_config(raw)


def test_the_cache_keeps_one_entry_and_drops_it_before_loading_the_next():
    cache = WorkerCache((MODEL, EVALUATOR))
    held_during_load: list[object] = []

    def load(name: str) -> object:
        held_during_load.append(cache.held(MODEL))
        return {"model": name}

    first = cache.get(MODEL, "a", lambda: load("a"))
    assert cache.get(MODEL, "a", lambda: load("again")) is first  # a hit loads nothing
    second = cache.get(MODEL, "b", lambda: load("b"))
    assert second == {"model": "b"} and cache.held(MODEL) is second
    assert held_during_load == [None, None]  # the old model was dropped before the new one loaded


def test_a_new_model_drops_the_evaluator_that_wraps_the_old_one():
    cache = WorkerCache((MODEL, EVALUATOR))
    model = cache.get(MODEL, "m1", object)
    evaluator = cache.get(EVALUATOR, "e1", lambda: ("evaluator", model))
    assert cache.get(EVALUATOR, "e1", object) is evaluator and cache.held(MODEL) is model
    cache.get(EVALUATOR, "e2", object)  # a new evaluator keeps the model (it may wrap it again)
    assert cache.held(MODEL) is model
    cache.get(MODEL, "m2", object)
    assert cache.held(EVALUATOR) is None
    cache.clear()
    assert cache.held(MODEL) is None
    with pytest.raises(ValueError, match="unknown cache slot"):
        cache.get("tokenizer", "k", object)


def test_concurrent_threads_load_a_model_once():
    cache = WorkerCache((MODEL,))
    loads: list[int] = []
    barrier = threading.Barrier(4)

    def load() -> object:
        loads.append(1)
        return object()

    got: list[object] = []

    def worker() -> None:
        barrier.wait()
        got.append(cache.get(MODEL, "k", load))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(loads) == 1 and len({id(g) for g in got}) == 1


def test_every_kind_s_resident_model_lives_in_the_one_cache(monkeypatch):
    """LLM, VLM and DFS models share one slot: loading one kind's model evicts another's."""
    built: list[str] = []

    def fake(kind: str):
        def make(*args, **kwargs) -> object:
            built.append(kind)
            return object()
        return make

    monkeypatch.setattr(resident, "ResidentModel", fake("llm"))
    monkeypatch.setattr(vlm, "ResidentVLM", fake("vlm"))
    monkeypatch.setattr(dfs_model.DataflowModel, "from_pretrained", fake("dfs"))
    clear_model_cache()
    try:
        llm_model = resident.get_resident({"a": "/a", "b": "/b"}, reference="a", num_layers=2)
        assert resident.get_resident({"b": "/b", "a": "/a"}, reference="a", num_layers=2) is llm_model
        assert CACHE.held(MODEL) is llm_model
        vlm_model = vlm.get_resident_vlm({"v": "/v", "a": "/a"}, vlm="v", num_layers=2)
        assert CACHE.held(MODEL) is vlm_model
        dfs_m = dfs_model.get_dataflow_model("/a", "/b")
        assert CACHE.held(MODEL) is dfs_m and dfs_model.get_dataflow_model("/a", "/b") is dfs_m
        assert resident.get_resident({"a": "/a", "b": "/b"}, reference="a", num_layers=2) is not llm_model
        assert built == ["llm", "vlm", "dfs", "llm"]
        assert cached_model(("llm", "other"), object) is not None and built == ["llm", "vlm", "dfs", "llm"]
    finally:
        clear_model_cache()


@pytest.fixture
def documented_kind():
    """docs/architecture.md's run-kind example, registered (and removed afterwards)."""
    with registered_by_doc_example("architecture.md", "RUN_KINDS.add", RUN_KINDS) as added:
        assert added == {"shallow_llm"}
        yield RUN_KINDS.get("shallow_llm")


def test_the_documented_run_kind_is_picked_and_checks_its_sources(documented_kind, tmp_path, monkeypatch):
    deep = make_tiny_llama(tmp_path / "deep", seed=0, layers=6)
    shallow = make_tiny_llama(tmp_path / "shallow", seed=1, layers=2)
    paths = {str(deep): str(deep), str(shallow): str(shallow)}

    def config_with_base(base, other):
        return parse_run_config({"sources": [{"model": str(base), "base": True}, {"model": str(other)}], "fitness": FITNESS})

    monkeypatch.setattr(kinds_base, "kind_name", lambda config: "shallow_llm")  # the config key a real kind would add
    assert run_kind(config_with_base(shallow, deep)) is documented_kind
    documented_kind.check_resolved(config_with_base(shallow, deep), paths)
    with pytest.raises(SourceError, match="at most 4 layers"):
        documented_kind.check_resolved(config_with_base(deep, shallow), paths)
