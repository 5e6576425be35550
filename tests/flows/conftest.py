"""Flow tests: one Prefect test harness (temporary API server) per session, with PREFECT_HOME
in a temporary directory; tiny source models built once per session."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (tiny_models)
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/flows (user scorers)

# Set before Prefect is first imported (it reads PREFECT_HOME when its settings load).
_OLD_ENV = {k: os.environ.get(k) for k in ("PREFECT_HOME", "PREFECT_SERVER_ANALYTICS_ENABLED")}
_PREFECT_HOME = tempfile.mkdtemp(prefix="evomerge-prefect-home-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"


@pytest.fixture(scope="session", autouse=True)
def prefect_harness():
    """Session-scoped Prefect API for every flow test (PREFECT_HOME in a temp dir)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
    for key, value in _OLD_ENV.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    shutil.rmtree(_PREFECT_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama base and two fine-tunes of it (seconds to build)."""
    import torch

    from tiny_models import make_tiny_family

    torch.set_num_threads(1)
    return make_tiny_family(tmp_path_factory.mktemp("tiny-family"), n_finetunes=2, seed=0, noise=0.02)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> dict[str, Path]:
    """Train/test jsonl files with prompt/answer columns the tiny tokenizer can encode."""
    root = tmp_path_factory.mktemp("tiny-data")
    out = {}
    for split, offset in (("train", 0), ("test", 50)):
        rows = [{"question": f"what is {i + offset} plus 1? ", "target": str(i + offset + 1)} for i in range(4)]
        path = root / f"{split}.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        out[split] = path
    return out
