#!/usr/bin/env bash
# End-to-end check of the real control plane (docs/kubernetes-tests.md):
# test/kube/build.sh (cached), scripts/kube-up.sh, then with the built kubectl:
#   - kubectl version, /readyz;
#   - a namespace; deploy/crd.yaml applied and Established;
#   - every deploy/examples/*.yaml applied and read back from the API server;
#   - every deploy/examples/invalid/*.yaml refused by the API server (each
#     refusal printed; one that is accepted is a failure);
#   - a 1-replica StatefulSet with a volumeClaimTemplate: the statefulset
#     controller creates the Pod and its PVC, the scheduler reports it
#     unschedulable (there is no Node), a Service gets an EndpointSlice
#     (endpointslice controller), deleting the StatefulSet deletes the Pod
#     (garbage collector) and deleting the unused PVC removes its
#     kubernetes.io/pvc-protection finalizer (pvc-protection controller);
# and scripts/kube-down.sh at the end, whatever happened.
# Prints 'N passed, N failed'; exits non-zero on any failure.
#   KV_KUBE_KEEP=1  leave the control plane running (stop: scripts/kube-down.sh)
set -euo pipefail
cd "$(dirname "$0")/../.."
# only the versions and paths: lib.sh's build environment (GOMAXPROCS=1, ...)
# must not reach the control plane's processes
eval "$(. test/kube/lib.sh && declare -p K8S_VERSION KV_KUBE_BIN)"
export KV_KUBE_BIN
export KV_KUBE_DIR=${KV_KUBE_DIR:-${TMPDIR:-/tmp}/kvstore-kube-smoke}
ns=kv-smoke
wait_s=${KV_KUBE_WAIT:-120}

passed=0; failed=0
pass() { printf 'PASS: %s\n' "$*"; passed=$((passed + 1)); }
fail() { printf 'FAIL: %s\n' "$*"; failed=$((failed + 1)); }
step() { printf '\n--> %s\n' "$*"; }
finish() {
  if [ "${KV_KUBE_KEEP:-0}" = 1 ]; then
    echo "control plane left running: KUBECONFIG=$KV_KUBE_DIR/admin.kubeconfig; stop: KV_KUBE_DIR=$KV_KUBE_DIR scripts/kube-down.sh"
  else
    step "kube-down"; scripts/kube-down.sh || fail "kube-down.sh"
  fi
  echo
  echo "$passed passed, $failed failed"
  [ "$failed" = 0 ]
}

step "build (test/kube/build.sh; cached)"
test/kube/build.sh

step "kube-up"
KUBECONFIG=$(scripts/kube-up.sh)
export KUBECONFIG
trap finish EXIT
k() { "$KV_KUBE_BIN/kubectl" "$@"; }
# poll DESCRIPTION COMMAND...: bounded wait until COMMAND succeeds
poll() {
  local what=$1 t0=$SECONDS; shift
  until "$@" >/dev/null 2>&1; do
    [ $((SECONDS - t0)) -lt "$wait_s" ] || { fail "$what (not within ${wait_s} s)"; return 1; }
    sleep 1
  done
  pass "$what ($((SECONDS - t0)) s)"
}

step "kubectl version"
if k version; then pass "kubectl version"; else fail "kubectl version"; fi
want=$K8S_VERSION
if k version -o json | grep -q "\"gitVersion\": \"$want\""; then
  pass "client and server report $want"
else fail "version is not $want"; fi

step "/readyz"
out=$(k get --raw '/readyz' 2>&1) || true
echo "$out"
if [ "$out" = ok ]; then pass "/readyz: ok"; else fail "/readyz: $out"; fi

step "namespace $ns"
if k create namespace "$ns"; then pass "namespace created"; else fail "namespace"; fi
poll "default ServiceAccount in $ns (serviceaccount controller)" k -n "$ns" get serviceaccount default || true
poll "kube-root-ca.crt ConfigMap in $ns (root-ca-cert-publisher)" k -n "$ns" get configmap kube-root-ca.crt || true

step "CRD deploy/crd.yaml"
if k apply -f deploy/crd.yaml && k wait --for condition=established --timeout="${wait_s}s" crd/kvclusters.kvstore.dev; then
  pass "CRD Established"
else fail "CRD not Established"; fi

