"""`infra/check_deployment.sh` in the suite: `prefect deploy` of the evolve deployment against a
throwaway `prefect server` on 127.0.0.1, a process worker, and `prefect deployment run` on a tiny
run config that must complete and write its result (the script stops everything it started)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_evolve_deployment_runs_on_a_process_worker():
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}  # the script sets its own
    proc = subprocess.run(["bash", str(REPO / "infra" / "check_deployment.sh")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=560)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "check_deployment: OK: deployment run completed on a process worker" in proc.stdout, proc.stdout[-3000:]
