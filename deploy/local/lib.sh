# shellcheck shell=bash
# Shared helpers for the local scripts (demo.sh, test.sh, rabbitmq.sh). Source it; do not run it.
#
# The one job here: make sure a RabbitMQ answers on 127.0.0.1:5672 (and that python3 exists), on a
# machine where it may already run, be installed but stopped, or be missing. Targets Debian/Ubuntu:
# packages come from apt, and the broker is started without systemd when there is none (containers).

WARREN_BROKER_HOST=127.0.0.1
WARREN_BROKER_PORT=5672
# RabbitMQ's management API (plugin rabbitmq_management), for unacked counts.
WARREN_MANAGEMENT_PORT=15672
# How long to wait for a broker we started before giving up.
WARREN_BROKER_WAIT_SECS=${WARREN_BROKER_WAIT_SECS:-60}
# The open-files limit a broker we start gets. A quorum queue holds about 3 file handles, and a
# node out of handles hangs every new connection in the AMQP handshake (docs/deploy.md "Open
# files"): the usual default of 1,024 fills at about 300 quorum queues, 65,536 holds some 19,000.
WARREN_BROKER_NOFILE=${WARREN_BROKER_NOFILE:-65536}
# Below this limit, a running local broker is reported as too small (about 3,000 quorum queues).
WARREN_BROKER_NOFILE_MIN=${WARREN_BROKER_NOFILE_MIN:-10000}

# The repo root, whichever directory the calling script was started from.
# shellcheck disable=SC2034 # used by the scripts that source this file
WARREN_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

log() { echo "[warren] $*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# Runs a command as root: directly when we are root, else through sudo when there is one.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root for: $* (run as root or install sudo)"
    fi
}

# True when something accepts TCP connections on host:port. bash's /dev/tcp needs no extra tool;
# `timeout` keeps a filtered port from hanging us for the kernel's connect timeout.
port_answers() {
    timeout 2 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null
}

_warren_apt_updated=0

