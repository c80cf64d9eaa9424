# payment-worker: `make run` starts a local broker if needed and runs the worker (mock Stripe);
# `make test` runs every check CI runs.

SHELL := /bin/bash
ADVISORY_DB ?= ../shared/advisory-db
export RABBITMQ_URI ?= amqp://guest:guest@127.0.0.1:5672/%2f
export HTTP_ADDR ?= 127.0.0.1:8080
export LOG_FORMAT ?= text

.PHONY: run test broker tools lint unit rules audit

## Start the local broker if needed, then run the worker on its default setup.
run: broker
	cargo run --release -- run

## Everything CI checks: formatting, lints, all tests against the real broker, the audit.
test: broker tools lint unit rules audit

broker:
	@scripts/ensure-rabbitmq.sh

tools:
	@scripts/ensure-debian-tools.sh

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --locked -- -D warnings

unit: broker tools
	cargo test --workspace --locked

## The alert rules: syntax, then their unit tests.
rules: tools
	promtool check rules helm/payment-worker/files/alerts.yaml
	cd monitoring && promtool test rules alerts.test.yaml

audit:
	@scripts/ensure-cargo-audit.sh
	@if [ -d "$(ADVISORY_DB)" ]; then \
	  echo "cargo audit against the snapshot in $(ADVISORY_DB)"; \
	  cargo audit --db "$(ADVISORY_DB)" --no-fetch --deny warnings; \
	else \
	  cargo audit --deny warnings; \
	fi
