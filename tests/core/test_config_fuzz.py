"""Fuzz `parse_run_config` with seeded random mutations of a valid run config: whatever the
mutation (keys deleted, wrong types, junk strings, negative numbers, nested junk, unknown keys),
the only exception that may escape is `ConfigError` (valid-by-chance mutations may pass)."""

from __future__ import annotations

import copy
import random
from typing import Any

import pytest

from evomerge_core.config.schema import RunConfig, parse_run_config
from evomerge_core.errors import ConfigError

N_CONFIGS = 240

VALID: dict[str, Any] = {
    "run_key": "fuzz-run",
    "storage": "file:///tmp/evomerge-fuzz-runs",
    "sources": [{"model": "/models/base", "base": True}, {"model": "/models/ft1"}, {"model": "/models/ft2"}],
    "space": {"ps": {"method": "dare_ties", "params": ["weight", "density"],
                     "bounds": {"weight": [0.0, 1.0], "density": [0.1, 1.0]},
                     "granularity": {"layer_groups": 2}}},
    "optimizer": {"popsize": 4, "seed": 3, "generations": 2, "sigma0": 0.2},
    "fitness": {
        "dataset": {"path": "/data/train.jsonl", "columns": {"prompt": "question", "answer": "target"}, "num_items": 8},
        "scorer": "math_accuracy",
        "max_new_tokens": 8,
        "stop_strings": ["\n"],
        "batch_size": 4,
        "prompt_template": "Q: {prompt}\nA:",
    },
    "runtime": {"device": "cpu", "dtype": "float32", "torch_threads": 1},
    "output": {"materialise_best": True, "report": False, "publish": {"repo_id": None, "private": True}},
}

JUNK: list[Any] = [
    None, True, False, 0, -1, -10**9, 10**30, 1.5, -0.5, float("nan"), float("inf"), "", " ", "x", "??",
    "{prompt", "{}", "@0", "s3://", "::://", "0", "-1", "nan", "ünïcödé", "a" * 300, [], [None], [[]], [1, "x"],
    {}, {"": None}, {"junk": {"deeper": [1, {"x": None}]}}, {"model": 3}, b"bytes", 3 + 4j, ("t", 1),
]


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every (container path, key) in the nested config."""
    out: list[tuple] = []
    if isinstance(node, dict):
        for key, value in node.items():
            out.append(prefix + (key,))
            out.extend(_paths(value, prefix + (key,)))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out.append(prefix + (i,))
            out.extend(_paths(value, prefix + (i,)))
    return out


def _parent(root: Any, path: tuple) -> Any:
    for key in path[:-1]:
        root = root[key]
    return root


def _mutate_once(cfg: dict, rng: random.Random) -> None:
    paths = _paths(cfg)
    if not paths:
        cfg["sources"] = rng.choice(JUNK)
        return
    path = rng.choice(paths)
    parent, key = _parent(cfg, path), path[-1]
    op = rng.choice(["delete", "junk", "junk", "negate", "unknown_key", "typo_key", "nest", "string"])
    if op == "delete":
        del parent[key]
    elif op == "junk":
        parent[key] = copy.deepcopy(rng.choice(JUNK))
    elif op == "negate":
        value = parent[key]
        parent[key] = -value if isinstance(value, (int, float)) and not isinstance(value, bool) else -rng.randint(1, 10**6)
    elif op == "nest":
        parent[key] = {"nested": copy.deepcopy(parent[key]), "junk": rng.choice(JUNK)}
    elif op == "string":
        parent[key] = "".join(rng.choice("ab{}@:/ -_.0") for _ in range(rng.randint(0, 12)))
    elif isinstance(parent, dict):  # unknown or misspelt key beside the chosen one
        name = str(key)
        new = name[:-1] + name[-1] * 2 if op == "typo_key" and name else f"junk_{rng.randint(0, 99)}"
        parent[new] = copy.deepcopy(rng.choice(JUNK))
    else:
        parent.append(copy.deepcopy(rng.choice(JUNK)))


def _mutants(n: int, seed: int = 20261127) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        cfg = copy.deepcopy(VALID)
        for _ in range(rng.randint(1, 4)):
            _mutate_once(cfg, rng)
        out.append(cfg)
    return out


def test_the_unmutated_config_is_valid():
    assert isinstance(parse_run_config(copy.deepcopy(VALID)), RunConfig)


def test_only_config_errors_escape_from_malformed_configs():
    mutants = _mutants(N_CONFIGS)
    rejected = 0
    for i, cfg in enumerate(mutants):
        try:
            parse_run_config(cfg, source=f"mutant{i}")
        except ConfigError as exc:
            rejected += 1
            message = str(exc)
            assert message.startswith(f"mutant{i}"), message
            assert "\n" not in message.strip() or len(message) < 2000, message
        except Exception as exc:  # noqa: BLE001 - the point of the test
            pytest.fail(f"mutant {i} raised {type(exc).__name__}: {exc}\nconfig: {cfg!r}")
    # The mutations are meant to break configs: most must be rejected.
    assert rejected >= N_CONFIGS // 2, rejected


@pytest.mark.parametrize("raw", [None, [], "sources: []", 3, 1.5, True, b"x", ["sources"]])
def test_non_mapping_top_level_is_a_config_error(raw):
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        parse_run_config(raw)
