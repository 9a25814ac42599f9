#!/usr/bin/env bash
# End-to-end check of the test kubelet (docs/kubernetes-tests.md, "The test
# kubelet"): builds kv-test-kubelet (and target/release/kv-node if missing),
# starts the control plane (scripts/kube-up.sh), runs the kubelet, then:
#   - the Node registers and is Ready, its Lease is renewed;
#   - a PVC without a class is provisioned and bound;
#   - a plain Pod running kv-node (ConfigMap volume, Secret env, the PVC,
#     --listen=0.0.0.0:7400 rewritten to the pod IP) becomes Ready through
#     its readiness probe; it answers on its pod IP; its data is in the PV;
#   - a second pod on the same ports runs beside it (its own 127.0.1.N);
#   - a ConfigMap change reaches the volume after --configmap-sync-delay;
#   - an image outside --image-map is reported as ErrImagePull;
#   - deleting the pod ends its process and removes the object;
#   - a killed process is restarted (restartPolicy Always), restartCount 1;
#   - stopping the kubelet (by pid) ends every process it started;
# and scripts/kube-down.sh at the end, whatever happened.
# Prints 'N passed, N failed'; exits non-zero on any failure.
#   KV_KUBE_KEEP=1  leave the control plane and the kubelet running
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
# shellcheck source=/dev/null
eval "$(. test/kube/lib.sh && declare -p KV_KUBE_BIN)"
export KV_KUBE_BIN
export KV_KUBE_DIR=${KV_KUBE_DIR:-${TMPDIR:-/tmp}/kvstore-kubelet-smoke}
target=${KV_KUBELET_TARGET_DIR:-$root/target-kubelet}
ns=kv-kubelet
node=kv-test-node
wait_s=${KV_KUBE_WAIT:-120}
kubelet_pid=

passed=0; failed=0
pass() { printf 'PASS: %s\n' "$*"; passed=$((passed + 1)); }
fail() { printf 'FAIL: %s\n' "$*"; failed=$((failed + 1)); }
step() { printf '\n--> %s\n' "$*"; }

# stop_kubelet: SIGTERM to the pid we started (only while it is that binary)
stop_kubelet() {
  [ -n "$kubelet_pid" ] || return 0
  local exe
  exe=$(readlink "/proc/$kubelet_pid/exe" 2>/dev/null) || { kubelet_pid=; return 0; }
  [ "$(basename "${exe% (deleted)}")" = kv-test-kubelet ] || { kubelet_pid=; return 0; }
  kill -TERM "$kubelet_pid"
  for _ in $(seq 1 600); do [ -e "/proc/$kubelet_pid" ] || break; sleep 0.1; done
  if [ -e "/proc/$kubelet_pid" ]; then kill -KILL "$kubelet_pid"; fi
  wait "$kubelet_pid" 2>/dev/null || true
  kubelet_pid=
}
finish() {
  if [ "${KV_KUBE_KEEP:-0}" = 1 ]; then
    echo "left running: kubelet pid $kubelet_pid, KUBECONFIG=$KV_KUBE_DIR/admin.kubeconfig"
  else
    step "stop the kubelet and kube-down"
    stop_kubelet
    scripts/kube-down.sh || fail "kube-down.sh"
  fi
  echo
  echo "$passed passed, $failed failed"
  [ "$failed" = 0 ]
}

step "build kv-test-kubelet (CARGO_TARGET_DIR=$target) and kv-node"
CARGO_TARGET_DIR=$target cargo build -q -p kv-test-kubelet
kubelet_bin=$target/debug/kv-test-kubelet
kv_node=$root/target/release/kv-node
[ -x "$kv_node" ] || cargo build -q --release -p kv-node

step "kube-up"
KUBECONFIG=$(scripts/kube-up.sh)
export KUBECONFIG
trap finish EXIT
k() { "$KV_KUBE_BIN/kubectl" "$@"; }
poll() {
  local what=$1 t0=$SECONDS; shift
  until "$@" >/dev/null 2>&1; do
    # a failure is counted and the run goes on
    [ $((SECONDS - t0)) -lt "$wait_s" ] || { fail "$what (not within ${wait_s} s)"; return 0; }
    sleep 1
  done
  pass "$what ($((SECONDS - t0)) s)"
}
check() { local what=$1; shift; if "$@"; then pass "$what"; else fail "$what"; fi; }

