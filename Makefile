# payment-worker: `make run` starts a local broker if needed and runs the worker (mock Stripe);
# `make test` runs every check CI runs.

SHELL := /bin/bash
ADVISORY_DB ?= ../shared/advisory-db

.PHONY: run test broker tools lint unit rules chart audit image chaos bench fuzz

## Start the local broker if needed, then run the worker on its default setup.
run: export RABBITMQ_URI ?= amqp://guest:guest@127.0.0.1:5672/%2f
run: export HTTP_ADDR ?= 127.0.0.1:8080
run: export LOG_FORMAT ?= text
run: broker
	cargo run --release -- run

## Everything CI checks: formatting, lints, all tests against the real broker, the audit.
test: broker tools lint unit rules chart audit

broker:
	@scripts/ensure-rabbitmq.sh

tools:
	@scripts/ensure-debian-tools.sh

lint: tools
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --locked -- -D warnings
	test -z "$$(gofmt -l tests/go)" || { gofmt -l tests/go; exit 1; }
	GO111MODULE=off GOPATH=/usr/share/gocode GOPROXY=off go vet ./tests/go/gopeer

unit: broker tools
	cargo test --workspace --locked -- --show-output

## The long chaos run (not part of `make test`). Size it with CHAOS_TRIPS, CHAOS_SECONDS,
## CHAOS_KILLS, CHAOS_BROKER_RESTARTS, CHAOS_CUTS, CHAOS_STRIPE_OUTAGES, CHAOS_PODS;
## CHAOS_CLUSTER=3 runs it on a three-node cluster (node kills instead of broker restarts).
chaos: broker
	cargo test --release --locked --test chaos chaos_soak -- --ignored --nocapture

## The fuzz targets (src/fuzz.rs, seeds in fuzz/corpus/), each for FUZZ_SECONDS; `make test`
## runs FUZZ_CASES of each instead.
fuzz: FUZZ_SECONDS ?= 60
fuzz:
	FUZZ_SECONDS=$(FUZZ_SECONDS) cargo test --locked --lib fuzz:: -- --test-threads 1 --nocapture

## The alert rules: syntax, then their unit tests.
rules: tools
	promtool check rules helm/payment-worker/files/alerts.yaml
	cd monitoring && promtool test rules alerts.test.yaml

## Benchmarks (not part of `make test`); the Markdown report also lands in target/bench-results.md.
bench: broker
	set -o pipefail; cargo bench --locked --bench worker | tee target/bench-results.md

## The Helm chart, offline: lint, render, schema-validate, and the chart checks.
chart:
	scripts/check-chart.sh

## The container image (needs a Docker engine, which CI machines do not have).
image:
	docker build -t payment-worker:$$(cargo pkgid | sed 's/.*[#@]//') .

audit:
	@scripts/ensure-cargo-audit.sh
	@if [ -d "$(ADVISORY_DB)" ]; then \
	  echo "cargo audit against the snapshot in $(ADVISORY_DB)"; \
	  cargo audit --db "$(ADVISORY_DB)" --no-fetch --deny warnings; \
	else \
	  cargo audit --deny warnings; \
	fi
