#!/bin/sh
# Start a local RabbitMQ node for Chorus in the background and print the
# coordinator's AMQP URL (first line of stdout). All options go to
# `chorus-broker up`, e.g.:  deploy/rabbitmq/run-local.sh --participants alice,bob
# Stop it with: chorus-broker down
# On a machine with less than 1GB of free disk, lower the disk alarm first, e.g.
#   CHORUS_DISK_FREE_LIMIT=200MB deploy/rabbitmq/run-local.sh
set -eu
# Relative paths (the default --dir .chorus/rabbitmq) are taken from the repository root.
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
if [ -x "$root/.venv/bin/chorus-broker" ]; then
    exec "$root/.venv/bin/chorus-broker" up "$@"
fi
exec chorus-broker up "$@"
