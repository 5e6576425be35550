"""`runtime.generation` reaches the evaluator: a candidate merged in place into the resident
model and scored with a generation scorer gets the same fitness and metrics on both paths, and
the engine path really ran the engine (on the resident model's own weights)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_models import make_tiny_family  # noqa: E402

from evomerge_core.config.schema import parse_run_config  # noqa: E402
from evomerge_core.generation.engine import _ENGINES  # noqa: E402
from evomerge_core.kinds.evaluate import CandidateEvaluator  # noqa: E402
from evomerge_core.kinds.cache import clear_model_cache  # noqa: E402


def test_engine_and_hf_score_a_candidate_alike(tmp_path):
    torch.set_num_threads(1)
    family = make_tiny_family(tmp_path / "zoo", n_finetunes=2, seed=3, noise=0.05)
    data = tmp_path / "d.jsonl"
    rows = [{"q": f"what is {a} plus {b}? ", "a": str(a + b)} for a, b in [(1, 2), (3, 4), (10, 5), (7, 7), (2, 9), (0, 6)]]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = {}
    for backend in ("hf", "engine"):
        cfg = parse_run_config({
            "sources": [{"model": str(family["base"]), "base": True}, {"model": str(family["ft1"])},
                        {"model": str(family["ft2"])}],
            "space": {"ps": {"method": "task_arithmetic", "params": ["weight"]}},
            "fitness": {"dataset": {"path": str(data), "columns": {"prompt": "q", "answer": "a"}},
                        "scorer": "exact_match", "accuracy_scorer": "none", "max_new_tokens": 6,
                        "stop_strings": ["?", " 1"], "batch_size": 4},
            "runtime": {"generation": backend},
        })
        clear_model_cache()
        evaluator = CandidateEvaluator(cfg, {s.model: s.model for s in cfg.sources})
        records[backend] = evaluator.evaluate([0.7, 0.4], generation=0, index=0)
        assert records[backend]["error"] is None
        used = _ENGINES.get(evaluator.resident.model)
        assert (used is not None and used.last_stats["generated_tokens"] > 0) == (backend == "engine")
    keep = ("fitness", "accuracy", "metrics", "n_items")
    assert {k: records["hf"][k] for k in keep} == {k: records["engine"][k] for k in keep}
