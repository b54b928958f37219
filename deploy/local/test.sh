#!/usr/bin/env bash
# Runs the whole test suite: makes sure the local RabbitMQ the integration tests talk to answers
# (installing and starting it when needed, with its management plugin for the unacked-count
# tests), that Prometheus is installed (the dashboard test runs one) and python3 (the custom worker
# example's steps and the console test's step), chromium and chromedriver (the console's browser
# test), then
# `cargo test --workspace`. Extra arguments go to
# cargo test, e.g. `deploy/local/test.sh -p warren-common` or `deploy/local/test.sh -- --nocapture`.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

cd "$WARREN_ROOT"
command -v cargo >/dev/null 2>&1 || die "cargo not found; install Rust (https://rustup.rs)"
ensure_broker
ensure_management
ensure_prometheus
ensure_python3
ensure_chromium

exec cargo test --workspace "$@"
