#!/usr/bin/env bash
# Starts a real Kubernetes control plane on 127.0.0.1, the way
# controller-runtime's envtest does, plus the controller-manager and scheduler:
#   etcd -> kube-apiserver (TLS, client certificates, RBAC, service-account
#   tokens) -> kube-controller-manager + kube-scheduler.
# No kubelet, no Node: pods are created by controllers but stay Pending.
# Binaries: test/kube/build.sh (run it first), from $KV_KUBE_BIN
# (default test/kube/bin). Everything listens on 127.0.0.1 only, on free ports.
#
#   KV_KUBE_DIR      state dir (certificates, kubeconfigs, etcd data, logs,
#                    pids); default ${TMPDIR:-/tmp}/kvstore-kube. Must not hold a
#                    running control plane (scripts/kube-down.sh removes it);
#                    one left behind with no process running is removed.
#   KV_KUBE_TIMEOUT  seconds to wait for each component to become healthy (180)
#
# Prints the admin kubeconfig's path; $KV_KUBE_DIR/env has
# KUBECONFIG=... and the ports. scripts/kube-down.sh stops it all by pid.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${KV_KUBE_BIN:-$root/test/kube/bin}
dir=${KV_KUBE_DIR:-${TMPDIR:-/tmp}/kvstore-kube}
timeout=${KV_KUBE_TIMEOUT:-180}
marker=.kvstore-kube-state