step "start the kubelet"
# the kubelet's root (pods, PVs) and log outlive kube-down, for reading after
# a failure; the next run removes them
kdir=${KV_KUBELET_DIR:-${TMPDIR:-/tmp}/kvstore-kubelet-smoke-kubelet}
rm -rf "$kdir" && mkdir -p "$kdir"
kroot=$kdir/root
log=$kdir/kv-test-kubelet.log
"$kubelet_bin" --kubeconfig "$KUBECONFIG" --node-name "$node" --root "$kroot" \
  --image-map "kvstore/kv-node:dev=$kv_node" --configmap-sync-delay 5 --restart-backoff 1 \
  >"$log" 2>&1 &
kubelet_pid=$!
echo "kubelet pid $kubelet_pid, log $log"

poll "node $node is Ready" k wait --for=condition=Ready "node/$node" --timeout=5s
renew() { k -n kube-node-lease get lease "$node" -o jsonpath='{.spec.renewTime}'; }
first=$(renew)
lease_renewed() { [ "$(renew)" != "$first" ]; }
poll "node Lease renewed (first renewTime $first)" lease_renewed

step "namespace, ConfigMap, Secret, PVC"
k create namespace "$ns" >/dev/null
k -n "$ns" create configmap kv-config --from-literal=cluster-token=ct-1 >/dev/null
k -n "$ns" create secret generic kv-auth --from-literal=token=smoke-token >/dev/null
k -n "$ns" apply -f - >/dev/null <<EOF
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: data-kv-0}
spec:
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 64Mi}}
EOF
poll "PVC data-kv-0 Bound (provisioned by the kubelet)" \
  k -n "$ns" wait --for=jsonpath='{.status.phase}'=Bound pvc/data-kv-0 --timeout=5s
pv=$(k -n "$ns" get pvc data-kv-0 -o jsonpath='{.spec.volumeName}')
pv_dir=$(k get pv "$pv" -o jsonpath='{.spec.hostPath.path}')
echo "PV $pv at $pv_dir"

# pod NAME DATA_VOLUME_YAML: kv-node with a ConfigMap volume and a Secret env
pod() {
  cat <<EOF
apiVersion: v1
kind: Pod
metadata: {name: $1, labels: {app: kv}}
spec:
  terminationGracePeriodSeconds: 20
  containers:
  - name: kv-node
    image: kvstore/kv-node:dev
    args:
    - --listen=0.0.0.0:7400
    - --peer-listen=\$(POD_IP):7401
    - --data-dir=/data
    - --node-id-from-hostname
    - --cluster-token-file=/etc/kvstore/config/cluster-token
    env:
    - name: POD_IP
      valueFrom: {fieldRef: {fieldPath: status.podIP}}
    - name: KV_TOKEN
      valueFrom: {secretKeyRef: {name: kv-auth, key: token}}
    ports:
    - {name: client, containerPort: 7400}
    - {name: peer, containerPort: 7401}
    readinessProbe: {httpGet: {path: /readyz, port: client}, periodSeconds: 1}
    livenessProbe: {httpGet: {path: /healthz, port: client}, periodSeconds: 5}
    startupProbe: {tcpSocket: {port: peer}, periodSeconds: 1, failureThreshold: 30}
    volumeMounts:
    - {name: data, mountPath: /data}
    - {name: config, mountPath: /etc/kvstore/config, readOnly: true}
  volumes:
  - name: config
    configMap: {name: kv-config, defaultMode: 0440}
$2
EOF
}

step "pod kv-0 (kv-node, PVC) and kv-1 (same ports, emptyDir)"
pod kv-0 "  - {name: data, persistentVolumeClaim: {claimName: data-kv-0}}" | k -n "$ns" apply -f - >/dev/null
pod kv-1 "  - {name: data, emptyDir: {}}" | k -n "$ns" apply -f - >/dev/null
poll "pod kv-0 Ready (readiness probe /readyz)" k -n "$ns" wait --for=condition=Ready pod/kv-0 --timeout=5s
poll "pod kv-1 Ready beside it on the same ports" k -n "$ns" wait --for=condition=Ready pod/kv-1 --timeout=5s
k -n "$ns" get pods -o wide

jp() { k -n "$ns" get pod "$1" -o jsonpath="$2"; }
ip0=$(jp kv-0 '{.status.podIP}'); ip1=$(jp kv-1 '{.status.podIP}')
echo "kv-0 podIP $ip0, kv-1 podIP $ip1, hostIP $(jp kv-0 '{.status.hostIP}')"
check "pod IPs are distinct 127.0.1.N addresses" \
  bash -c "[[ '$ip0' == 127.0.1.* && '$ip1' == 127.0.1.* && '$ip0' != '$ip1' ]]"
check "phase Running, containerStatuses ready and running" \
  test "$(jp kv-0 '{.status.phase} {.status.containerStatuses[0].ready} {.status.containerStatuses[0].started}')" = "Running true true"
