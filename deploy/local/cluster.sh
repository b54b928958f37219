#!/usr/bin/env bash
# A three-node RabbitMQ cluster on this machine, beside (never instead of) the broker on 5672: for
# the cluster chaos test, and for trying warren against a cluster.
#
#   deploy/local/cluster.sh start            a fresh cluster (or starts the nodes that are down)
#   deploy/local/cluster.sh stop             stops every node and deletes the cluster's data
#   deploy/local/cluster.sh stop NODE        stops one node gracefully (its data is kept)
#   deploy/local/cluster.sh kill NODE        SIGKILLs one node, as a crash would
#   deploy/local/cluster.sh restart NODE     starts a node again (stopping it first if it runs)
#   deploy/local/cluster.sh status           each node: up or down, its ports, who it sees
#   deploy/local/cluster.sh urls             the AMQP URLs, comma-separated (WARREN_AMQP_URL)
#   deploy/local/cluster.sh leaders [PREFIX] quorum queues and streams led per node, most first
#
# NODE is 1, 2 or 3 (or warren1@localhost ...). Node N is warren<N>@localhost, with AMQP on
# 127.0.0.1:$((WARREN_CLUSTER_PORT_BASE + N)) (5701-5703), Erlang distribution on 25701-25703 and
# the management API on 15701-15703; all listen on 127.0.0.1 only. Each node has its own config,
# plugins file, data (RABBITMQ_MNESIA_BASE) and logs under $WARREN_CLUSTER_DIR (target/cluster),
# and the three share an Erlang cookie kept there too (HOME points there for every RabbitMQ
# command, so neither ~/.erlang.cookie nor the system node's cookie is touched). The same Debian
# package as the demo's broker (installed when missing); the nodes run as the calling user.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

WARREN_CLUSTER_DIR=${WARREN_CLUSTER_DIR:-$WARREN_ROOT/target/cluster}
WARREN_CLUSTER_PORT_BASE=${WARREN_CLUSTER_PORT_BASE:-5700}
WARREN_CLUSTER_NODES=3
RABBITMQ_BIN=${RABBITMQ_BIN:-/usr/lib/rabbitmq/bin}

node_name() { echo "warren$1@localhost"; }
node_dir() { echo "$WARREN_CLUSTER_DIR/warren$1"; }
amqp_port() { echo $((WARREN_CLUSTER_PORT_BASE + $1)); }
node_url() { echo "amqp://guest:guest@127.0.0.1:$(amqp_port "$1")/%2f"; }

# `1`, `warren1` or `warren1@localhost` -> 1.
node_number() {
    local n=${1#warren}
    n=${n%@*}
    case "$n" in
    [1-9]) [ "$n" -le "$WARREN_CLUSTER_NODES" ] && echo "$n" && return 0 ;;
    esac
    die "no node $1: the nodes are 1 to $WARREN_CLUSTER_NODES"
}

# RabbitMQ's own scripts, not the /usr/sbin wrappers (which switch to the rabbitmq user and read
# /etc/rabbitmq): HOME holds the cluster's cookie; the env file is the node's, so the system
# broker's rabbitmq-env.conf (its NODENAME, its port) does not apply.
rmq() {
    local tool=$1 n=$2
    shift 2
    env HOME="$WARREN_CLUSTER_DIR" RABBITMQ_CONF_ENV_FILE="$(node_dir "$n")/rabbitmq-env.conf" \
        "$RABBITMQ_BIN/$tool" "$@"
}
ctl() {
    local n=$1
    shift
    rmq rabbitmqctl "$n" -n "$(node_name "$n")" "$@"
}

node_pid() {
    local pid_file
    pid_file="$(node_dir "$1")/pid"
    [ -s "$pid_file" ] || return 1
    local pid
    pid=$(cat "$pid_file")
    kill -0 "$pid" 2>/dev/null || return 1
    echo "$pid"
}

node_up() { node_pid "$1" >/dev/null; }

# The open-files limit the nodes get: WARREN_BROKER_NOFILE, capped at this shell's hard limit.
cluster_nofile() {
    local hard
    hard=$(ulimit -Hn)
    if [ "$hard" != unlimited ] && [ "$hard" -lt "$WARREN_BROKER_NOFILE" ]; then
        echo "$hard"
    else
        echo "$WARREN_BROKER_NOFILE"
    fi
}

