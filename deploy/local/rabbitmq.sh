#!/usr/bin/env bash
# Makes sure a RabbitMQ answers on 127.0.0.1:5672: returns at once when one does, else installs
# rabbitmq-server from the OS packages if it is missing, starts it with an open-files limit fit
# for thousands of queues (WARREN_BROKER_NOFILE, default 65536, capped by root's hard limit) and
# waits until it has booted. Either way it logs how many queues the broker's limit holds.
# Safe to run any number of times. Set WARREN_AMQP_URL to use a broker of your own instead.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ensure_broker
