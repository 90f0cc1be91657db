#!/usr/bin/env bash
# A two-node Ray cluster on this machine (a head node and a worker node, two raylets with their own ports, resources
# and temp dirs) plus a local S3 endpoint (moto server) with one bucket. Every process is started in its own process
# group and its PID written to the state file, so that down.sh stops exactly these processes (never `ray stop`, which
# kills every Ray process on the machine).
#
#   bash cluster/local/up.sh                  # then: source "$(bash cluster/local/up.sh --print-env)"  (see README)
#   bash cluster/local/down.sh [--purge]
#
# Settings (environment variables, all optional):
#   RNC_LOCAL_DIR       state dir: state.env, logs/                              (default /tmp/rnc-local-$RNC_BASE_PORT)
#   RNC_BASE_PORT       first of the ~300 ports this cluster uses (GCS = base)   (default 26380)
#   RNC_DASHBOARD_PORT  Ray dashboard and Jobs API                               (default 8265)
#   RNC_S3_PORT         local S3 endpoint                                        (default base + 8)
#   RNC_SERVE_PORT      HTTP port of the Serve proxies (rnc serve deploy --port)  (default base + 9)
#   RNC_BUCKET          bucket created on it                                     (default rnc)
#   RNC_HEAD_CPUS / RNC_WORKER_CPUS   logical CPUs per node                      (default 2 / 2)
#   RNC_WORKER_RESOURCES  custom resources of the worker node (JSON)             (default {"worker_node": 1})
#   RNC_OBJECT_STORE_BYTES  object store per node                                (default 500 MB)
#   RAY_BIN / PYTHON / MOTO_SERVER   executables                                 (default: from PATH, e.g. the venv)
set -euo pipefail

if [[ "${1:-}" == "--print-env" ]]; then  # where the state file of the current settings is
    echo "${RNC_LOCAL_DIR:-/tmp/rnc-local-${RNC_BASE_PORT:-26380}}/state.env"
    exit 0
fi

BASE=${RNC_BASE_PORT:-26380}
DIR=${RNC_LOCAL_DIR:-/tmp/rnc-local-$BASE}
DASHBOARD_PORT=${RNC_DASHBOARD_PORT:-8265}
S3_PORT=${RNC_S3_PORT:-$((BASE + 8))}
SERVE_PORT=${RNC_SERVE_PORT:-$((BASE + 9))}
BUCKET=${RNC_BUCKET:-rnc}
HEAD_CPUS=${RNC_HEAD_CPUS:-2}
WORKER_CPUS=${RNC_WORKER_CPUS:-2}
WORKER_RESOURCES=${RNC_WORKER_RESOURCES:-'{"worker_node": 1}'}
OBJECT_STORE_BYTES=${RNC_OBJECT_STORE_BYTES:-500000000}
RAY_BIN=${RAY_BIN:-ray}
PYTHON=${PYTHON:-python}
MOTO_SERVER=${MOTO_SERVER:-moto_server}
IP=127.0.0.1
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# Ray's temp dirs hold Unix sockets, whose paths must stay short (108 bytes): not under $DIR, which may be deep.
RAY_TMP=/tmp/rnc-ray-$BASE
STATE=$DIR/state.env
LOGS=$DIR/logs

if [[ -f "$STATE" ]]; then
    echo "up.sh: $STATE exists: a local cluster with these settings is up (or was not torn down)." >&2
    echo "       bash cluster/local/down.sh   (with the same RNC_* settings) first" >&2
    exit 1
fi
mkdir -p "$LOGS" "$RAY_TMP"

