#!/usr/bin/env bash
# The demo: a local RabbitMQ (installed and started when needed), an autoscaling supervisor
# running one to three workers of the example `reports` pipeline (examples/warren.toml), and a driver that submits a multi-tenant
# workload and shows what happened. Everything lives in a fresh namespace that is deleted on exit,
# so the demo never touches other queues on the broker. Extra arguments go to the driver
# (`deploy/local/demo.sh --help` lists them).
#
# `deploy/local/demo.sh --nightly` runs the nightly shape instead (examples/nightly/): two
# workers whose schedule fires within 20 s, a fan-out of 16 parts over 12 tenants, and the
# join's per-tenant summary; then it stops the workers and deletes its namespace.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

NIGHTLY=0
if [ "${1:-}" = "--nightly" ]; then
    NIGHTLY=1
    shift
fi
DEMO_STARTED=$(date +%s)

cd "$WARREN_ROOT"
command -v cargo >/dev/null 2>&1 || die "cargo not found; install Rust (https://rustup.rs)"
ensure_broker
if [ "$NIGHTLY" -eq 0 ]; then
    ensure_management # unacked counts for the supervisor's backlog
fi
ensure_python3 # the example steps are Python programs

log "building (cargo build --workspace)"
cargo build --workspace --quiet
BIN="${CARGO_TARGET_DIR:-target}/debug"

CONFIG=examples/warren.toml
[ "$NIGHTLY" -eq 1 ] && CONFIG=examples/nightly/warren.toml
LOG_DIR=.warren-demo
# A namespace of its own: every exchange and queue name starts with it, so a run never sees an
# earlier run's leftovers and deleting it afterwards removes exactly what the demo made.
WARREN_NAMESPACE="demo-$(date +%s)"
export WARREN_NAMESPACE

SUPERVISOR_PID=""
CONSOLE_PID=""
WORKER_PIDS=()
TOPOLOGY_APPLIED=0

# SIGTERM to a process (the step in hand finishes, then it exits); SIGKILL after 45 s, so a
# stuck one never hangs the terminal.
stop_process() {
    local pid=$1 waited=0
    kill -TERM "$pid" 2>/dev/null || true
    while kill -0 "$pid" 2>/dev/null && [ "$waited" -lt 45 ]; do
        sleep 1
        waited=$((waited + 1))
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ -n "$CONSOLE_PID" ]; then
        kill -TERM "$CONSOLE_PID" 2>/dev/null || true
        wait "$CONSOLE_PID" 2>/dev/null || true
    fi
    if [ "${#WORKER_PIDS[@]}" -gt 0 ]; then
        log "stopping the workers (SIGTERM)"
        for pid in "${WORKER_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
        for pid in "${WORKER_PIDS[@]}"; do stop_process "$pid"; done
    fi
    if [ -n "$SUPERVISOR_PID" ]; then
        log "stopping the supervisor (SIGTERM: its workers finish the step in hand, then exit)"
        stop_process "$SUPERVISOR_PID"
        log "scaling decisions:"
        # time (UTC), then the pool's ready + unacked backlog, desired and running workers
        grep -F 'Scaling decision.' "$LOG_DIR/supervisor.log" |
            sed -E 's/^[0-9-]+T([0-9:]+)\.[0-9]+Z.*Scaling decision\. /    \1 /' || true
    fi
    if [ "$TOPOLOGY_APPLIED" -eq 1 ]; then
        log "deleting namespace $WARREN_NAMESPACE"
        "$BIN/warren" topology delete --config "$CONFIG" --yes >/dev/null ||
            log "could not delete namespace $WARREN_NAMESPACE; its queues stay on the broker"
    fi
    if [ "$NIGHTLY" -eq 1 ]; then
        log "worker logs: $LOG_DIR/nightly-worker-1.log, $LOG_DIR/nightly-worker-2.log"
        log "took $(($(date +%s) - DEMO_STARTED)) s"
    else
        log "supervisor and worker logs: $LOG_DIR/supervisor.log"
    fi
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
# umbrella's "late data" job fails until this file exists (examples/src/demo.rs): start without it.
rm -f "$LOG_DIR/late-data.csv"