# apt-get install with no prompts. The package lists are refreshed once per script run: on a fresh
# machine they are often empty or stale, and then install fails with "Unable to locate package".
apt_install() {
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install $* yourself (see README)"
    if [ "$_warren_apt_updated" -eq 0 ]; then
        log "apt-get update"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        _warren_apt_updated=1
    fi
    log "apt-get install $*"
    # sudo drops the environment, hence `env` to carry DEBIAN_FRONTEND through it.
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

ensure_python3() {
    command -v python3 >/dev/null 2>&1 && return 0
    log "python3 not found; installing it"
    apt_install python3
    command -v python3 >/dev/null 2>&1 || die "python3 still missing after install"
}

# The console's browser test drives Debian's chromium through chromedriver (both from the OS
# packages; nothing is downloaded at test time).
ensure_chromium() {
    command -v chromedriver >/dev/null 2>&1 && command -v chromium >/dev/null 2>&1 && return 0
    log "chromium or chromedriver not found; installing them from the OS packages (for the console's browser test)"
    apt_install chromium chromium-driver
    command -v chromedriver >/dev/null 2>&1 || die "chromedriver still missing after install"
}

# A policy-rc.d that says 101 ("action forbidden") stops a package's postinst from starting its
# service. Without systemd (a container) that start fails or hangs; with systemd we start the
# service ourselves afterwards anyway. We only add one when none exists, and always remove ours.
_warren_policy_rc=/usr/sbin/policy-rc.d
_warren_policy_rc_ours=0

_block_service_starts() {
    [ -e "$_warren_policy_rc" ] && return 0
    as_root sh -c "printf '#!/bin/sh\n# temporary, from warren deploy/local/lib.sh\nexit 101\n' > $_warren_policy_rc && chmod 755 $_warren_policy_rc"
    _warren_policy_rc_ours=1
}

_unblock_service_starts() {
    if [ "$_warren_policy_rc_ours" -eq 1 ]; then
        as_root rm -f "$_warren_policy_rc"
        _warren_policy_rc_ours=0
    fi
}

# The dashboard test runs a real Prometheus against a live local cluster. Its package would start
# a daemon on :9090 that nothing here needs, hence the blocked service start.
ensure_prometheus() {
    command -v prometheus >/dev/null 2>&1 && return 0
    log "prometheus not found; installing it from the OS packages (for the dashboard test)"
    _block_service_starts
    trap '_unblock_service_starts; exit 130' INT TERM
    local rc=0
    apt_install prometheus || rc=$?
    _unblock_service_starts
    trap - INT TERM
    [ "$rc" -eq 0 ] || die "installing prometheus failed (exit $rc)"
    command -v prometheus >/dev/null 2>&1 || die "prometheus still missing after install"
}

# RabbitMQ's management API on 127.0.0.1:15672: the only source of unacked counts (`warren queues`,
# the supervisor; docs/config.md `management_url`). Enabling the plugin on a running node needs no
# restart. Skipped for a broker elsewhere (WARREN_AMQP_URL): set WARREN_MANAGEMENT_URL for it.
ensure_management() {
    if [ -n "${WARREN_MANAGEMENT_URL:-}" ]; then
        log "management API: $WARREN_MANAGEMENT_URL (from WARREN_MANAGEMENT_URL)"
        return 0
    fi
    if ! _broker_is_local; then
        log "WARREN_AMQP_URL points elsewhere; set WARREN_MANAGEMENT_URL for its management API"
        return 0
    fi
    if port_answers "$WARREN_BROKER_HOST" "$WARREN_MANAGEMENT_PORT"; then
        return 0
    fi
    if ! _rabbitmq_booted; then
        log "no local RabbitMQ node to enable the management plugin on; set WARREN_MANAGEMENT_URL"
        return 0
    fi
    log "enabling the rabbitmq_management plugin (for unacked queue counts)"
    as_root rabbitmq-plugins enable --quiet rabbitmq_management >/dev/null ||
        die "rabbitmq-plugins enable rabbitmq_management failed"
    local deadline=$((SECONDS + WARREN_BROKER_WAIT_SECS))
    until port_answers "$WARREN_BROKER_HOST" "$WARREN_MANAGEMENT_PORT"; do
        [ "$SECONDS" -ge "$deadline" ] &&
            die "the management API did not answer on $WARREN_BROKER_HOST:$WARREN_MANAGEMENT_PORT within ${WARREN_BROKER_WAIT_SECS}s"
        sleep 1
    done
    log "management API answers on $WARREN_BROKER_HOST:$WARREN_MANAGEMENT_PORT"
}

install_rabbitmq() {
    log "rabbitmq-server not found; installing it from the OS packages"
    _block_service_starts
    # Ctrl-C during the install must not leave our policy-rc.d behind: it would silently stop
    # every later package from starting its service.
    trap '_unblock_service_starts; exit 130' INT TERM
    local rc=0
    apt_install rabbitmq-server || rc=$?
    _unblock_service_starts
    trap - INT TERM
    [ "$rc" -eq 0 ] || die "installing rabbitmq-server failed (exit $rc)"

    # The node is named rabbit@<short hostname>, and Erlang distribution refuses to start when
    # that name does not resolve (common in containers). Only then, on this fresh install, name the
    # node rabbit@localhost instead; an explicit NODENAME already in the file is left alone.
    local env_conf=/etc/rabbitmq/rabbitmq-env.conf
    if ! getent hosts "$(hostname -s)" >/dev/null 2>&1 &&
        ! grep -qs '^[[:space:]]*NODENAME=' "$env_conf"; then
        log "hostname $(hostname -s) does not resolve; naming the node rabbit@localhost in $env_conf"
        as_root sh -c "mkdir -p /etc/rabbitmq && printf '%s\n' '# added by warren deploy/local/lib.sh: the hostname does not resolve' 'NODENAME=rabbit@localhost' >> $env_conf"
    fi
}

# True when the local node is up and has finished booting (the CLI talks to it over Erlang
# distribution, not AMQP). Only root and the rabbitmq user may run the CLI on Debian.
_rabbitmq_booted() {
    as_root rabbitmq-diagnostics -q check_running >/dev/null 2>&1
}

# The node may be named rabbit@localhost (see install_rabbitmq), and Erlang must resolve that host
# or the node dies at boot with {epmd_error,"localhost",nxdomain}. A root with no /etc/hosts at
# all (a debootstrap'd chroot, some minimal images) does not resolve even localhost. Add the line
# every Debian system normally has, and only when localhost does not resolve. Done here rather than
# in install_rabbitmq so that a rerun after such a failed first start fixes it too.
_ensure_localhost_resolves() {
    getent hosts localhost >/dev/null 2>&1 && return 0
    log "localhost does not resolve; adding '127.0.0.1 localhost' to /etc/hosts"
    as_root sh -c "printf '127.0.0.1\tlocalhost\n' >> /etc/hosts"
}

_has_systemd() {
    [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1
}

# Writes $2 and a newline to file $1 as root, unless the file holds exactly that already (so a
# rerun changes nothing). True when it wrote.
_write_root_file() {
    local path=$1 content=$2
    if [ -r "$path" ] && [ "$(cat "$path")" = "$content" ]; then
        return 1
    fi
    as_root mkdir -p "$(dirname "$path")"
    printf '%s\n' "$content" | as_root tee "$path" >/dev/null
}

# Where the open-files limit of a broker we start is set (variables, so a test can point them
# elsewhere): PAM's limits for the rabbitmq user without systemd, a drop-in with it.
_warren_limits_conf=/etc/security/limits.d/warren-rabbitmq.conf
_warren_systemd_dropin=/etc/systemd/system/rabbitmq-server.service.d/limits.conf

# The open-files limit a broker started without systemd can get: WARREN_BROKER_NOFILE, capped at
# root's hard limit (in a container root may not raise it, and PAM then ignores a higher value).
broker_nofile_target() {
    local hard
    hard=$(as_root sh -c 'ulimit -Hn')
    if [ "$hard" != unlimited ] && [ "$hard" -lt "$WARREN_BROKER_NOFILE" ]; then
        echo "$hard"
    else
        echo "$WARREN_BROKER_NOFILE"
    fi
}

# Without systemd, rabbitmq-server run as root switches to the rabbitmq user with `su`, whose PAM
# session (pam_limits) resets the open-files limit from /etc/security/limits.*: a `ulimit -n`
# before it is lost, a limits.d entry for the rabbitmq user is not. Prints the limit it set.
_raise_broker_nofile_pam() {
    local n
    n=$(broker_nofile_target)
    if _write_root_file "$_warren_limits_conf" "# written by warren deploy/local/lib.sh: open files for RabbitMQ (docs/deploy.md \"Open files\")
rabbitmq soft nofile $n
rabbitmq hard nofile $n"; then
        log "set the rabbitmq user's open-files limit to $n in $_warren_limits_conf"
    fi
    if [ "$n" -lt "$WARREN_BROKER_NOFILE" ]; then
        log "open files for RabbitMQ: $n, not $WARREN_BROKER_NOFILE: root's hard limit here (ulimit -Hn) is $n and cannot be raised from inside (a container: see docs/deploy.md \"Open files\")"
    fi
    echo "$n"
}

# With systemd the unit's LimitNOFILE counts (Debian's unit sets 65536); a drop-in raises a lower
# one. systemd may set any limit, so no cap applies.
_raise_broker_nofile_systemd() {
    local current
    current=$(as_root systemctl show -p LimitNOFILE rabbitmq-server 2>/dev/null || true)
    current=${current#LimitNOFILE=}
    if [ "$current" = infinity ] || { [ -n "$current" ] && [ "$current" -ge "$WARREN_BROKER_NOFILE" ] 2>/dev/null; }; then
        return 0
    fi
    if _write_root_file "$_warren_systemd_dropin" "# written by warren deploy/local/lib.sh: open files for RabbitMQ (docs/deploy.md \"Open files\")
[Service]
LimitNOFILE=$WARREN_BROKER_NOFILE"; then
        log "set LimitNOFILE=$WARREN_BROKER_NOFILE for rabbitmq-server in $_warren_systemd_dropin"
        as_root systemctl daemon-reload
    fi
}

# The open-files limit the running local node has: fd_total from the management API when it
# answers (no root needed), else the beam process's own limit in /proc. Fails when unknown.
broker_nofile_now() {
    local answer limit pid
    if command -v curl >/dev/null 2>&1 && port_answers "$WARREN_BROKER_HOST" "$WARREN_MANAGEMENT_PORT"; then
        if answer=$(curl -fsS --max-time 5 -u guest:guest \
            "http://$WARREN_BROKER_HOST:$WARREN_MANAGEMENT_PORT/api/nodes?columns=fd_total" 2>/dev/null); then
            limit=$(printf '%s' "$answer" | grep -o '"fd_total":[0-9]*' | head -n 1 | cut -d: -f2 || true)
            if [ -n "$limit" ]; then
                echo "$limit"
                return 0
            fi
        fi
    fi
    # That needs root; never ask for a password just to report a figure.
    if [ "$(id -u)" -ne 0 ] && ! sudo -n true 2>/dev/null; then
        return 1
    fi
    pid=$(as_root rabbitmq-diagnostics -q status --formatter json 2>/dev/null |
        grep -o '"pid":[0-9]*' | head -n 1 | cut -d: -f2 || true)
    [ -n "$pid" ] || return 1
    as_root cat "/proc/$pid/limits" 2>/dev/null |
        awk '/^Max open files/ { print $4; found = 1 } END { exit !found }'
}

# Set when this script started the broker (start_rabbitmq): only then may it say the limit is ours.
_warren_started_broker=0

# Logs how big a namespace the local broker's open-files limit holds, and, when it is low, what
# to do. False when the limit is known and low.
check_broker_nofile() {
    local limit queues
    if ! limit=$(broker_nofile_now) || [ -z "$limit" ]; then
        log "could not read the local RabbitMQ's open-files limit; check it with: rabbitmqctl status (File Descriptors), or warren topology plan"
        return 0
    fi
    # About 90% of the limit is usable, at about 3 handles per quorum queue; a pipeline of 3
    # steps with the default 3 priorities, 4 shards and 2 hot lanes is 54 queues.
    queues=$((limit * 9 / 10 / 3))
    if [ "$limit" -ge "$WARREN_BROKER_NOFILE_MIN" ]; then
        log "RabbitMQ's open-files limit is $limit: room for about $queues quorum queues ($((queues / 54)) pipelines of 3 steps with the default 4 shards and 2 hot lanes)"
        return 0
    fi
    log "warning: the local RabbitMQ's open-files limit is only $limit: about $queues quorum queues ($((queues / 54)) pipelines of 3 steps with the default 4 shards and 2 hot lanes) fill it, and then every new connection hangs (docs/deploy.md \"Open files\")"
    if [ "$_warren_started_broker" -eq 1 ]; then
        log "this script started it but could not raise the limit; see the lines above and docs/deploy.md \"Open files\""
    elif _has_systemd; then
        log "to raise it: stop it (as root: systemctl stop rabbitmq-server), then run deploy/local/rabbitmq.sh again (it restarts RabbitMQ with LimitNOFILE=$WARREN_BROKER_NOFILE); queues and messages are kept"
    else
        log "to raise it: stop it (as root: rabbitmqctl stop), then run deploy/local/rabbitmq.sh again (it restarts RabbitMQ with a limit of up to $WARREN_BROKER_NOFILE); queues and messages are kept"
    fi
    return 1
}

# Stops the local node and starts it again with the open-files limit start_rabbitmq gives. Durable
# queues and their messages survive; clients connected now are cut off.
restart_rabbitmq() {
    log "restarting the local RabbitMQ to raise its open-files limit (durable queues and messages are kept; WARREN_BROKER_RESTART=0 leaves a running broker alone)"
    if _has_systemd && as_root systemctl is-active --quiet rabbitmq-server; then
        as_root systemctl stop rabbitmq-server
    else
        as_root rabbitmqctl stop >/dev/null 2>&1 || die "rabbitmqctl stop failed; stop RabbitMQ yourself and run deploy/local/rabbitmq.sh"
    fi
    # `rabbitmqctl stop` may return before the node has let go of its port.
    local deadline=$((SECONDS + WARREN_BROKER_WAIT_SECS))
    while port_answers "$WARREN_BROKER_HOST" "$WARREN_BROKER_PORT" || _rabbitmq_booted; do
        [ "$SECONDS" -lt "$deadline" ] || die "RabbitMQ did not stop within ${WARREN_BROKER_WAIT_SECS}s"
        sleep 1
    done
    start_rabbitmq
    wait_for_rabbitmq
}

start_rabbitmq() {
    # A node that is running but not (yet) listening must not be started twice.
    if _rabbitmq_booted; then
        log "RabbitMQ node is running but $WARREN_BROKER_HOST:$WARREN_BROKER_PORT does not answer yet"
        return 0
    fi
    _ensure_localhost_resolves
    _warren_started_broker=1
    if _has_systemd; then
        _raise_broker_nofile_systemd
        log "starting RabbitMQ (systemctl start rabbitmq-server)"
        as_root systemctl start rabbitmq-server
    else
        local nofile
        nofile=$(_raise_broker_nofile_pam)
        # No systemd (a container): run it as a daemon. Its own logs are in /var/log/rabbitmq/.
        # The ulimit serves a `su` without pam_limits, which keeps the caller's limits.
        log "starting RabbitMQ (rabbitmq-server -detached, open files $nofile)"
        as_root sh -c "ulimit -n $nofile 2>/dev/null; exec rabbitmq-server -detached" >/dev/null 2>&1 ||
            die "rabbitmq-server -detached failed; see /var/log/rabbitmq/"
    fi
}

# Waits until AMQP answers and the node reports it has booted. The port opens near the end of the
# boot, but plugins and queue recovery may still be running then, hence the second check.
wait_for_rabbitmq() {
    local deadline=$((SECONDS + WARREN_BROKER_WAIT_SECS))
    log "waiting up to ${WARREN_BROKER_WAIT_SECS}s for RabbitMQ on $WARREN_BROKER_HOST:$WARREN_BROKER_PORT"
    until port_answers "$WARREN_BROKER_HOST" "$WARREN_BROKER_PORT"; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            die "RabbitMQ did not answer on $WARREN_BROKER_HOST:$WARREN_BROKER_PORT within ${WARREN_BROKER_WAIT_SECS}s; see /var/log/rabbitmq/ and /var/lib/rabbitmq/erl_crash.dump (a node whose app was stopped needs: rabbitmqctl start_app)"
        fi
        sleep 1
    done
    until _rabbitmq_booted; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            die "RabbitMQ answers on port $WARREN_BROKER_PORT but did not finish booting within ${WARREN_BROKER_WAIT_SECS}s; see /var/log/rabbitmq/"
        fi
        sleep 1
    done
    log "RabbitMQ is up"
}

# False when WARREN_AMQP_URL (which warren itself reads too) names a broker of your own elsewhere:
# then there is nothing to install, start or configure here.
_broker_is_local() {
    [ -z "${WARREN_AMQP_URL:-}" ] && return 0
    local rest=${WARREN_AMQP_URL#*://}
    rest=${rest%%/*} # host part only: user:pass@host:port
    rest=${rest##*@} # drop the credentials
    case "$rest" in
    127.0.0.1 | localhost | 127.0.0.1:5672 | localhost:5672) return 0 ;;
    *) return 1 ;;
    esac
}

# Makes sure a RabbitMQ answers on 127.0.0.1:5672: nothing to do when one does (the fast path),
# else install it if missing, start it with an open-files limit fit for thousands of queues and
# wait for it. Either way, logs how many queues the broker's limit holds.
ensure_broker() {
    if ! _broker_is_local; then
        log "WARREN_AMQP_URL points elsewhere; not managing a local broker"
        return 0
    fi
    if port_answers "$WARREN_BROKER_HOST" "$WARREN_BROKER_PORT"; then
        log "RabbitMQ answers on $WARREN_BROKER_HOST:$WARREN_BROKER_PORT"
        # A broker started from a shell has 1,024 open files, which the test suite and a few
        # pipelines outgrow; every new connection would then hang. Restart it with room.
        if ! check_broker_nofile && _may_restart_for_room; then
            restart_rabbitmq
            check_broker_nofile || true
        fi
        return 0
    fi
    if ! command -v rabbitmq-server >/dev/null 2>&1 && [ ! -x /usr/sbin/rabbitmq-server ]; then
        install_rabbitmq
    fi
    start_rabbitmq
    wait_for_rabbitmq
    check_broker_nofile || true
}

# True when a restart is allowed (WARREN_BROKER_RESTART is not 0), possible (root, or sudo without
# a password) and worth it: the limit it would get is more than twice today's. In a container whose
# hard limit is low a restart gains nothing, and every run would otherwise restart again.
_may_restart_for_room() {
    [ "${WARREN_BROKER_RESTART:-1}" != 0 ] || return 1
    [ "$(id -u)" -eq 0 ] || sudo -n true 2>/dev/null || return 1
    local now target
    now=$(broker_nofile_now) || return 1
    target=$(broker_nofile_target)
    [ "$now" -lt $((target / 2)) ]
}