conds=$(jp kv-0 '{range .status.conditions[*]}{.type}={.status} {end}')
echo "conditions: $conds"
for c in PodScheduled Initialized ContainersReady Ready; do
  check "condition $c=True" grep -q "$c=True" <<<"$conds"
done
pid0=$(jp kv-0 '{.status.containerStatuses[0].containerID}'); pid0=${pid0#kv-test-kubelet://}
check "kv-0 runs kv-node as pid $pid0" test "$(basename "$(readlink "/proc/$pid0/exe")")" = kv-node
check "kv-node listens on $ip0:7400 (0.0.0.0 rewritten), not on 0.0.0.0" \
  bash -c "curl -fsS http://$ip0:7400/healthz >/dev/null && ! curl -fsS -m 2 http://127.0.0.1:7400/healthz >/dev/null 2>&1"
check "the Secret env is the client token (PUT with it)" \
  curl -fsS -o /dev/null -X PUT -H 'Authorization: Bearer smoke-token' --data-binary v1 "http://$ip0:7400/v1/kv/smoke"
check "GET answers the value" test "$(curl -fsS -H 'Authorization: Bearer smoke-token' "http://$ip0:7400/v1/kv/smoke")" = v1
check "the data dir (/data) is the PV's directory" bash -c "ls '$pv_dir' | grep -q ."
ls -l "$pv_dir"
cm_file=$(find "$kroot/pods" -path "*_kv-0_*/volumes/config/cluster-token")
check "ConfigMap file mode 0440 through ..data" test "$(stat -L -c %a "$cm_file")" = 440

step "ConfigMap change reaches the volume after --configmap-sync-delay (5 s)"
k -n "$ns" create configmap kv-config --from-literal=cluster-token=ct-2 -o yaml --dry-run=client | k -n "$ns" apply -f - >/dev/null
t0=$SECONDS
check "not at once" test "$(cat "$cm_file")" = ct-1
poll "updated to ct-2" grep -qx ct-2 "$cm_file"
echo "seen after $((SECONDS - t0)) s"

step "an image outside --image-map"
k -n "$ns" run bad --image=example.invalid/nope:1 --restart=Never >/dev/null
poll "pod bad waits with reason ErrImagePull" \
  bash -c "[ \"\$('$KV_KUBE_BIN/kubectl' -n $ns get pod bad -o jsonpath='{.status.containerStatuses[0].state.waiting.reason}')\" = ErrImagePull ]"
echo "message: $(jp bad '{.status.containerStatuses[0].state.waiting.message}')"

step "delete pod kv-0: SIGTERM, process gone, object removed"
t0=$SECONDS
check "kubectl delete pod kv-0 returns once it is gone" k -n "$ns" delete pod kv-0 --timeout=60s
echo "deleted in $((SECONDS - t0)) s"
check "kv-node pid $pid0 is gone" bash -c "! [ -e /proc/$pid0 ] || [ \"\$(cat /proc/$pid0/stat | cut -d' ' -f3)\" = Z ]"
check "the PV directory keeps the data" bash -c "ls '$pv_dir' | grep -q ."

step "kill -9 kv-1's process: restarted (restartPolicy Always), Ready again"
pid1=$(jp kv-1 '{.status.containerStatuses[0].containerID}'); pid1=${pid1#kv-test-kubelet://}
kill -KILL "$pid1"
restarted() { [ "$(jp kv-1 '{.status.containerStatuses[0].restartCount}')" = 1 ]; }
poll "kv-1 restartCount 1" restarted
echo "lastState: $(jp kv-1 '{.status.containerStatuses[0].lastState.terminated.exitCode} {.status.containerStatuses[0].lastState.terminated.reason}')"
poll "kv-1 Ready again" k -n "$ns" wait --for=condition=Ready pod/kv-1 --timeout=5s
check "kv-1's last termination is exit code 137 (SIGKILL)" \
  test "$(jp kv-1 '{.status.containerStatuses[0].lastState.terminated.exitCode}')" = 137

step "stopping the kubelet ends its processes"
pid1=$(jp kv-1 '{.status.containerStatuses[0].containerID}'); pid1=${pid1#kv-test-kubelet://}
check "kv-1 runs as pid $pid1" test -e "/proc/$pid1"
if [ "${KV_KUBE_KEEP:-0}" != 1 ]; then
  stop_kubelet
  check "kv-1 (pid $pid1) ended with the kubelet" bash -c "! [ -e /proc/$pid1 ]"
fi
echo "kubelet log: $log ($(grep -c . "$log") lines; warnings: $(grep -c WARN "$log" || true))"