# Everything started below (Ray processes, Train/Tune workers, Serve replicas) inherits this environment.
export RAY_AUTH_MODE=disabled                 # Ray >= 2.59 wants a token for local clusters otherwise
export RAY_USAGE_STATS_ENABLED=0
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}  # down.sh: stop at once
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1
export AWS_ENDPOINT_URL=http://$IP:$S3_PORT   # s3:// URIs without an endpoint_url go to the local endpoint
# Ray-internal clients that look for "the" cluster (e.g. Train's placement-group cleaner) must not pick another
# Ray instance running on this machine.
export RAY_ADDRESS=$IP:$BASE
unset AWS_PROFILE AWS_SESSION_TOKEN
# Workers import this checkout's packages as regular packages whatever directory a driver starts from (with an
# editable install and the repository root missing from sys.path, `serve` would resolve as a namespace package).
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
# The dashboard's Metrics view embeds Grafana and queries Prometheus when they run (cluster/README.md, Monitor).
export RAY_GRAFANA_HOST=${RAY_GRAFANA_HOST:-http://127.0.0.1:3000}
export RAY_PROMETHEUS_HOST=${RAY_PROMETHEUS_HOST:-http://127.0.0.1:9090}

port_free() {  # port_free PORT -> 0 when nothing listens on 127.0.0.1:PORT
    ! (exec 3<>"/dev/tcp/$IP/$1") 2>/dev/null
}
for p in "$BASE" "$DASHBOARD_PORT" "$S3_PORT" "$SERVE_PORT"; do
    if ! port_free "$p"; then
        echo "up.sh: port $p on $IP is in use; choose other RNC_BASE_PORT / RNC_DASHBOARD_PORT / RNC_S3_PORT" >&2
        exit 1
    fi
done

started=()  # PIDs (= process group ids) to clean up if start-up fails half way
cleanup_on_error() {
    echo "up.sh: start-up failed; stopping what was started (logs: $LOGS)" >&2
    for pid in "${started[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
    sleep 2
    for pid in "${started[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
    rm -f "$STATE"
}
trap cleanup_on_error ERR

start_group() {  # start_group LOGFILE CMD...: run CMD in a new session (its own process group); prints its PID
    local log=$1
    shift
    setsid "$@" >"$log" 2>&1 </dev/null &
    echo $!
}

wait_for() {  # wait_for SECONDS DESCRIPTION CMD...: retry CMD once a second
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS > deadline)); then
            echo "up.sh: timed out waiting for $what" >&2
            return 1
        fi
        sleep 1
    done
}

# ------------------------------------------------------------------------------------------------ local S3 endpoint
S3_PID=$(start_group "$LOGS/s3.log" "$MOTO_SERVER" -H "$IP" -p "$S3_PORT")
started+=("$S3_PID")
wait_for 30 "the S3 endpoint on port $S3_PORT" "$PYTHON" -c "
import boto3, botocore.exceptions as e
s3 = boto3.client('s3', endpoint_url='$AWS_ENDPOINT_URL')
try:
    s3.create_bucket(Bucket='$BUCKET')
except e.ClientError as exc:
    if exc.response['Error']['Code'] not in ('BucketAlreadyOwnedByYou', 'BucketAlreadyExists'):
        raise
"

# ----------------------------------------------------------------------------------------------------- head node
# `ray start --block` stays in the foreground of its process group and stops its Ray processes on SIGTERM.
HEAD_PID=$(start_group "$LOGS/head.log" "$RAY_BIN" start --head --block --disable-usage-stats \
    --port "$BASE" --ray-client-server-port $((BASE + 1)) \
    --node-manager-port $((BASE + 2)) --object-manager-port $((BASE + 3)) --metrics-export-port $((BASE + 4)) \
    --dashboard-agent-listen-port $((BASE + 5)) --dashboard-agent-grpc-port $((BASE + 6)) \
    --runtime-env-agent-port $((BASE + 7)) --min-worker-port $((BASE + 100)) --max-worker-port $((BASE + 199)) \
    --include-dashboard true --dashboard-host "$IP" --dashboard-port "$DASHBOARD_PORT" \
    --num-cpus "$HEAD_CPUS" --num-gpus 0 --resources '{"head_node": 1}' \
    --object-store-memory "$OBJECT_STORE_BYTES" --temp-dir "$RAY_TMP/head")
