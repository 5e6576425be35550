#!/usr/bin/env bash
# End-to-end check of infra/prefect.yaml: a throwaway Prefect server on 127.0.0.1, the
# evomerge-local process work pool, `infra/deploy.sh` (deployments + automations), a process worker,
# and `prefect deployment run` on a tiny run config; passes when the flow run completes and its
# result.json is written. Everything it starts is stopped by PID on exit. About 1-3 minutes.
set -euo pipefail
source "$(dirname "$0")/prefect_sandbox.sh" evomerge-deploy-check

echo "check_deployment: Prefect server on 127.0.0.1:$PORT (home $PREFECT_HOME)"
start_prefect_server

"$BIN/prefect" work-pool create evomerge-local --type process >/dev/null
"$BIN/python" - "$WORK" <<'PY'
import json, sys
from pathlib import Path
import yaml
work = Path(sys.argv[1])
sys.path.insert(0, str(Path.cwd() / "tests"))
from tiny_models import make_tiny_family
family = make_tiny_family(work / "family", n_finetunes=2, seed=0, noise=0.02)
rows = [{"question": f"what is {i} plus 1? ", "target": str(i + 1)} for i in range(4)]
(work / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
(work / "run.yaml").write_text(yaml.safe_dump({
    "storage": f"file://{work}/runs",
    "sources": [{"model": str(family["base"]), "base": True}, {"model": str(family["ft1"])}, {"model": str(family["ft2"])}],
    "space": {"ps": {"method": "dare_ties", "params": ["density", "weight"]}},
    "optimizer": {"popsize": 4, "seed": 1, "generations": 2},
    "fitness": {"dataset": {"path": str(work / "train.jsonl"), "columns": {"prompt": "question", "answer": "target"}},
                "scorer": "logprob", "accuracy_scorer": "none", "batch_size": 4},
    "runtime": {"torch_threads": 1},
    "output": {"materialise_best": False},
}))
PY

cd "$REPO"
bash infra/deploy.sh | tail -n 5
setsid "$BIN/prefect" worker start --pool evomerge-local --limit 1 >"$WORK/worker.log" 2>&1 < /dev/null &
PIDS+=($!)
"$BIN/prefect" deployment run evolve-config/evolve --param "config_path=$WORK/run.yaml" --param run_key=deploy-check \
  --watch --watch-timeout 300 | tail -n 5
"$BIN/python" - "$WORK" <<'PY'
import sys
from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
with get_client(sync_client=True) as client:
    # the search runs in the deployment's own flow run (no child run)
    runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["evolve-config-deploy-check"])))
    assert len(runs) == 1 and runs[0].deployment_id is not None and runs[0].state.is_completed(), [(r.name, r.state) for r in runs]
from evomerge_core.runs.store import RunStore
result = RunStore(f"file://{sys.argv[1]}/runs", "deploy-check").read_json("result.json")
assert len(result["history"]) == 8, len(result["history"])
print(f"check_deployment: OK: deployment run completed on a process worker; best fitness {result['best_fitness']:.4f}")
PY