# Writes node N's files once: its env file, config, plugins.
write_node_files() {
    local n=$1 dir
    dir=$(node_dir "$n")
    mkdir -p "$dir/log" "$dir/mnesia"
    cat >"$dir/rabbitmq-env.conf" <<EOF
# written by deploy/local/cluster.sh: node $n of the local cluster
NODENAME=$(node_name "$n")
DIST_PORT=$((20000 + $(amqp_port "$n")))
CONFIG_FILE=$dir/rabbitmq
ADVANCED_CONFIG_FILE=$dir/advanced.config
ENABLED_PLUGINS_FILE=$dir/enabled_plugins
MNESIA_BASE=$dir/mnesia
LOG_BASE=$dir/log
PID_FILE=$dir/pid
# Erlang distribution on the loopback only, as the system node here does.
SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
EOF
    cat >"$dir/rabbitmq.conf" <<EOF
# written by deploy/local/cluster.sh
listeners.tcp.1 = 127.0.0.1:$(amqp_port "$n")
management.tcp.ip = 127.0.0.1
management.tcp.port = $((10000 + $(amqp_port "$n")))
# A killed node's peers notice within a few seconds rather than the default minute.
net_ticktime = 10
EOF
    # Quorum queues get quorum_cluster_size replicas when declared (3 is RabbitMQ 3.10's default;
    # said here so it does not depend on that). 3.10 has no policy key for it: only this setting
    # or the x-quorum-initial-group-size argument. On 3.13+ a `target-group-size` policy with
    # continuous membership reconciliation also grows a queue back to 3 after a node is replaced
    # (3.10 needs `rabbitmq-queues grow`); RabbitMQ 4 drops classic mirrored queues and can make
    # quorum the vhost's default queue type.
    cat >"$dir/advanced.config" <<EOF
[{rabbit, [{quorum_cluster_size, $WARREN_CLUSTER_NODES}]}].
EOF
    echo '[rabbitmq_management].' >"$dir/enabled_plugins"
}

start_node() {
    local n=$1
    node_up "$n" && return 0
    rm -f "$(node_dir "$n")/pid"
    log "starting $(node_name "$n") on 127.0.0.1:$(amqp_port "$n")"
    (
        ulimit -n "$(cluster_nofile)" 2>/dev/null || true
        export ERL_EPMD_ADDRESS=127.0.0.1
        rmq rabbitmq-server "$n" -detached
    ) >>"$(node_dir "$n")/log/start.out" 2>&1 || die "rabbitmq-server failed for $(node_name "$n"); see $(node_dir "$n")/log/"
}

# Waits for the node's pid file, its distribution and its applications (rabbitmqctl wait).
wait_node() {
    local n=$1 pid_file deadline=$((SECONDS + WARREN_BROKER_WAIT_SECS))
    pid_file="$(node_dir "$n")/pid"
    # `rabbitmqctl wait` gives up ("garbage_in_pid_file") when it reads the file between its
    # creation and its write: wait for the pid to be in it first.
    until [ -s "$pid_file" ]; do
        [ "$SECONDS" -lt "$deadline" ] ||
            die "$(node_name "$n") wrote no pid file within ${WARREN_BROKER_WAIT_SECS}s; see $(node_dir "$n")/log/"
        sleep 0.1
    done
    ctl "$n" wait --timeout "$WARREN_BROKER_WAIT_SECS" "$(node_dir "$n")/pid" >/dev/null ||
        die "$(node_name "$n") did not start within ${WARREN_BROKER_WAIT_SECS}s; see $(node_dir "$n")/log/"
}

