#!/usr/bin/env bash
# Checks the Helm chart offline: lint, render every values file under ci/, validate each render
# against the Kubernetes schemas, then scripts/check_chart.py for what schemas cannot see.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-chart-tools.sh
helm=.tools/bin/helm
chart=helm/payment-worker
kube_version=1.30.0
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

"$helm" lint --strict "$chart" -f "$chart/ci/default-values.yaml"
for values in "$chart"/ci/*.yaml; do
  name=$(basename "$values" .yaml)
  "$helm" template payment-worker "$chart" --namespace payments -f "$values" > "$out/$name.yaml"
  # Custom resources (ServiceMonitor, PrometheusRule) have no schema there; the next step checks them.
  .tools/venv/bin/kubernetes-validate -k "$kube_version" --strict --quiet "$out/$name.yaml"
  echo "rendered and validated: $name"
done
.tools/venv/bin/python scripts/check_chart.py "$helm" "$chart" "$out"
