#!/usr/bin/env bash
# Installs cargo-audit (once per machine) when it is missing.
set -euo pipefail
if ! cargo audit --version >/dev/null 2>&1; then
  echo "installing cargo-audit (once; a few minutes)" >&2
  cargo install --locked --quiet cargo-audit
fi
