#!/usr/bin/env bash
# The local evomerge stack on this machine, every socket on 127.0.0.1:
#   Prefect server + UI   http://127.0.0.1:$BASE/            (BASE = EVOMERGE_STACK_BASE_PORT, default 4200)
#   Dask scheduler        tcp://127.0.0.1:$((BASE+1)) (dashboard :$((BASE+2)))  workers: EVOMERGE_STACK_WORKERS (default 2, 1 thread each)
#                         or one worker per GPU with EVOMERGE_STACK_GPUS=0,1 (resource GPU=1 each)
#   SeaweedFS S3          http://127.0.0.1:$((BASE+16))       bucket "evomerge"; credentials in $STATE/s3.env (mode 600)
#
# usage: infra/local_stack.sh start|stop|status
# State (PIDs, logs, data, Prefect home): EVOMERGE_STACK_DIR (default ~/.cache/evomerge/stack).
# Every process is started in its own session and stopped by its recorded PID (process group).
set -euo pipefail

BASE=${EVOMERGE_STACK_BASE_PORT:-4200}
STATE=${EVOMERGE_STACK_DIR:-$HOME/.cache/evomerge/stack}
WORKERS=${EVOMERGE_STACK_WORKERS:-2}
GPUS=${EVOMERGE_STACK_GPUS:-}
HOST=127.0.0.1
BIN=$(cd "$(dirname "$0")/.." && pwd)/.venv/bin
[ -x "$BIN/prefect" ] || BIN=$(dirname "$(command -v prefect)")
PREFECT_PORT=$BASE
DASK_PORT=$((BASE + 1))
S3_PORT=$((BASE + 16))
export PREFECT_HOME=$STATE/prefect-home PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_API_URL=http://$HOST:$PREFECT_PORT/api

mkdir -p "$STATE/pids" "$STATE/logs"
chmod 700 "$STATE"

say() { echo "local_stack: $*"; }

alive() { # NAME -> 0 when its recorded PID runs
  local f=$STATE/pids/$1.pid
  [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null
}

launch() { # NAME CMD... : start in a new session (process group = PID), log to logs/NAME.log
  local name=$1; shift
  if alive "$name"; then say "$name already running (pid $(cat "$STATE/pids/$name.pid"))"; return; fi
  setsid "$@" >"$STATE/logs/$name.log" 2>&1 < /dev/null &
  echo $! >"$STATE/pids/$name.pid"
}

wait_for() { # NAME CHECK-CMD... : up to 180 s
  local name=$1; shift
  for _ in $(seq 1 180); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    if ! alive "$name"; then say "$name exited; its log:"; tail -n 30 "$STATE/logs/$name.log" >&2; return 1; fi
    sleep 1
  done
  say "$name did not become ready in 180 s; log: $STATE/logs/$name.log"; return 1
}

port_open() { "$BIN/python" -c "import socket,sys; socket.create_connection(('$HOST', int(sys.argv[1])), 2).close()" "$1"; }

start_prefect() {
  launch prefect env PREFECT_SERVER_API_HOST=$HOST PREFECT_SERVER_API_PORT=$PREFECT_PORT \
    PREFECT_UI_API_URL="$PREFECT_API_URL" "$BIN/prefect" server start --host $HOST --port "$PREFECT_PORT"
  wait_for prefect curl -fsS "$PREFECT_API_URL/health"
}

start_seaweedfs() {
  if [ ! -f "$STATE/s3.env" ]; then
    local key secret
    key=$("$BIN/python" -c "import secrets; print('evomerge' + secrets.token_hex(6))")
    secret=$("$BIN/python" -c "import secrets; print(secrets.token_hex(20))")
    (umask 077
     printf 'AWS_ACCESS_KEY_ID=%s\nAWS_SECRET_ACCESS_KEY=%s\nAWS_ENDPOINT_URL=http://%s:%s\n' "$key" "$secret" $HOST $S3_PORT >"$STATE/s3.env"
     printf '{"identities":[{"name":"evomerge","credentials":[{"accessKey":"%s","secretKey":"%s"}],"actions":["Admin","Read","List","Tagging","Write"]}]}' \
       "$key" "$secret" >"$STATE/s3.json")
  fi
  mkdir -p "$STATE/seaweedfs"
  launch seaweedfs "$BIN/weed" mini -dir="$STATE/seaweedfs" -ip=$HOST -ip.bind=$HOST \
    -master.port=$((BASE + 10)) -master.port.grpc=$((BASE + 11)) -master.telemetry=false -master.volumeSizeLimitMB=256 \
    -volume.port=$((BASE + 12)) -volume.port.grpc=$((BASE + 13)) -filer.port=$((BASE + 14)) -filer.port.grpc=$((BASE + 15)) \
    -filer.localSocket="$STATE/filer.sock" -s3.port=$S3_PORT -s3.port.grpc=$((BASE + 17)) -s3.localSocket="$STATE/s3.sock" \
    -s3.port.iceberg=0 -s3.port.lance=0 -s3.config="$STATE/s3.json" -webdav=false -admin.ui=false \
    -admin.port=$((BASE + 18)) -admin.port.grpc=$((BASE + 19))
  wait_for seaweedfs port_open $S3_PORT
  # the run bucket (credentials from the file, never printed)
  local make_bucket='import os, s3fs
fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})
fs.exists("evomerge") or fs.mkdir("evomerge")'
  # shellcheck disable=SC2046  # s3.env holds KEY=VALUE words without spaces
  wait_for seaweedfs env $(cat "$STATE/s3.env") "$BIN/python" -c "$make_bucket"
}

