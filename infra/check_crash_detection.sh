#!/usr/bin/env bash
# Infra check of infra/automations.yaml: a throwaway Prefect server on 127.0.0.1, infra/deploy.sh,
# a process worker, a long toy-world run of the evolve deployment; after two heartbeats the worker
# and the flow process are killed together with SIGKILL (a machine that dies: nothing reports the
# crash), and the heartbeat automation must mark the run Crashed. Passes when it does within 180 s
# of the kill. Everything it starts is stopped by PID on exit. About 3-4 minutes (not in the suite).
set -euo pipefail
source "$(dirname "$0")/prefect_sandbox.sh" evomerge-crash-check
export OMP_NUM_THREADS=1

start_prefect_server
"$BIN/prefect" work-pool create evomerge-local --type process >/dev/null
bash "$REPO/infra/deploy.sh" | tail -n 1
setsid "$BIN/prefect" worker start --pool evomerge-local --limit 1 >"$WORK/worker.log" 2>&1 < /dev/null &
WORKER=$!
PIDS+=($WORKER)
(cd "$WORK" && "$BIN/evomerge" toyworld --out "$WORK/toyworld" | tail -n 1)
sed -e "s#\./toyworld#$WORK/toyworld#g" -e "s#file://\./runs#file://$WORK/runs#" -e "s#^  evaluations: .*#  evaluations: 2700#" \
  "$REPO/examples/toyworld-ps.yaml" >"$WORK/long.yaml"
"$BIN/python" - "$WORKER" "$WORK/long.yaml" <<'PY'
import os, signal, sys, time

import psutil
from prefect.client.orchestration import SyncPrefectClient

with SyncPrefectClient(os.environ["PREFECT_API_URL"]) as client:
    deployment = client.read_deployment_by_name("evolve-config/evolve")
    run = client.create_flow_run_from_deployment(deployment.id, parameters={"config_path": sys.argv[2], "run_key": "crash-check"})
    deadline = time.monotonic() + 300
    while not client.read_flow_run(run.id).state.is_running():
        assert time.monotonic() < deadline, "the run did not start in 300 s"
        time.sleep(1)
    time.sleep(75)  # two heartbeats (every 30 s)
    worker = psutil.Process(int(sys.argv[1]))
    for proc in [worker, *worker.children(recursive=True)]:
        proc.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    while not (state := client.read_flow_run(run.id).state).is_final():
        if time.monotonic() - killed > 180:
            sys.exit(f"check_crash_detection: FAILED: the run is still {state.type.value} 180 s after the kill")
        time.sleep(2)
    if state.type.value != "CRASHED":
        sys.exit(f"check_crash_detection: FAILED: the run ended {state.type.value}: {state.message}")
    print(f"check_crash_detection: OK: marked Crashed {time.monotonic() - killed:.0f} s after the worker and the flow "
          f"process were killed ({state.message})")
PY
