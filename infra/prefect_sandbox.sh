# Sourced by the infra check scripts: a throwaway Prefect API on 127.0.0.1 for one check.
#   source "$(dirname "$0")/prefect_sandbox.sh" NAME
# sets REPO, BIN (the repo's .venv, else prefect on PATH), WORK (a temp dir, removed on exit unless
# KEEP_WORK=1), PORT, PREFECT_HOME/PREFECT_API_URL (exported, telemetry off), PIDS (process groups
# stopped on exit: TERM, then KILL after up to 10 s), and defines start_prefect_server.
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=$REPO/.venv/bin
[ -x "$BIN/prefect" ] || BIN=$(dirname "$(command -v prefect)")
WORK=$(mktemp -d -t "$1-XXXXXX")
PORT=$("$BIN/python" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
export PREFECT_HOME=$WORK/prefect-home PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_API_URL=http://127.0.0.1:$PORT/api EVOMERGE_REPO=$REPO
PIDS=()

cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do
    kill -TERM -- "-$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  done
  if [ "${KEEP_WORK:-0}" = 1 ]; then echo "logs kept in $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

# The server in its own process group, and the wait until it answers (up to 180 s).
start_prefect_server() {
  setsid "$BIN/prefect" server start --host 127.0.0.1 --port "$PORT" >"$WORK/server.log" 2>&1 < /dev/null &
  PIDS+=($!)
  for _ in $(seq 1 180); do curl -fsS "$PREFECT_API_URL/health" >/dev/null 2>&1 && break; sleep 1; done
  curl -fsS "$PREFECT_API_URL/health" >/dev/null || { tail -n 30 "$WORK/server.log"; exit 1; }
}