started+=("$HEAD_PID")
DASHBOARD_URL=http://$IP:$DASHBOARD_PORT
wait_for 90 "the Ray head node (log: $LOGS/head.log)" "$PYTHON" -c "
import urllib.request
urllib.request.urlopen('$DASHBOARD_URL/api/version', timeout=2).read()
"

# Our Grafana dashboard next to Ray's own (Ray writes those and a Grafana provisioning config per session).
GRAFANA_DASHBOARDS=$RAY_TMP/head/session_latest/metrics/grafana/dashboards
if wait_for 30 "Ray's Grafana dashboards" test -d "$GRAFANA_DASHBOARDS"; then
    cp "$REPO/cluster/monitoring/rnc_grafana_dashboard.json" "$GRAFANA_DASHBOARDS/"
else
    echo "up.sh: warning: $GRAFANA_DASHBOARDS missing; the rnc Grafana dashboard was not installed" >&2
fi

# --------------------------------------------------------------------------------------------------- worker node
WORKER_PID=$(start_group "$LOGS/worker.log" "$RAY_BIN" start --block --disable-usage-stats \
    --address "$IP:$BASE" \
    --node-manager-port $((BASE + 12)) --object-manager-port $((BASE + 13)) --metrics-export-port $((BASE + 14)) \
    --dashboard-agent-listen-port $((BASE + 15)) --dashboard-agent-grpc-port $((BASE + 16)) \
    --runtime-env-agent-port $((BASE + 17)) --min-worker-port $((BASE + 200)) --max-worker-port $((BASE + 299)) \
    --num-cpus "$WORKER_CPUS" --num-gpus 0 --resources "$WORKER_RESOURCES" \
    --object-store-memory "$OBJECT_STORE_BYTES" --temp-dir "$RAY_TMP/worker")
started+=("$WORKER_PID")
wait_for 90 "the worker node to join (log: $LOGS/worker.log)" "$PYTHON" -c "
import json, urllib.request
nodes = json.load(urllib.request.urlopen('$DASHBOARD_URL/nodes?view=summary', timeout=2))['data']['summary']
assert sum(n['raylet']['state'] == 'ALIVE' for n in nodes) == 2
"

trap - ERR
cat >"$STATE" <<EOF
# Written by cluster/local/up.sh; \`source\` it to talk to this cluster; down.sh reads the PIDs.
export RNC_LOCAL_DIR=$DIR
export RNC_BASE_PORT=$BASE
export RNC_HEAD_PID=$HEAD_PID
export RNC_WORKER_PID=$WORKER_PID
export RNC_S3_PID=$S3_PID
export RNC_RAY_TMP=$RAY_TMP
export RAY_ADDRESS=$IP:$BASE
export RNC_DASHBOARD_URL=$DASHBOARD_URL
export RNC_METRICS_PORTS=$((BASE + 4)),$((BASE + 14))
export RNC_S3_ENDPOINT=$AWS_ENDPOINT_URL
export RNC_SERVE_PORT=$SERVE_PORT
export RNC_BUCKET=$BUCKET
export RAY_AUTH_MODE=disabled
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1
export AWS_ENDPOINT_URL=$AWS_ENDPOINT_URL
EOF

cat <<EOF
local Ray cluster up: head ($HEAD_CPUS CPU) + worker ($WORKER_CPUS CPU, $WORKER_RESOURCES), S3 at $AWS_ENDPOINT_URL
  dashboard:  $DASHBOARD_URL
  address:    $IP:$BASE          (rnc pipeline run --address / rnc tune --address / RAY_ADDRESS)
  storage:    s3://$BUCKET/runs  (endpoint $AWS_ENDPOINT_URL)
  metrics:    http://$IP:$((BASE + 4))/metrics  http://$IP:$((BASE + 14))/metrics
  serve port: $SERVE_PORT          (rnc serve deploy --port \$RNC_SERVE_PORT)
  shell:      source $STATE
  stop:       bash cluster/local/down.sh
EOF
