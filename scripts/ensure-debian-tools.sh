#!/usr/bin/env bash
# Installs the Debian packages the tests use when they are missing:
#   prometheus (the server for the end-to-end scrape test, and promtool);
#   golang-go and golang-github-rabbitmq-amqp091-go-dev (the Go peer of the differential
#   wire tests, tests/go/gopeer, built offline with GO111MODULE=off);
#   openssl (issues the v1 certificate the TLS settings test refuses).
set -euo pipefail
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
missing=()
command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
command -v go >/dev/null 2>&1 || missing+=(golang-go)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
[ -d /usr/share/gocode/src/github.com/rabbitmq/amqp091-go ] || missing+=(golang-github-rabbitmq-amqp091-go-dev)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing Debian packages: ${missing[*]}" >&2
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
