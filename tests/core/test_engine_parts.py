"""The generation engine's parts: stop automata across token boundaries, the length-history
scheduler, the backend choice (``runtime.generation``), and source streaming off CUDA."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests_engine_helpers import tiny_llama  # noqa: E402

from evomerge_core.config.schema import RuntimeConfig  # noqa: E402
from evomerge_core.generation.engine import choose_backend, generation_backend, unsupported_reason  # noqa: E402
from evomerge_core.generation.engine.scheduler import LengthHistory  # noqa: E402
from evomerge_core.generation.engine.stops import StopDetector  # noqa: E402
from evomerge_core.generation.engine.streaming import stream_sources  # noqa: E402


class _Tok:
    """A tokenizer whose token i decodes to TEXTS[i]."""

    TEXTS = ["", "xa", "b", "ab", "q", "\n", "a"]

    def __len__(self) -> int:
        return len(self.TEXTS)

    def batch_decode(self, ids, skip_special_tokens=True):
        return [self.TEXTS[i[0]] for i in ids]


def _run(detector, seq):
    state = detector.initial_state(1, torch.device("cpu"))
    flags = []
    for t in seq:
        eos, flagged, state = detector.step(torch.tensor([t]), state)
        flags.append((bool(eos), bool(flagged)))
    return flags


def test_stop_automaton_spans_token_boundaries():
    det = StopDetector(_Tok(), ["ab", "\n"], vocab=8, eos_ids=[4], device=torch.device("cpu"))
    # "xa" + "b" completes "ab" at the second token; "a","a","b" completes it at the third.
    assert [f for _, f in _run(det, [1, 2])] == [False, True]
    assert [f for _, f in _run(det, [6, 6, 2])] == [False, False, True]
    assert [f for _, f in _run(det, [2, 6, 4])] == [False, False, False]
    assert _run(det, [2, 6, 4])[-1][0] is True  # EOS
    assert _run(det, [5])[0][1] is True  # one-token stop
    assert _run(det, [3])[0][1] is True  # the whole string inside one token
    assert det.confirm("xx ab") and not det.confirm("a b")


def test_scheduler_longest_expected_first():
    hist = LengthHistory()
    prompts = ["p0", "p1", "p2", "p3"]
    assert hist.order(prompts, [1, 5, 3, 2], [9] * 4) == [1, 2, 3, 0]  # unseen: longer prompts first
    for p, n in zip(prompts, [4, 1, 8, 6]):
        hist.record(p, n)
    assert hist.order(prompts, [1, 5, 3, 2], [9] * 4) == [2, 3, 0, 1]
    assert hist.order(prompts, [1, 5, 3, 2], [9, 9, 2, 9]) == [3, 0, 2, 1]  # expected length capped by the cap
    hist.record("p4", 3)  # unseen prompts still go first
    assert hist.order(["new", "p2"], [1, 1], [9, 9]) == [0, 1]


def test_runtime_generation_key():
    assert RuntimeConfig().generation == "auto"
    assert "generation" not in RuntimeConfig().model_dump()  # default configs hash as before
    assert RuntimeConfig(generation="engine").model_dump()["generation"] == "engine"
    with pytest.raises(ValueError, match="generation"):
        RuntimeConfig(generation="vllm")


def test_backend_choice_on_cpu():
    model = tiny_llama()
    assert unsupported_reason(model) is None
    assert choose_backend(None, model) == "hf"  # auto: the reference loop off CUDA
    assert choose_backend("engine", model) == "engine"
    with generation_backend("engine"):
        assert choose_backend(None, model) == "engine"
    assert choose_backend(None, model) == "hf"
    with pytest.raises(ValueError, match="generation backend"):
        choose_backend("fast", model)
    model.config._attn_implementation = "flash_attention_2"
    assert "flash_attention_2" in unsupported_reason(model)
    assert choose_backend("auto", model) == "hf"
    with pytest.raises(ValueError, match="runtime.generation is 'engine'"):
        choose_backend("engine", model)


def test_stream_sources_off_cuda_hands_tensors_over_in_order():
    sds = {"a": {"w": torch.ones(2), "b": torch.zeros(1)}, "c": {"w": torch.full((2,), 2.0), "b": torch.ones(1)}}
    got = list(stream_sources(sds, ["b", "w"], torch.device("cpu")))
    assert [n for n, _ in got] == ["b", "w"]
    assert got[1][1]["c"] is sds["c"]["w"]


def test_environment_overrides_auto(monkeypatch):
    model = tiny_llama()
    monkeypatch.setenv("EVOMERGE_GENERATION", "engine")
    assert choose_backend(None, model) == "engine"
    assert choose_backend("hf", model) == "hf"  # an explicit choice wins
    monkeypatch.setenv("EVOMERGE_GENERATION", "turbo")
    with pytest.raises(ValueError, match="EVOMERGE_GENERATION"):
        choose_backend(None, model)
