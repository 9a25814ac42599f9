#!/usr/bin/env bash
# End-to-end on a kind cluster: build the images, load them, install the chart,
# create a KvCluster, write keys, fail a node through spec.faultInjection, read
# everything back, recover, wait for Available, verify, tear down.
#   deploy/kind/e2e.sh            (needs docker, kind, kubectl, helm, curl)
#   KEEP_CLUSTER=1 deploy/kind/e2e.sh   leave the cluster up afterwards
set -euo pipefail
cd "$(dirname "$0")/../.."
cluster=kvstore-e2e
ns=kvstore-system
app_ns=kvstore-e2e
tag="${KV_IMAGE_TAG:-e2e}"
keys=50
log() { printf '\n[e2e %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
die() { printf 'E2E FAILED: %s\n' "$*" >&2; dump; exit 1; }
dump() {
  kubectl get kvc,sts,pods,svc,pvc -n "$app_ns" -o wide 2>/dev/null || true
  kubectl describe kvc demo -n "$app_ns" 2>/dev/null | tail -40 || true
  kubectl logs -n "$ns" -l app.kubernetes.io/name=kv-operator --tail=100 2>/dev/null || true
}
pf_pid=
cleanup() {
  [ -n "$pf_pid" ] && kill "$pf_pid" 2>/dev/null || true
  if [ "${KEEP_CLUSTER:-0}" != 1 ]; then kind delete cluster --name "$cluster" || true; fi
}
trap cleanup EXIT

for t in docker kind kubectl helm curl; do
  command -v "$t" >/dev/null || die "$t not on PATH"
done

log "images kvstore/kv-node:$tag, kvstore/kv-operator:$tag"
KV_IMAGE_TAG="$tag" scripts/build-images.sh

log "kind cluster $cluster"
kind delete cluster --name "$cluster" >/dev/null 2>&1 || true
kind create cluster --config deploy/kind/cluster.yaml --wait 120s
for img in kv-node kv-operator; do
  kind load docker-image --name "$cluster" "kvstore/$img:$tag"
done

log "helm install (operator, CRD)"
helm install kvstore charts/kvstore -n "$ns" --create-namespace --wait --timeout 180s \
  --set operator.image.tag="$tag" --set operator.image.pullPolicy=Never
kubectl get crd kvclusters.kvstore.dev >/dev/null || die "CRD not installed"

log "KvCluster demo: 3 nodes, factor 2, W=One, R=One"
kubectl create namespace "$app_ns"
kubectl apply -n "$app_ns" -f - <<YAML
apiVersion: kvstore.dev/v1alpha1
kind: KvCluster
metadata:
  name: demo
spec:
  replicas: 3
  image: kvstore/kv-node:$tag
  imagePullPolicy: Never
  replication: {strategy: ConsistentHashing, factor: 2, writeConsistency: One, readConsistency: One}
  storage: {size: 1Gi}
YAML
kubectl wait -n "$app_ns" --for=condition=Available kvc/demo --timeout=300s || die "demo never Available"

token="$(kubectl get secret -n "$app_ns" demo-auth -o jsonpath='{.data.token}' | base64 -d)"
[ -n "$token" ] || die "no token in Secret demo-auth"
start_port_forward() {
  [ -n "$pf_pid" ] && kill "$pf_pid" 2>/dev/null || true
  kubectl port-forward -n "$app_ns" svc/demo 17400:7400 >/dev/null 2>&1 &
  pf_pid=$!
  for _ in $(seq 1 50); do
    curl -fsS -o /dev/null http://127.0.0.1:17400/healthz 2>/dev/null && return 0
    sleep 0.2
  done
  die "port-forward to svc/demo did not answer"
}
kv() { curl -fsS -H "Authorization: Bearer $token" "$@"; }

start_port_forward
log "write $keys keys"
for i in $(seq 1 "$keys"); do
  kv -X PUT --data-binary "value-$i" "http://127.0.0.1:17400/v1/kv/key-$i" >/dev/null || die "PUT key-$i"
done

log "fail node 1 (spec.faultInjection.failedNodes: [1])"
kubectl patch kvc demo -n "$app_ns" --type merge -p '{"spec":{"faultInjection":{"failedNodes":[1]}}}'
for _ in $(seq 1 60); do
  state="$(kubectl get kvc demo -n "$app_ns" -o jsonpath='{.status.nodes[?(@.ordinal==1)].state}')"
  [ "$state" = Failed ] && break
  sleep 2
done
[ "$state" = Failed ] || die "node 1 is '$state', not Failed"
phase="$(kubectl get kvc demo -n "$app_ns" -o jsonpath='{.status.phase}')"
[ "$phase" = Degraded ] || die "phase is '$phase' with a failed node, not Degraded"

log "read every key with node 1 down; write more"
start_port_forward
for i in $(seq 1 "$keys"); do
  got="$(kv "http://127.0.0.1:17400/v1/kv/key-$i")" || die "GET key-$i with node 1 failed"
  [ "$got" = "value-$i" ] || die "key-$i is '$got' with node 1 failed"
done
for i in $(seq 1 "$keys"); do
  kv -X PUT --data-binary "during-$i" "http://127.0.0.1:17400/v1/kv/during-$i" >/dev/null || die "PUT during-$i"
done

log "recover node 1"
kubectl patch kvc demo -n "$app_ns" --type json -p '[{"op":"remove","path":"/spec/faultInjection"}]'
kubectl wait -n "$app_ns" --for=condition=Available kvc/demo --timeout=300s || die "demo not Available after recovery"
kubectl wait -n "$app_ns" --for=jsonpath='{.status.phase}'=Running kvc/demo --timeout=300s || die "demo not Running after recovery"

log "verify: every key from every node"
for pod in demo-0 demo-1 demo-2; do
  kubectl port-forward -n "$app_ns" "pod/$pod" 17401:7400 >/dev/null 2>&1 &
  ppf=$!
  sleep 2
  for i in $(seq 1 "$keys"); do
    got="$(curl -fsS -H "Authorization: Bearer $token" -H 'X-Consistency: all' "http://127.0.0.1:17401/v1/kv/during-$i")" \
      || { kill "$ppf"; die "GET during-$i via $pod"; }
    [ "$got" = "during-$i" ] || { kill "$ppf"; die "during-$i via $pod is '$got'"; }
  done
  kill "$ppf" 2>/dev/null || true
done

log "uninstall keeps the CRD"
kubectl delete kvc demo -n "$app_ns" --wait=true
helm uninstall kvstore -n "$ns" --wait
kubectl get crd kvclusters.kvstore.dev >/dev/null || die "helm uninstall deleted the CRD"
log "PASSED"