# The web console on the demo's history (examples/warren.toml turns history on). Another port with
# WARREN_CONSOLE_LISTEN; it stays on 127.0.0.1, where it needs no credentials.
CONSOLE_LISTEN="${WARREN_CONSOLE_LISTEN:-127.0.0.1:9400}"
if [ "$NIGHTLY" -eq 0 ]; then
    "$BIN/warren" console --config "$CONFIG" --listen "$CONSOLE_LISTEN" >"$LOG_DIR/console.log" 2>&1 &
    CONSOLE_PID=$!
    log "console: http://$CONSOLE_LISTEN/ (log in $LOG_DIR/console.log)"
fi

if [ "$NIGHTLY" -eq 1 ]; then
    # Two plain workers: both take part in the schedule (one fires each slot) and run every step.
    for n in 1 2; do
        WARREN_METRICS_ADDR=127.0.0.1:0 "$BIN/warren-worker" run --config "$CONFIG" \
            >"$LOG_DIR/nightly-worker-$n.log" 2>&1 &
        WORKER_PIDS+=($!)
    done
    log "started 2 workers; logs in $LOG_DIR/nightly-worker-{1,2}.log"
    "$BIN/nightly-demo" --config "$CONFIG" "$@"
    exit 0
fi

# The supervisor counts messages its workers hold unacked as backlog too, when it can read them.
if [ -z "${WARREN_MANAGEMENT_URL:-}" ] && port_answers "$WARREN_BROKER_HOST" "$WARREN_MANAGEMENT_PORT"; then
    export WARREN_MANAGEMENT_URL="http://$WARREN_BROKER_HOST:$WARREN_MANAGEMENT_PORT"
fi
# One pool for the pipeline: 1 to 3 workers, one per 10 queued messages; a worker is drained
# once the queues have been quieter for 10 s. Workers log into the same file, prefixed `reports#N`.
"$BIN/warren-worker" supervise --config "$CONFIG" --min 1 --max 3 --target-backlog 10 \
    --interval 1s --scale-down-after 10s >"$LOG_DIR/supervisor.log" 2>&1 &
SUPERVISOR_PID=$!
log "started the supervisor (1 to 3 workers); log in $LOG_DIR/supervisor.log"
log "metrics: http://127.0.0.1:9478/metrics (queue depths, workers desired and running),"
log "         http://127.0.0.1:9480/metrics, 9481, 9482 (each worker)"

# A supervisor that cannot start (bad config, port in use) exits at once; say so now rather than
# leave the driver waiting for results that never come.
sleep 1
if ! kill -0 "$SUPERVISOR_PID" 2>/dev/null; then
    tail -n 20 "$LOG_DIR/supervisor.log" >&2 || true
    die "the supervisor exited at start; its log is above ($LOG_DIR/supervisor.log)"
fi

"$BIN/warren-demo" --config "$CONFIG" "$@"

# With someone at the terminal, keep everything up so they can use the console: find umbrella's
# failed job, read why, create the file it waits for, replay it and watch it succeed.
if [ -t 0 ] && [ -n "$CONSOLE_PID" ] && kill -0 "$CONSOLE_PID" 2>/dev/null; then
    log "the console is up at http://$CONSOLE_LISTEN/failures: umbrella's job waits for $LOG_DIR/late-data.csv."
    log "  run \`touch $LOG_DIR/late-data.csv\`, press Replay on the job's page, and watch it succeed."
    log "press Enter to end the demo (it deletes namespace $WARREN_NAMESPACE)"
    read -r _ || true
fi

# The other half of autoscaling: once the queues are quiet for --scale-down-after, the
# supervisor drains workers (SIGTERM, so nothing is lost) down to --min.
case " $* " in
*" --help "* | *" -h "*) ;; # the driver only printed its help
*)
    log "waiting for the supervisor to shrink the pool back to 1 worker (after 10 s of quiet)"
    for _ in $(seq 60); do
        grep -qF 'scale_to=1 action="scale_down"' "$LOG_DIR/supervisor.log" && break
        sleep 1
    done
    ;;
esac
