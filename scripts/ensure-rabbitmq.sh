#!/usr/bin/env bash
# Makes sure a RabbitMQ broker answers on 127.0.0.1:5672: installs Debian's rabbitmq-server if
# it is missing, starts it if it is stopped, and waits until it is up. Idempotent.
set -euo pipefail

port_open() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }

if port_open; then
  exit 0
fi

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v rabbitmq-server >/dev/null 2>&1; then
  echo "rabbitmq-server is not installed; installing Debian's package" >&2
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null
fi

if ! port_open; then
  echo "starting the local RabbitMQ" >&2
  as_root rabbitmq-server -detached >/dev/null 2>&1 || true
  as_root rabbitmqctl await_startup --timeout 120 >/dev/null
fi

for _ in $(seq 1 100); do
  port_open && exit 0
  sleep 0.2
done
echo "RabbitMQ did not open 127.0.0.1:5672" >&2
exit 1