fresh_cluster() {
    rm -rf "$WARREN_CLUSTER_DIR"
    mkdir -p "$WARREN_CLUSTER_DIR"
    (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$WARREN_CLUSTER_DIR/.erlang.cookie")
    chmod 400 "$WARREN_CLUSTER_DIR/.erlang.cookie"
    local n
    for n in $(seq "$WARREN_CLUSTER_NODES"); do
        write_node_files "$n"
        start_node "$n"
    done
    for n in $(seq "$WARREN_CLUSTER_NODES"); do wait_node "$n"; done
    for n in $(seq 2 "$WARREN_CLUSTER_NODES"); do
        log "joining $(node_name "$n") to $(node_name 1)"
        ctl "$n" stop_app >/dev/null
        ctl "$n" join_cluster "$(node_name 1)" >/dev/null
        ctl "$n" start_app >/dev/null
    done
    # Streams get a replica on each node. `initial-cluster-size` is a policy key on 3.10 for
    # streams only (quorum queues: advanced.config above). On 3.13+ streams and quorum queues
    # both take it as `initial-cluster-size` / `target-group-size`.
    ctl 1 set_policy --apply-to queues warren-replicas '.*' \
        "{\"initial-cluster-size\":$WARREN_CLUSTER_NODES}" >/dev/null
    ctl 1 await_online_nodes "$WARREN_CLUSTER_NODES" --timeout "$WARREN_BROKER_WAIT_SECS" >/dev/null
}

cmd_start() {
    if ! command -v rabbitmq-server >/dev/null 2>&1 && [ ! -x /usr/sbin/rabbitmq-server ]; then
        install_rabbitmq
    fi
    _ensure_localhost_resolves
    local n any=0
    for n in $(seq "$WARREN_CLUSTER_NODES"); do node_up "$n" && any=1; done
    if [ "$any" -eq 0 ]; then
        fresh_cluster
    else
        # Some nodes run: the cluster exists, start the others into it.
        for n in $(seq "$WARREN_CLUSTER_NODES"); do start_node "$n"; done
        for n in $(seq "$WARREN_CLUSTER_NODES"); do wait_node "$n"; done
    fi
    log "cluster up: WARREN_AMQP_URL=$(cmd_urls)"
}

# Graceful: the node hands its queue leaderships over and closes its connections.
stop_node() {
    local n=$1
    node_up "$n" || return 0
    log "stopping $(node_name "$n")"
    ctl "$n" stop "$(node_dir "$n")/pid" >/dev/null 2>&1 || true
}

cmd_stop() {
    if [ $# -gt 0 ]; then
        stop_node "$(node_number "$1")"
        return 0
    fi
    local n pids=()
    for n in $(seq "$WARREN_CLUSTER_NODES"); do
        stop_node "$n" &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid" || true; done
    # A node that did not stop in time is not left behind.
    for n in $(seq "$WARREN_CLUSTER_NODES"); do
        if pid=$(node_pid "$n"); then kill -9 "$pid" 2>/dev/null || true; fi
    done
    rm -rf "$WARREN_CLUSTER_DIR"
    log "cluster stopped, its data deleted"
}

cmd_kill() {
    local n pid
    n=$(node_number "${1:?usage: cluster.sh kill NODE}")
    pid=$(node_pid "$n") || die "$(node_name "$n") is not running"
    log "SIGKILL $(node_name "$n") (pid $pid)"
    kill -9 "$pid"
    while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
}

cmd_restart() {
    local n
    n=$(node_number "${1:?usage: cluster.sh restart NODE}")
    [ -d "$(node_dir "$n")" ] || die "no cluster in $WARREN_CLUSTER_DIR; run: cluster.sh start"
    stop_node "$n"
    start_node "$n"
    wait_node "$n"
    log "$(node_name "$n") is back"
}

cmd_status() {
    local n pid running=""
    for n in $(seq "$WARREN_CLUSTER_NODES"); do
        if pid=$(node_pid "$n"); then
            echo "$(node_name "$n") up (pid $pid) amqp 127.0.0.1:$(amqp_port "$n") management 127.0.0.1:$((10000 + $(amqp_port "$n")))"
            [ -n "$running" ] || running=$(ctl "$n" eval 'rabbit_nodes:all_running().' 2>/dev/null | tr -d '\n' || true)
        else
            echo "$(node_name "$n") down"
        fi
    done
    [ -z "$running" ] || echo "running in the cluster: $running"
}

cmd_urls() {
    local n urls=()
    for n in $(seq "$WARREN_CLUSTER_NODES"); do urls+=("$(node_url "$n")"); done
    (
        IFS=,
        echo "${urls[*]}"
    )
}

# Quorum queues and streams (names starting with PREFIX) led by each node, most first: "COUNT NODE" lines.
cmd_leaders() {
    local prefix=${1:-} n
    for n in $(seq "$WARREN_CLUSTER_NODES"); do
        node_up "$n" || continue
        ctl "$n" list_queues -q --no-table-headers name leader |
            awk -v p="$prefix" 'index($1, p) == 1 && $2 != "" { print $2 }' | sort | uniq -c | sort -rn
        return 0
    done
    die "no node is up"
}

case "${1:-}" in
start) cmd_start ;;
stop) cmd_stop "${@:2}" ;;
kill) cmd_kill "${2:-}" ;;
restart) cmd_restart "${2:-}" ;;
status) cmd_status ;;
urls) cmd_urls ;;
leaders) cmd_leaders "${2:-}" ;;
*)
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
    exit 64
    ;;
esac
