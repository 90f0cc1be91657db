#!/usr/bin/env bash
# Stop the local cluster started by up.sh: the worker node, the head node and the S3 endpoint, by the process groups
# recorded in its state file (SIGTERM, then SIGKILL after a grace period). Never `ray stop`: that would kill every Ray
# process on the machine, including other clusters and test sessions.
#
#   bash cluster/local/down.sh            # keeps $RNC_LOCAL_DIR/logs and the Ray session logs for a post-mortem
#   bash cluster/local/down.sh --purge    # also deletes them (and the S3 data, which lives in moto's memory anyway)
#
# Uses the same RNC_LOCAL_DIR / RNC_BASE_PORT settings as up.sh to find the state file.
set -euo pipefail

PURGE=0
if [[ "${1:-}" == "--purge" ]]; then PURGE=1; fi
BASE=${RNC_BASE_PORT:-26380}
DIR=${RNC_LOCAL_DIR:-/tmp/rnc-local-$BASE}
STATE=$DIR/state.env
GRACE_S=${RNC_STOP_GRACE_S:-20}

if [[ ! -f "$STATE" ]]; then
    echo "down.sh: no state file at $STATE: nothing to stop (set RNC_LOCAL_DIR / RNC_BASE_PORT as for up.sh)" >&2
    exit 0
fi
# shellcheck source=/dev/null
source "$STATE"

alive() {  # alive PGID -> 0 while any process of that group exists
    kill -0 -- "-$1" 2>/dev/null
}

# Worker node first (its raylet would otherwise log the head's disappearance), then the head, then S3.
for pid in "$RNC_WORKER_PID" "$RNC_HEAD_PID" "$RNC_S3_PID"; do
    if alive "$pid"; then
        # `ray start --block` answers SIGTERM by stopping the raylet, GCS, dashboard and workers it started; the
        # group-wide signal also reaches any of them directly.
        kill -TERM -- "-$pid" 2>/dev/null || true
    fi
    deadline=$((SECONDS + GRACE_S))
    while alive "$pid" && ((SECONDS < deadline)); do sleep 0.5; done
    if alive "$pid"; then
        echo "down.sh: process group $pid still alive after ${GRACE_S}s; sending SIGKILL" >&2
        kill -KILL -- "-$pid" 2>/dev/null || true
    fi
done

rm -f "$STATE"
if ((PURGE)); then
    rm -rf "$DIR" "$RNC_RAY_TMP"
    echo "local cluster stopped; $DIR and $RNC_RAY_TMP deleted"
else
    echo "local cluster stopped; logs kept in $DIR/logs and $RNC_RAY_TMP/*/session_latest/logs"
fi
