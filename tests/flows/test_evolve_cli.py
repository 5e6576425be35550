"""`evomerge evolve` from the command line: a run against Prefect's ephemeral API (no server,
no test harness: a fresh subprocess), refusal of a finished run key, and bad configs rejected
with exit code 2 before any model is loaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from evomerge.flows.cli import main

pytestmark = pytest.mark.timeout(300)
REPO = Path(__file__).resolve().parents[2]


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _config(family, data, **over) -> dict:
    config = {
        "sources": [{"model": str(family["base"]), "base": True}, {"model": str(family["ft1"])}],
        "optimizer": {"popsize": 3, "seed": 3, "generations": 2},
        "fitness": {
            "dataset": {"path": str(data["train"]), "columns": {"prompt": "question", "answer": "target"}},
            "scorer": "math_accuracy",
            "max_new_tokens": 3,
        },
    }
    config.update(over)
    return config


def test_cli_runs_on_the_ephemeral_api_and_refuses_a_finished_run(tiny_family, tiny_dataset, tmp_path):
    cfg = _write(tmp_path / "run.yaml", _config(tiny_family, tiny_dataset))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "evomerge.flows.cli", "evolve", str(cfg), "--run-key", "cli-run",
           "--storage", f"file://{tmp_path / 'runs'}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("generation ")]
    assert [line.split()[1] for line in lines] == ["1/2", "2/2"]
    assert all(" best " in line and " mean " in line and line.rstrip().endswith("s") for line in lines)
    root = tmp_path / "runs" / "cli-run"
    result = json.loads((root / "result.json").read_text())["payload"]
    assert len(result["history"]) == 6
    assert result["best_fitness"] == max(h["fitness"] for h in result["history"])
    assert (root / "best" / "mergekit.yaml").is_file()

    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2
    assert "already finished" in again.stderr and "--no-resume" in again.stderr


BAD_CONFIGS = {
    "unknown key": (lambda c: c["fitness"].update(scorre="x"), "did you mean 'scorer'"),
    "missing base": (lambda c: c["sources"][0].pop("base"), "needs a base model"),
    "bounds reversed": (lambda c: c.update(space={"ps": {"bounds": {"weight": [1.0, 0.2]}}}), "space.ps.bounds"),
    "unknown scorer": (lambda c: c["fitness"].update(scorer="math_acuracy"), "unknown scorer 'math_acuracy'"),
    "column missing": (lambda c: c["fitness"]["dataset"].update(columns={"prompt": "question", "answer": "solution"}),
                       "columns.answer"),
    "empty dataset": (None, "has no rows"),
    "dataset missing": (lambda c: c["fitness"]["dataset"].update(path="/nonexistent/train.jsonl"), "does not exist"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_exits_2_before_loading_models(case, tiny_dataset, tmp_path, capsys, monkeypatch):
    import evomerge_core.kinds.resident as resident

    def no_models(*args, **kwargs):
        raise AssertionError("a model was loaded for a bad config")

    monkeypatch.setattr(resident.ResidentModel, "__init__", no_models)
    # Sources that do not exist: a config check that reached them would fail differently.
    family = {"base": tmp_path / "no-base", "ft1": tmp_path / "no-ft1"}
    config = _config(family, tiny_dataset, storage=f"file://{tmp_path / 'runs'}")
    mutate, expected = BAD_CONFIGS[case]
    if mutate is None:
        empty = tmp_path / "empty.jsonl"
        empty.write_text("")
        config["fitness"]["dataset"]["path"] = str(empty)
    else:
        mutate(config)
    rc = main(["evolve", str(_write(tmp_path / "bad.yaml", config))])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and expected in err
    assert not (tmp_path / "runs").exists()  # nothing half-written