step "valid examples (deploy/examples/*.yaml)"
for f in deploy/examples/*.yaml; do
  name=$(k create --dry-run=client -o jsonpath='{.metadata.name}' -f "$f")
  if k -n "$ns" apply -f "$f" && k -n "$ns" get kvcluster "$name" -o yaml > "$KV_KUBE_DIR/stored-$name.yaml"; then
    pass "$f stored as kvcluster/$name (uid $(k -n "$ns" get kvcluster "$name" -o jsonpath='{.metadata.uid}'))"
  else fail "$f not stored"; fi
done
k -n "$ns" get kvclusters
echo "stored spec of the first one (defaults applied by the API server):"
k -n "$ns" get kvcluster demo -o jsonpath='{.spec}{"\n"}' || true

step "invalid examples (deploy/examples/invalid/*.yaml) must be refused"
accepted=()
for f in deploy/examples/invalid/*.yaml; do
  if out=$(k -n "$ns" apply -f "$f" 2>&1); then
    fail "$f ACCEPTED by the API server: $out"; accepted+=("$f")
    k -n "$ns" delete -f "$f" --wait=false >/dev/null 2>&1 || true
  else
    pass "$f refused: $out"
  fi
done
[ ${#accepted[@]} = 0 ] || echo "accepted invalid examples: ${accepted[*]}"
echo "(note: unknown fields are refused because kubectl asks for fieldValidation=Strict;"
echo " with --validate=false the server prunes them and stores the object:)"
if out=$(k -n "$ns" create --dry-run=server --validate=false -f deploy/examples/invalid/unknown-field.yaml -o jsonpath='{.spec}' 2>&1); then
  echo "  unknown-field.yaml with --validate=false: accepted, stored spec: $out"
else echo "  unknown-field.yaml with --validate=false: refused: $out"; fi

step "StatefulSet of 1 replica"
k -n "$ns" apply -f - <<'EOF'
apiVersion: v1
kind: Service
metadata:
  name: kv-smoke
spec:
  clusterIP: None
  selector: {app: kv-smoke}
  ports: [{name: api, port: 8080}]
---
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: kv-smoke
spec:
  serviceName: kv-smoke
  replicas: 1
  selector:
    matchLabels: {app: kv-smoke}
  template:
    metadata:
      labels: {app: kv-smoke}
    spec:
      containers:
      - name: kv-node
        # never pulled: there is no kubelet
        image: kvstore/kv-node:smoke
        ports: [{name: api, containerPort: 8080}]
        volumeMounts: [{name: data, mountPath: /data}]
  volumeClaimTemplates:
  - metadata: {name: data}
    spec:
      accessModes: [ReadWriteOnce]
      resources: {requests: {storage: 1Gi}}
EOF
poll "statefulset controller created pod kv-smoke-0" k -n "$ns" get pod kv-smoke-0 || true
poll "statefulset controller created pvc data-kv-smoke-0" k -n "$ns" get pvc data-kv-smoke-0 || true
unsched() { [ "$(k -n "$ns" get pod kv-smoke-0 -o jsonpath='{.status.conditions[?(@.type=="PodScheduled")].reason}')" = Unschedulable ]; }
if poll "scheduler marked kv-smoke-0 Unschedulable" unsched; then
  echo "scheduler says: $(k -n "$ns" get pod kv-smoke-0 -o jsonpath='{.status.conditions[?(@.type=="PodScheduled")].message}')"
fi
k -n "$ns" get statefulset,pod,pvc -o wide || true
k -n "$ns" get events --sort-by=.lastTimestamp || true
has_slice() { [ -n "$(k -n "$ns" get endpointslices -l kubernetes.io/service-name=kv-smoke -o name)" ]; }
poll "endpointslice controller made an EndpointSlice for service kv-smoke" has_slice || true
k -n "$ns" get endpointslices -o wide || true

step "garbage collector and pvc-protection"
k -n "$ns" delete statefulset kv-smoke --wait=false
# gone: kubectl get answers NotFound (not any other error)
gone() { local out; out=$(k -n "$ns" get "$@" 2>&1) && return 1; [[ $out == *"(NotFound)"* ]]; }
poll "garbage collector deleted pod kv-smoke-0 (owned by the StatefulSet)" gone pod kv-smoke-0 || true
echo "pvc finalizers: $(k -n "$ns" get pvc data-kv-smoke-0 -o jsonpath='{.metadata.finalizers}')"
k -n "$ns" delete pvc data-kv-smoke-0 --wait=false
poll "pvc-protection controller released pvc data-kv-smoke-0 (deleted)" gone pvc data-kv-smoke-0 || true

step "controllers the controller-manager started (its log)"
for line in '"Starting stateful set controller"' '"Starting endpoint slice controller"' \
            '"Starting controller" controller="garbagecollector"' '"Starting PVC protection controller"' \
            '"Starting service account controller"' '"Starting root CA cert publisher controller"'; do
  if grep -qF "$line" "$KV_KUBE_DIR/logs/kube-controller-manager.log"; then pass "log: $line"
  else fail "not in the controller-manager's log: $line"; fi
done
