#!/usr/bin/env bash
# Checks the deployment artefacts with real tools (installed by install-tools.sh):
#  - deploy/*.yaml and every object the operator renders for each example
#    KvCluster, against the Kubernetes schemas of the oldest and newest
#    supported minor versions (kubernetes-validate --strict);
#  - KvCluster examples against the schema of the generated CRD
#    (check-jsonschema): deploy/examples/*.yaml must pass, and each
#    deploy/examples/invalid/*.yaml must fail, except those whose rule is a CEL
#    rule (marked "(CEL rule" in their first line), which JSON Schema cannot
#    express and operator/tests/k8s_cel.rs evaluates instead;
#  - yamllint on deploy/.
set -euo pipefail
cd "$(dirname "$0")/.."
tools="${KV_TOOLS_DIR:-$PWD/.tools}"
bin="$tools/venv/bin"
k8s_versions=(1.33.0 1.37.0)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failures=0
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }

echo "==> building kv-operator (render)"
cargo build -q -p kv-operator --locked
operator="${CARGO_TARGET_DIR:-target}/debug/kv-operator"

echo "==> rendering the objects of every example KvCluster"
for ex in deploy/examples/*.yaml; do
  "$operator" render -f "$ex" > "$work/rendered-$(basename "$ex")" || fail "kv-operator render -f $ex"
done

echo "==> generated CRD is the checked-in one"
"$operator" crd | diff -u deploy/crd.yaml - >/dev/null || fail "deploy/crd.yaml differs from 'kv-operator crd'"

for v in "${k8s_versions[@]}"; do
  echo "==> kubernetes-validate --strict -k $v"
  for f in deploy/namespace.yaml deploy/rbac.yaml deploy/operator.yaml deploy/crd.yaml "$work"/rendered-*.yaml; do
    out=$("$bin/kubernetes-validate" --strict --quiet -k "$v" "$f" 2>&1) || { echo "$out"; fail "$f is not a valid Kubernetes $v object"; }
  done
done

echo "==> KvCluster examples against the CRD schema (check-jsonschema)"
"$bin/python" scripts/crd-schema.py deploy/crd.yaml > "$work/kvcluster.schema.json"
for ex in deploy/examples/*.yaml; do
  "$bin/check-jsonschema" --schemafile "$work/kvcluster.schema.json" "$ex" >/dev/null || fail "$ex does not match the CRD schema"
done
checked=0
for ex in deploy/examples/invalid/*.yaml; do
  if head -1 "$ex" | grep -q '(CEL rule'; then continue; fi
  checked=$((checked + 1))
  if "$bin/check-jsonschema" --schemafile "$work/kvcluster.schema.json" "$ex" >/dev/null 2>&1; then
    fail "$ex is invalid but the CRD schema accepts it"
  fi
done
[ "$checked" -gt 0 ] || fail "no invalid example was checked against the schema"
echo "    $checked invalid examples refused by the schema"

echo "==> yamllint deploy/"
"$bin/yamllint" -d '{extends: relaxed, rules: {line-length: disable}}' deploy/ || fail "yamllint deploy/"

if [ "$failures" -gt 0 ]; then
  echo "deployment checks: $failures failed"
  exit 1
fi
echo "deployment checks: all passed"
