#!/usr/bin/env bash
# The demo: a local RabbitMQ (installed and started when needed), three workers running the
# example `reports` pipeline (examples/warren.toml), and a driver that submits a multi-tenant
# workload and shows what happened. Everything lives in a fresh namespace that is deleted on exit,
# so the demo never touches other queues on the broker. Extra arguments go to the driver
# (`deploy/local/demo.sh --help` lists them).
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

cd "$WARREN_ROOT"
command -v cargo >/dev/null 2>&1 || die "cargo not found; install Rust (https://rustup.rs)"
ensure_broker
ensure_python3 # the example steps are Python programs

log "building (cargo build --workspace)"
cargo build --workspace --quiet
BIN="${CARGO_TARGET_DIR:-target}/debug"

CONFIG=examples/warren.toml
WORKERS=3
LOG_DIR=.warren-demo
# A namespace of its own: every exchange and queue name starts with it, so a run never sees an
# earlier run's leftovers and deleting it afterwards removes exactly what the demo made.
WARREN_NAMESPACE="demo-$(date +%s)"
export WARREN_NAMESPACE

WORKER_PIDS=()
TOPOLOGY_APPLIED=0

any_worker_alive() {
    local pid
    for pid in "${WORKER_PIDS[@]}"; do
        kill -0 "$pid" 2>/dev/null && return 0
    done
    return 1
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ "${#WORKER_PIDS[@]}" -gt 0 ]; then
        log "stopping workers (SIGTERM: they finish the step in hand, then exit)"
        kill -TERM "${WORKER_PIDS[@]}" 2>/dev/null || true
        # Give them time to drain, but never hang the terminal on a stuck one.
        local waited=0
        while any_worker_alive && [ "$waited" -lt 30 ]; do
            sleep 1
            waited=$((waited + 1))
        done
        kill -KILL "${WORKER_PIDS[@]}" 2>/dev/null || true
        wait "${WORKER_PIDS[@]}" 2>/dev/null || true
    fi
    if [ "$TOPOLOGY_APPLIED" -eq 1 ]; then
        log "deleting namespace $WARREN_NAMESPACE"
        "$BIN/warren" topology delete --config "$CONFIG" --yes >/dev/null ||
            log "could not delete namespace $WARREN_NAMESPACE; its queues stay on the broker"
    fi
    log "worker logs: $LOG_DIR/worker-*.log"
    exit "$rc"
}
trap cleanup EXIT
# Turn Ctrl-C / SIGTERM into a normal exit so the EXIT trap cleans up.
trap 'exit 130' INT
trap 'exit 143' TERM

log "namespace $WARREN_NAMESPACE"
"$BIN/warren" topology apply --config "$CONFIG"
TOPOLOGY_APPLIED=1

mkdir -p "$LOG_DIR"
for i in $(seq 1 "$WORKERS"); do
    # Each worker serves its metrics on a port of its own: 9480, 9481, ...
    "$BIN/warren-worker" run --config "$CONFIG" --metrics-addr "127.0.0.1:$((9479 + i))" \
        >"$LOG_DIR/worker-$i.log" 2>&1 &
    WORKER_PIDS+=("$!")
done
log "started $WORKERS workers; logs in $LOG_DIR/worker-{1..$WORKERS}.log"
log "metrics: http://127.0.0.1:9480/metrics (and 9481.. for the other workers)"

# A worker that cannot start (bad config, no broker) exits at once; say so now rather than leave
# the driver waiting for results that never come.
sleep 1
for i in $(seq 1 "$WORKERS"); do
    if ! kill -0 "${WORKER_PIDS[$((i - 1))]}" 2>/dev/null; then
        tail -n 20 "$LOG_DIR/worker-$i.log" >&2 || true
        die "worker $i exited at start; its log is above ($LOG_DIR/worker-$i.log)"
    fi
done

"$BIN/warren-demo" --config "$CONFIG" "$@"