log() { printf 'kube-up: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

for b in etcd kube-apiserver kube-controller-manager kube-scheduler kubectl; do
  [ -x "$bin/$b" ] || die "$bin/$b missing: run test/kube/build.sh first"
done
command -v openssl >/dev/null || die "openssl is needed"
command -v curl >/dev/null || die "curl is needed"
# A state dir whose recorded processes are all gone was left behind by a run
# that died (or a machine copied mid-run): removed, so the next run starts.
# One with a live process is a control plane that is up: never touched.
left_behind() {
  local f pid exe
  [ -f "$dir/$marker" ] || return 1
  for f in "$dir"/pids/*.pid; do
    [ -f "$f" ] || continue
    pid=$(cat "$f")
    exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || continue
    [ "$(basename "${exe% (deleted)}")" = "$(basename "$f" .pid)" ] && return 1
  done
  return 0
}
if [ -e "$dir" ]; then
  if left_behind; then
    log "$dir was left behind (none of its processes runs): removing it"
    rm -rf "$dir"
  else
    die "$dir exists: a control plane is up (scripts/kube-down.sh stops it) or it is not a kube-up.sh state dir"
  fi
fi
mkdir -p "$dir"/{pki,logs,pids,etcd,apiserver}
chmod 700 "$dir/etcd" "$dir/pki"
touch "$dir/$marker"
dir=$(cd "$dir" && pwd)

# On any failure from here on: stop what was started, keep the logs' tails.
up_ok=0
cleanup() {
  if [ "$up_ok" = 0 ]; then
    log "failed; last log lines:"
    for f in "$dir"/logs/{etcd,kube-*}.log; do [ -f "$f" ] && { echo "== $f"; tail -n 15 "$f"; } >&2; done
    KV_KUBE_DIR="$dir" "$root/scripts/kube-down.sh" >&2 || true
  fi
}
trap cleanup EXIT

# --- free loopback ports: bind all to port 0 at once so they differ --------
read -r etcd_port etcd_peer_port api_port kcm_port sched_port < <(python3 - <<'EOF'
import socket
ss = []
for _ in range(5):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); ss.append(s)
print(" ".join(str(s.getsockname()[1]) for s in ss))
EOF
)

# --- certificates (openssl, ECDSA P-256 CA) -------------------------------
pki=$dir/pki
ossl() { openssl "$@" 2>>"$dir/logs/openssl.log"; }
ossl ecparam -name prime256v1 -genkey -noout -out "$pki/ca.key"
ossl req -x509 -new -key "$pki/ca.key" -sha256 -days 30 -subj "/CN=kvstore-test-ca" \
  -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" -out "$pki/ca.crt"

# a second CA for the front proxy (request-header authentication), as kubeadm
# has: without --requestheader-client-ca-file the controller-manager and the
# scheduler log "missing content for CA bundle" while they start
ossl ecparam -name prime256v1 -genkey -noout -out "$pki/front-proxy-ca.key"
ossl req -x509 -new -key "$pki/front-proxy-ca.key" -sha256 -days 30 -subj "/CN=kvstore-test-front-proxy-ca" \
  -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" -out "$pki/front-proxy-ca.crt"

# cert NAME SUBJECT EXTENDED_KEY_USAGE [SUBJECT_ALT_NAMES [CA]]
cert() {
  local name=$1 subj=$2 eku=$3 san=${4:-} ca=${5:-ca}
  ossl ecparam -name prime256v1 -genkey -noout -out "$pki/$name.key"
  ossl req -new -key "$pki/$name.key" -subj "$subj" -out "$pki/$name.csr"
  {
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=$eku"
    [ -z "$san" ] || echo "subjectAltName=$san"
  } > "$pki/$name.ext"
  ossl x509 -req -in "$pki/$name.csr" -CA "$pki/$ca.crt" -CAkey "$pki/$ca.key" -CAcreateserial \
    -sha256 -days 30 -extfile "$pki/$name.ext" -out "$pki/$name.crt"
  rm -f "$pki/$name.csr" "$pki/$name.ext"
}
cert apiserver "/CN=kube-apiserver" serverAuth \
  "DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,IP:127.0.0.1,IP:10.0.0.1"
cert admin "/O=system:masters/CN=kubernetes-admin" clientAuth
cert kube-controller-manager "/CN=system:kube-controller-manager" clientAuth
cert kube-scheduler "/CN=system:kube-scheduler" clientAuth
cert front-proxy-client "/CN=front-proxy-client" clientAuth "" front-proxy-ca
# service-account token signing key pair (RSA, as kubeadm makes it)
ossl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$pki/sa.key"
ossl pkey -in "$pki/sa.key" -pubout -out "$pki/sa.pub"
chmod 600 "$pki"/*.key

# kubeconfig FILE USER  (client certificate $pki/USER.crt, embedded)
kubeconfig() {
  local file=$1 user=$2 b64="base64 -w0"
  cat > "$file" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: kvstore-test
  cluster:
    server: https://127.0.0.1:$api_port
    certificate-authority-data: $($b64 < "$pki/ca.crt")
users:
- name: $user
  user:
    client-certificate-data: $($b64 < "$pki/$user.crt")
    client-key-data: $($b64 < "$pki/$user.key")
contexts:
- name: kvstore-test
  context:
    cluster: kvstore-test
    user: $user
current-context: kvstore-test
EOF
  chmod 600 "$file"
}
kubeconfig "$dir/admin.kubeconfig" admin
kubeconfig "$dir/kube-controller-manager.kubeconfig" kube-controller-manager
kubeconfig "$dir/kube-scheduler.kubeconfig" kube-scheduler

# start NAME ARGS...: runs $bin/NAME in its own session, logs and pid in $dir
start() {
  local name=$1; shift
  local pidf="$dir/pids/$name.pid"
  # the process writes its own pid, then execs the binary (setsid may fork)
  # shellcheck disable=SC2016 # $$ and $@ are the inner shell's
  setsid bash -c 'echo $$ > "$0"; exec "$@"' "$pidf" "$bin/$name" "$@" \
    > "$dir/logs/$name.log" 2>&1 < /dev/null &
  for _ in $(seq 1 50); do [ -s "$pidf" ] && break; sleep 0.1; done
  [ -s "$pidf" ] || die "$name: no pid recorded"
  log "$name started (pid $(cat "$pidf"), log $dir/logs/$name.log)"
}
# wait_healthy NAME URL CURL_ARGS...: bounded poll until URL answers "ok"
wait_healthy() {
  local name=$1 url=$2 t0=$SECONDS out; shift 2
  while :; do
    kill -0 "$(cat "$dir/pids/$name.pid")" 2>/dev/null || die "$name exited (see $dir/logs/$name.log)"
    out=$(curl -sS --max-time 5 "$@" "$url" 2>/dev/null || true)
    if [ "$out" = ok ]; then log "$name healthy after $((SECONDS - t0)) s ($url)"; return; fi
    [ $((SECONDS - t0)) -lt "$timeout" ] || die "$name not healthy after ${timeout} s ($url: ${out:-no answer})"
    sleep 1
  done
}

# --- etcd ------------------------------------------------------------------
start etcd --name=kvstore-test --data-dir="$dir/etcd" \
  --listen-client-urls="http://127.0.0.1:$etcd_port" \
  --advertise-client-urls="http://127.0.0.1:$etcd_port" \
  --listen-peer-urls="http://127.0.0.1:$etcd_peer_port" \
  --initial-advertise-peer-urls="http://127.0.0.1:$etcd_peer_port" \
  --initial-cluster="kvstore-test=http://127.0.0.1:$etcd_peer_port" \
  --unsafe-no-fsync=true --log-level=warn
# etcd's /health answers JSON: wait for health true
t0=$SECONDS
until curl -sS --max-time 5 "http://127.0.0.1:$etcd_port/health" 2>/dev/null | grep -q '"health":"true"'; do
  kill -0 "$(cat "$dir/pids/etcd.pid")" 2>/dev/null || die "etcd exited (see $dir/logs/etcd.log)"
  [ $((SECONDS - t0)) -lt "$timeout" ] || die "etcd not healthy after ${timeout} s"
  sleep 0.5
done
log "etcd healthy after $((SECONDS - t0)) s (http://127.0.0.1:$etcd_port)"

# --- kube-apiserver ---------------------------------------------------------
start kube-apiserver \
  --etcd-servers="http://127.0.0.1:$etcd_port" \
  --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$api_port" \
  --cert-dir="$dir/apiserver" \
  --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
  --client-ca-file="$pki/ca.crt" \
  --requestheader-client-ca-file="$pki/front-proxy-ca.crt" \
  --requestheader-allowed-names=front-proxy-client \
  --requestheader-username-headers=X-Remote-User \
  --requestheader-group-headers=X-Remote-Group \
  --requestheader-extra-headers-prefix=X-Remote-Extra- \
  --proxy-client-cert-file="$pki/front-proxy-client.crt" \
  --proxy-client-key-file="$pki/front-proxy-client.key" \
  --authorization-mode=RBAC \
  --service-account-issuer="https://127.0.0.1:$api_port" \
  --service-account-key-file="$pki/sa.pub" \
  --service-account-signing-key-file="$pki/sa.key" \
  --service-cluster-ip-range=10.0.0.0/24 \
  --endpoint-reconciler-type=none \
  --allow-privileged=true
api_curl=(--cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key")
wait_healthy kube-apiserver "https://127.0.0.1:$api_port/readyz" "${api_curl[@]}"

# --- kube-controller-manager and kube-scheduler -----------------------------
kcm_kc=$dir/kube-controller-manager.kubeconfig
start kube-controller-manager \
  --kubeconfig="$kcm_kc" --authentication-kubeconfig="$kcm_kc" --authorization-kubeconfig="$kcm_kc" \
  --bind-address=127.0.0.1 --secure-port="$kcm_port" --cert-dir="$dir/kcm-certs" \
  --leader-elect=false \
  --controllers='*' \
  --root-ca-file="$pki/ca.crt" \
  --service-account-private-key-file="$pki/sa.key" \
  --use-service-account-credentials=true \
  --cluster-signing-cert-file="$pki/ca.crt" --cluster-signing-key-file="$pki/ca.key" \
  --service-cluster-ip-range=10.0.0.0/24
sched_kc=$dir/kube-scheduler.kubeconfig
start kube-scheduler \
  --kubeconfig="$sched_kc" --authentication-kubeconfig="$sched_kc" --authorization-kubeconfig="$sched_kc" \
  --bind-address=127.0.0.1 --secure-port="$sched_port" --cert-dir="$dir/scheduler-certs" \
  --leader-elect=false
# their serving certificates are self-signed (in --cert-dir): -k on loopback
wait_healthy kube-controller-manager "https://127.0.0.1:$kcm_port/healthz" -k
wait_healthy kube-scheduler "https://127.0.0.1:$sched_port/healthz" -k

cat > "$dir/env" <<EOF
KUBECONFIG=$dir/admin.kubeconfig
KV_KUBE_BIN=$bin
KV_KUBE_APISERVER=https://127.0.0.1:$api_port
KV_KUBE_ETCD=http://127.0.0.1:$etcd_port
KV_KUBE_CONTROLLER_MANAGER=https://127.0.0.1:$kcm_port
KV_KUBE_SCHEDULER=https://127.0.0.1:$sched_port
EOF
up_ok=1
log "control plane up; pids in $dir/pids, logs in $dir/logs, env in $dir/env"
log "stop with: KV_KUBE_DIR=$dir scripts/kube-down.sh"
echo "$dir/admin.kubeconfig"
