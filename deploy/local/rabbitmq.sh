#!/usr/bin/env bash
# Makes sure a RabbitMQ answers on 127.0.0.1:5672: returns at once when one does, else installs
# rabbitmq-server from the OS packages if it is missing, starts it and waits until it has booted.
# Safe to run any number of times. Set WARREN_AMQP_URL to use a broker of your own instead.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ensure_broker