start_dask() {
  # Workers write candidate records to the run store: they get the stack's S3 credentials.
  # shellcheck disable=SC2046
  local common=(env OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PREFECT_API_URL="$PREFECT_API_URL" $(cat "$STATE/s3.env"))
  launch dask-scheduler "${common[@]}" "$BIN/dask" scheduler --host $HOST --port "$DASK_PORT" --dashboard-address "$HOST:$((BASE + 2))"
  wait_for dask-scheduler port_open "$DASK_PORT"
  if [ -n "$GPUS" ]; then
    local gpu
    for gpu in ${GPUS//,/ }; do
      launch "dask-worker-gpu$gpu" "${common[@]}" CUDA_VISIBLE_DEVICES="$gpu" "$BIN/dask" worker "tcp://$HOST:$DASK_PORT" \
        --host $HOST --nthreads 1 --dashboard-address "$HOST:0" --resources "GPU=1" --name "gpu-$gpu"
    done
  else
    launch dask-workers "${common[@]}" "$BIN/dask" worker "tcp://$HOST:$DASK_PORT" --host $HOST --nworkers "$WORKERS" \
      --nthreads 1 --dashboard-address "$HOST:0"
  fi
}

stop_one() { # NAME: TERM its process group, KILL after 20 s
  local f=$STATE/pids/$1.pid pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    if kill -0 "$pid" 2>/dev/null; then kill -KILL -- "-$pid" 2>/dev/null || true; fi
    say "stopped $1 (pid $pid)"
  fi
  rm -f "$f"
}

status() {
  local f name rc=0
  for f in "$STATE"/pids/*.pid; do
    [ -e "$f" ] || { say "nothing running (state: $STATE)"; return 3; }
    name=$(basename "$f" .pid)
    if alive "$name"; then say "$name running (pid $(cat "$f"))"; else say "$name NOT running (stale pid file)"; rc=1; fi
  done
  echo "Prefect UI:     http://$HOST:$PREFECT_PORT/  (PREFECT_API_URL=$PREFECT_API_URL)"
  echo "Dask scheduler: tcp://$HOST:$DASK_PORT  (runtime.task_runner: {kind: dask, address: tcp://$HOST:$DASK_PORT})"
  echo "S3 endpoint:    http://$HOST:$S3_PORT  bucket s3://evomerge (credentials: $STATE/s3.env)"
  return $rc
}

case "${1:-}" in
  start)
    start_prefect
    start_seaweedfs
    start_dask
    status
    ;;
  stop)
    for name in dask-workers $(cd "$STATE/pids" && ls dask-worker-gpu*.pid 2>/dev/null | sed 's/.pid$//') dask-scheduler seaweedfs prefect; do
      stop_one "$name"
    done
    ;;
  status)
    status
    ;;
  *)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
