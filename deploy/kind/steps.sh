# shellcheck shell=bash
# shellcheck disable=SC2154 # ns, op_ns, image_a, image_b, kube: set by the driver
# The end-to-end story of a KvCluster on a Kubernetes cluster: the one body
# that scripts/test-kubernetes.sh (a control plane built from source and the
# test kubelet) and deploy/kind/e2e.sh (kind, real images) both run. Sourced,
# not executed. The driver sets, before calling run_story:
#   ns            namespace of the KvCluster (created here)
#   op_ns         namespace of the operator (its Lease)
#   image_a image_b   two tags of one kv-node build (step "rolling update")
#   kube          the kubectl to use (a path or a function name)
# and defines:
#   platform_kvctl ARGS...       kvctl able to reach pods by their cluster DNS names
#   platform_service_url         the client Service's URL for kvctl
#   platform_pod_url ORDINAL     one node's URL
#   platform_operator_kill       SIGKILL the leading operator; echo its name
#   platform_operator_start      start an operator replica (a standby if one leads)
#   platform_operator_leaders    echo how many replicas say they lead, then how many wait
#   platform_dump DIR            copy logs and object dumps to DIR
#   platform_extra_spec          YAML lines added under the KvCluster's spec (may be empty)
# Each step prints PASS, FAIL (with why) or SKIP (a known operator gap, with
# the issue item); a failed step does not stop the later ones where they can
# still run. run_story returns non-zero if any step failed.

story_name=demo
story_wait=${KV_E2E_WAIT:-240}
story_failed=0
story_passed=0
story_skipped=0
declare -a story_results=()

# KNOWN_OPERATOR_GAPS (an array the driver may set): steps that fail today
# because the operator lacks what issue 17 asks for, as "step-name|reason
# (issue item)". A listed step still runs; when it fails the run prints SKIP
# with the reason instead of FAIL; when it passes it says the entry should go.
# KV_E2E_STRICT=1 treats them as failures.

say() { printf '[e2e %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }

k() { "$kube" "$@"; }
kn() { "$kube" -n "$ns" "$@"; }

# wait_for SECONDS DESCRIPTION CMD...: poll CMD every second, bounded.
wait_for() {
  local secs=$1 what=$2 t0=$SECONDS; shift 2
  until "$@" >/dev/null 2>&1; do
    if [ $((SECONDS - t0)) -ge "$secs" ]; then why "$what: not within $secs s"; return 1; fi
    sleep 1
  done
  say "  $what ($((SECONDS - t0)) s)"
}

gap_reason() {
  local e
  for e in ${KNOWN_OPERATOR_GAPS[@]+"${KNOWN_OPERATOR_GAPS[@]}"}; do
    [ "${e%%|*}" = "$1" ] && { printf '%s' "${e#*|}"; return 0; }
  done
  return 1
}

# step NAME FUNCTION: run one step and record PASS/FAIL/SKIP.
step() {
  local name=$1 fn=$2 t0=$SECONDS reason rc
  story_why=
  say "=== $name"
  set +e
  ( set -e; "$fn" )
  rc=$?
  set -e
  stop_loads
  [ -f "$story_dir/why" ] && story_why=$(cat "$story_dir/why") && rm -f "$story_dir/why"
  local took=$((SECONDS - t0))
  if [ "$rc" = 0 ]; then
    if reason=$(gap_reason "$name"); then
      story_results+=("PASS $name (${took} s) -- listed in KNOWN_OPERATOR_GAPS ($reason): remove the entry")
    else
      story_results+=("PASS $name (${took} s)")
    fi
    story_passed=$((story_passed + 1))
  elif reason=$(gap_reason "$name") && [ "${KV_E2E_STRICT:-0}" != 1 ]; then
    story_results+=("SKIP $name (${took} s): known operator gap: $reason; seen: ${story_why:-exit $rc}")
    story_skipped=$((story_skipped + 1))
  else
    story_results+=("FAIL $name (${took} s): ${story_why:-exit $rc}")
    story_failed=$((story_failed + 1))
    platform_dump "$story_dir/dump-$name" >/dev/null 2>&1 || true
  fi
  say "${story_results[-1]}"
}
# A step runs in a subshell; why() keeps its message in a file for step().
why() { story_why=$*; printf '%s' "$*" > "$story_dir/why"; say "  ! $*"; return 1; }

# --- helpers over the KvCluster ------------------------------------------------
kvc_json() { kn get kvc "$story_name" -o json; }
kvc_field() { kn get kvc "$story_name" -o "jsonpath=$1"; }
node_states() { kvc_field '{range .status.nodes[*]}{.ordinal}={.state} {end}'; }
# all_up N: status lists N nodes, every one Up
all_up() {
  local s; s=$(node_states) || return 1
  [ "$(wc -w <<<"$s")" = "$1" ] && ! grep -qv '=Up$' <(tr ' ' '\n' <<<"$s" | sed '/^$/d')
}
phase_is() { [ "$(kvc_field '{.status.phase}')" = "$1" ]; }
settled() { # settled N: Running, N nodes Up, observedGeneration current
  local gen obs
  gen=$(kvc_field '{.metadata.generation}'); obs=$(kvc_field '{.status.observedGeneration}')
  [ "$gen" = "$obs" ] && phase_is Running && all_up "$1"
}
token() { kn get secret "$story_name-auth" -o jsonpath='{.data.token}' | base64 -d; }
kv() { KV_TOKEN=$story_token platform_kvctl --timeout 5 "$@"; }

# stop_loads: end every load a step left running (a step that failed early).
stop_loads() {
  local f pid
  for f in "$story_dir"/*.pid; do
    [ -f "$f" ] || continue
    pid=$(cat "$f"); touch "${f%.pid}.stop"
    for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill "$pid" 2>/dev/null || true
    rm -f "$f"
  done
}

# --- a write load in the background ---------------------------------------------
# load_start NAME: Quorum writes of NAME-i through the client Service; each
# write retried twice (what a client library does); acknowledged ones go to
# $story_dir/NAME.acked, those failing after the retries to NAME.failed.
load_start() {
  local name=$1
  rm -f "$story_dir/$name".{acked,failed,stop,err}
  touch "$story_dir/$name".{acked,failed,err}
  (
    i=0
    while [ ! -f "$story_dir/$name.stop" ]; do
      i=$((i + 1)); ok=0
      for _ in 1 2 3; do
        if kv --endpoint "$(platform_service_url)" --consistency quorum put "$name-$i" "v$i" >/dev/null 2>>"$story_dir/$name.err"; then
          ok=1; break
        fi
        sleep 0.5
      done
      if [ "$ok" = 1 ]; then echo "$name-$i v$i" >> "$story_dir/$name.acked"; else echo "$name-$i" >> "$story_dir/$name.failed"; fi
      sleep 0.05
    done
  ) &
  echo $! > "$story_dir/$name.pid"
}
# load_stop NAME: stop it (bounded), then check: no write failed beyond the
# retries, and every acknowledged write reads back at Quorum.
load_stop() {
  local name=$1 pid n failed lost=0 key val got
  pid=$(cat "$story_dir/$name.pid")
  touch "$story_dir/$name.stop"
  for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  rm -f "$story_dir/$name.pid"
  n=$(wc -l < "$story_dir/$name.acked" 2>/dev/null || echo 0)
  failed=$(wc -l < "$story_dir/$name.failed" 2>/dev/null || echo 0)
  say "  load $name: $n acknowledged, $failed failed after retries"
  [ "$n" -gt 0 ] || { why "load $name: no write was acknowledged ($(tail -n 2 "$story_dir/$name.err" 2>/dev/null | tr '\n' ' '))"; return 1; }
  check_acked "$name" || return 1
  [ "$failed" = 0 ] || { why "load $name: $failed Quorum writes failed after 3 tries (first: $(head -n 1 "$story_dir/$name.failed"); last error: $(tail -n 1 "$story_dir/$name.err"))"; return 1; }
}

# check_acked NAME: every write load NAME acknowledged reads back at Quorum.
check_acked() {
  local name=$1 n lost=0 key val got
  n=$(wc -l < "$story_dir/$name.acked" 2>/dev/null || echo 0)
  while read -r key val; do
    got=$(kv --endpoint "$(platform_service_url)" --consistency quorum get "$key" 2>&1) || got="ERROR $got"
    if [ "$got" != "$val" ]; then lost=$((lost + 1)); [ "$lost" -le 3 ] && say "  acknowledged $key=$val reads '$got'"; fi
  done < "$story_dir/$name.acked"
  [ "$lost" = 0 ] || { why "load $name: $lost of $n acknowledged writes lost or unreadable at Quorum"; return 1; }
}

verify_clean() {
  local out
  out=$(kv --endpoint "$(platform_service_url)" verify 2>&1) || { why "kvctl verify: $(tail -n 5 <<<"$out" | tr '\n' ' ')"; return 1; }
  say "  kvctl verify: $(tail -n 1 <<<"$out")"
}

# --- the steps ----------------------------------------------------------------

# The message the real API server must give for each invalid example.
expected_refusal() {
  case $(basename "$1") in
    bad-consistency.yaml) echo 'spec.replication.writeConsistency: Unsupported value: "Most"' ;;
    bad-storage-size.yaml) echo 'spec.storage.size in body should match' ;;
    duplicate-failed-node.yaml) echo 'spec.faultInjection.failedNodes[1]: Duplicate value: 1' ;;
    factor-above-replicas.yaml) echo 'replication.factor must not exceed replicas' ;;
    failed-node-out-of-range.yaml) echo 'every ordinal in faultInjection.failedNodes must be below replicas' ;;
    unknown-field.yaml) echo 'unknown field "spec.nodes"' ;;
    unknown-strategy.yaml) echo 'spec.replication.strategy: Unsupported value: "Ring"' ;;
    zero-replicas.yaml) echo 'spec.replicas in body should be greater than or equal to 1' ;;
    *) echo '' ;;
  esac
}

step_invalid_examples_refused() {
  local f out expect bad=0
  for f in deploy/examples/invalid/*.yaml; do
    expect=$(expected_refusal "$f")
    if out=$(kn create --dry-run=server -f "$f" 2>&1); then
      say "  $f was ACCEPTED: $out"; bad=1; continue
    fi
    if [ -z "$expect" ]; then
      say "  $f refused, but no expected message is known for it: $out"; bad=1
    elif ! grep -qF -- "$expect" <<<"$out"; then
      say "  $f refused, but not with '$expect': $out"; bad=1
    else
      say "  $(basename "$f"): refused: $expect"
    fi
  done
  [ "$bad" = 0 ] || why "an invalid example was accepted or refused for another reason"
}

step_available() {
  kn apply -f - <<YAML
apiVersion: kvstore.dev/v1alpha1
kind: KvCluster
metadata:
  name: $story_name
spec:
  replicas: 3
  image: $image_a
  replication: {strategy: ConsistentHashing, factor: 3, writeConsistency: Quorum, readConsistency: Quorum}
  storage: {size: 64Mi}
  failureDetectionSeconds: 5
$(platform_extra_spec)
YAML
  kn wait --for=condition=Available "kvc/$story_name" --timeout="${story_wait}s" \
    || { why "kubectl wait --for=condition=Available: not within $story_wait s (phase $(kvc_field '{.status.phase}'), nodes $(node_states))"; return 1; }
  # Available holds with 2 of 3 pods: wait for the phase and every node too
  wait_for "$story_wait" "phase Running, 3 nodes Up" settled 3 || return 1
  story_token=$(token); [ -n "$story_token" ] || why "no token in Secret $story_name-auth"
  check_endpointslices
}

# ready_pods JQ-PATH: that field of every Ready node pod, one a line.
ready_pods() {
  kn get pods -l "app.kubernetes.io/instance=$story_name,app.kubernetes.io/component=node" -o json \
    | jq -r ".items[] | select(any(.status.conditions[]?; .type == \"Ready\" and .status == \"True\")) | $1"
}

# endpointslices_match: the client Service's EndpointSlices list exactly the
# Ready pods as ready; prints both lists.
endpointslices_match() {
  local ready_pods ready_eps
  ready_pods=$(ready_pods '.status.podIP' | sort)
  ready_eps=$(kn get endpointslices -l "kubernetes.io/service-name=$story_name" \
    -o jsonpath='{range .items[*].endpoints[?(@.conditions.ready==true)]}{.addresses[0]}{"\n"}{end}' | sort)
  echo "ready pods: $(echo "$ready_pods" | tr '\n' ' ')| ready endpoints of Service $story_name: $(echo "$ready_eps" | tr '\n' ' ')"
  [ -n "$ready_pods" ] && [ "$ready_pods" = "$ready_eps" ]
}

# The EndpointSlice controller follows pod readiness asynchronously (a real
# API server showed it a few seconds behind), so the lists must agree within
# a bound, not at the first look.
check_endpointslices() {
  local t0=$SECONDS seen
  until seen=$(endpointslices_match); do
    if [ $((SECONDS - t0)) -ge 30 ]; then
      say "  $seen"
      why "EndpointSlices of Service $story_name do not list exactly the ready pods within 30 s"
      return 1
    fi
    sleep 1
  done
  say "  $seen (agreed after $((SECONDS - t0)) s)"
}

step_read_write_levels() {
  local o c got
  story_token=$(token)
  for o in 0 1 2; do
    for c in one quorum all; do
      kv --endpoint "$(platform_pod_url "$o")" --consistency "$c" put "rw-$o-$c" "via-$o-$c" >/dev/null \
        || { why "put rw-$o-$c at $c through node $o failed"; return 1; }
    done
  done
  for o in 0 1 2; do
    for c in one quorum all; do
      for w in 0 1 2; do
        got=$(kv --endpoint "$(platform_pod_url "$o")" --consistency "$c" get "rw-$w-all") \
          || { why "get rw-$w-all at $c through node $o failed"; return 1; }
        [ "$got" = "via-$w-all" ] || { why "rw-$w-all at $c through node $o is '$got'"; return 1; }
      done
    done
  done
  verify_clean
}

# The failed-node step, and on any failure the hold-down removed, so that
# the later steps start from a cluster without faultInjection.
step_failed_node() {
  held_down_node || { kn patch kvc "$story_name" --type json -p '[{"op":"remove","path":"/spec/faultInjection"}]' >/dev/null 2>&1 || true; return 1; }
}
held_down_node() {
  local t0 seen_recovering=0 s old_uid
  story_token=$(token)
  old_uid=$(kn get pod "$story_name-1" -o jsonpath='{.metadata.uid}')
  load_start fail
  sleep 3
  kn patch kvc "$story_name" --type merge -p '{"spec":{"faultInjection":{"failedNodes":[1]}}}' >/dev/null
  wait_for 60 "node 1 Failed in status" node_state_is 1 Failed || { load_stop fail || true; return 1; }
  # The StatefulSet recreates a deleted pod at once: the node is killed (a
  # new pod) and the new pod waits fenced on the held list it mounts.
  wait_for 60 "pod $story_name-1 killed (replaced)" pod_replaced "$story_name-1" "$old_uid" || { load_stop fail || true; return 1; }
  wait_for 60 "the new pod $story_name-1 waits held down" held_fenced 1 || { load_stop fail || true; return 1; }
  phase_is Degraded || why "phase $(kvc_field '{.status.phase}') with a held-down node, not Degraded" || true
  say "  holding for 15 s"
  sleep 15
  held_fenced 1 || { load_stop fail || true; why "node 1 serves while held down ($(held_view 1))"; return 1; }
  if pod_ready "$story_name-1"; then load_stop fail || true; why "pod $story_name-1 is Ready while node 1 is held down"; return 1; fi
  check_endpointslices || { load_stop fail || true; return 1; }
  kn patch kvc "$story_name" --type json -p '[{"op":"remove","path":"/spec/faultInjection"}]' >/dev/null
  t0=$SECONDS
  while [ $((SECONDS - t0)) -lt "$story_wait" ]; do
    s=$(kvc_field '{.status.nodes[?(@.ordinal==1)].state}')
    [ "$s" = Recovering ] && seen_recovering=1
    all_up 3 && break
    sleep 0.5
  done
  all_up 3 || { load_stop fail || true; why "node 1 not Up within $story_wait s after recovery (states $(node_states))"; return 1; }
  say "  node 1 Up again after $((SECONDS - t0)) s (Recovering seen: $seen_recovering)"
  load_stop fail || return 1
  wait_for 60 "phase Running" settled 3 || return 1
  verify_clean
}

pod_replaced() {
  local uid
  uid=$(kn get pod "$1" -o jsonpath='{.metadata.uid}' 2>/dev/null) || return 1
  [ -n "$uid" ] && [ "$uid" != "$2" ]
}
pod_ready() {
  [ "$(kn get pod "$1" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" = True ]
}
# held_view N: what node N's pod answers: the client port's /v1/cluster
# error code and the curl exit code of its peer port (7: refused).
held_view() {
  local ip err peer
  ip=$(kn get pod "$story_name-$1" -o jsonpath='{.status.podIP}' 2>/dev/null)
  [ -n "$ip" ] || { echo "no pod IP"; return; }
  err=$(curl -s -m 2 "http://$ip:7400/v1/cluster" | jq -r '.error // "none"' 2>/dev/null)
  peer=0; curl -s -m 2 -o /dev/null "http://$ip:7401/" || peer=$?
  echo "client port error ${err:-no answer}, peer port curl exit $peer"
}
# held_fenced N: node N's pod runs, answers 503 held_down on its client port
# (nothing but /healthz is served) and its peer port is closed.
held_fenced() { [ "$(held_view "$1")" = "client port error held_down, peer port curl exit 7" ]; }

# change JSON-merge-patch N: patch the spec, wait for N nodes Up and Running.
change() {
  kn patch kvc "$story_name" --type merge -p "$1" >/dev/null
  sleep 2
  wait_for "$story_wait" "settled with $2 nodes Up after $1" settled "$2"
}

# Data only on owners: kvctl verify compares co-owners; 'where' of a key
# lists owners, and a non-owner must not hold it (read at One from it is a
# coordinator read, so we rely on verify's digests, which count records per
# node and bucket).
step_scale_and_factor() {
  story_token=$(token)
  load_start scale
  change '{"spec":{"replicas":5}}' 5 || { load_stop scale || true; return 1; }
  change '{"spec":{"replication":{"factor":2}}}' 5 || { load_stop scale || true; return 1; }
  change '{"spec":{"replicas":3}}' 3 || { load_stop scale || true; return 1; }
  load_stop scale || return 1
  [ "$(kn get pods -l "app.kubernetes.io/instance=$story_name,app.kubernetes.io/component=node" -o name | wc -l)" = 3 ] \
    || { why "not 3 node pods after scaling back to 3"; return 1; }
  verify_clean
}

step_operator_restart() {
  local t0 killed counts
  story_token=$(token)
  counts=$(platform_operator_leaders)
  [ "$counts" = "1 1" ] || { why "expected 1 leading and 1 waiting operator replica, saw (leading waiting) $counts"; return 1; }
  load_start resume
  # A change that takes seconds, so that the leader dies in the middle of it:
  # a new node must start and answer before it joins (a factor change alone
  # now commits within a second of the push).
  kn patch kvc "$story_name" --type merge -p '{"spec":{"replicas":4,"replication":{"factor":3}}}' >/dev/null
  t0=$SECONDS
  until phase_is Rebalancing; do
    [ $((SECONDS - t0)) -lt 60 ] || { load_stop resume || true; why "phase never Rebalancing after replicas 4, factor 3"; return 1; }
    sleep 0.2
  done
  killed=$(platform_operator_kill)
  say "  killed the leading operator ($killed) while Rebalancing (epoch $(kvc_field '{.status.topologyEpoch}'), nodes $(node_states))"
  wait_for "$story_wait" "settled with 4 nodes after the standby took over" settled 4 || { load_stop resume || true; return 1; }
  platform_operator_start >/dev/null
  change '{"spec":{"replicas":3}}' 3 || { load_stop resume || true; return 1; }
  load_stop resume || return 1
  verify_clean
}

step_rolling_update() {
  local t0 worst=3 r not_up min_up=3 states
  story_token=$(token)
  load_start roll
  kn patch kvc "$story_name" --type merge -p "{\"spec\":{\"image\":\"$image_b\"}}" >/dev/null
  t0=$SECONDS
  while [ $((SECONDS - t0)) -lt "$story_wait" ]; do
    r=$(ready_pods '.metadata.name' | wc -w)
    [ "$r" -lt "$worst" ] && worst=$r
    states=$(node_states); not_up=$(tr ' ' '\n' <<<"$states" | grep -c '=' || true)
    not_up=$(( not_up - $(tr ' ' '\n' <<<"$states" | grep -c '=Up$' || true) ))
    [ $((3 - not_up)) -lt "$min_up" ] && min_up=$((3 - not_up))
    if [ "$(kn get sts "$story_name" -o jsonpath='{.status.updatedReplicas}/{.status.currentRevision}/{.status.updateRevision}' | awk -F/ '{print ($1==3 && $2==$3)}')" = 1 ] && settled 3; then
      break
    fi
    sleep 0.5
  done
  settled 3 || { load_stop roll || true; why "not settled on $image_b within $story_wait s"; return 1; }
  say "  rolled to $image_b in $((SECONDS - t0)) s; fewest Ready pods seen $worst, fewest Up nodes $min_up"
  load_stop roll || return 1
  if [ "$worst" -lt 2 ] || [ "$min_up" -lt 2 ]; then
    why "more than one pod down at once during the rollout (Ready $worst, Up $min_up)"; return 1
  fi
  [ "$(kn get sts "$story_name" -o jsonpath='{.spec.template.spec.containers[0].image}')" = "$image_b" ] || { why "StatefulSet image not $image_b"; return 1; }
  verify_clean
}

node_pods() { kn get pods -l "app.kubernetes.io/instance=$story_name,app.kubernetes.io/component=node" -o name; }
node_pod_uids() { kn get pods -l "app.kubernetes.io/instance=$story_name,app.kubernetes.io/component=node" -o jsonpath='{range .items[*]}{.metadata.name}={.metadata.uid} {end}'; }
data_pvcs() { kn get pvc -o name | grep -c "/data-$story_name-" || true; }
restart_done() { # restart_done VALUE UIDS: finished for VALUE, and no pod kept its uid
  local uid
  [ "$(kvc_field '{.status.lastRestart.requestedAt}')" = "$1" ] || return 1
  [ -n "$(kvc_field '{.status.lastRestart.finishedAt}')" ] || return 1
  for uid in $2; do grep -q "$uid" <<<"$(node_pod_uids)" && return 1; done
  settled 3
}

# Rolling restart on request (issue 20): every pod replaced, one at a time,
# under a write load that loses nothing.
step_restart() {
  local value uids t0 r worst=3
  story_token=$(token)
  uids=$(node_pod_uids)
  load_start rst
  value=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  kn annotate kvc "$story_name" "kvstore.dev/restartedAt=$value" --overwrite >/dev/null
  t0=$SECONDS
  until restart_done "$value" "$uids"; do
    [ $((SECONDS - t0)) -lt "$story_wait" ] || { load_stop rst || true; why "restart not finished within $story_wait s: lastRestart $(kvc_field '{.status.lastRestart}')"; return 1; }
    r=$(ready_pods '.metadata.name' | wc -w)
    [ "$r" -lt "$worst" ] && worst=$r
    sleep 0.5
  done
  say "  restarted 3 pods in $((SECONDS - t0)) s; fewest Ready pods seen $worst"
  load_stop rst || return 1
  [ "$worst" -ge 2 ] || { why "more than one pod down at once during the restart (Ready $worst)"; return 1; }
  verify_clean
}

# A wiped volume (issue 17 item 3): node 1's PVC deleted with its pod; the
# StatefulSet gives it a new, empty volume. The node must catch up before it
# serves, and every acknowledged write stays readable at Quorum.
step_wiped_volume() {
  local pod="$story_name-1" pvc="data-$story_name-1" old_pvc t0
  story_token=$(token)
  load_start wipe; sleep 3
  old_pvc=$(kn get pvc "$pvc" -o jsonpath='{.metadata.uid}')
  kn delete pvc "$pvc" --wait=false >/dev/null
  kn delete pod "$pod" --wait=false >/dev/null
  # The PVC goes once its pod has (pvc-protection); a pod recreated before
  # that waits for a claim that is going away, and the StatefulSet creates a
  # claim only with a pod: delete that pod again, as an admin would.
  t0=$SECONDS
  until [ -n "$(kn get pvc "$pvc" -o jsonpath='{.metadata.uid}' 2>/dev/null)" ] && [ "$(kn get pvc "$pvc" -o jsonpath='{.metadata.uid}' 2>/dev/null)" != "$old_pvc" ]; do
    [ $((SECONDS - t0)) -lt "$story_wait" ] || { load_stop wipe || true; why "no new PVC $pvc within $story_wait s"; return 1; }
    if ! kn get pvc "$pvc" >/dev/null 2>&1 && [ "$(kn get pod "$pod" -o jsonpath='{.status.phase}' 2>/dev/null)" = Pending ]; then
      kn delete pod "$pod" --wait=false >/dev/null 2>&1 || true
    fi
    sleep 1
  done
  say "  $pvc replaced after $((SECONDS - t0)) s"
  # while node 1 is new and catching up, nothing acknowledged may read as missing
  check_acked wipe || { load_stop wipe || true; return 1; }
  wait_for "$story_wait" "settled with 3 nodes Up after the wipe" settled 3 || { load_stop wipe || true; return 1; }
  load_stop wipe || return 1
  verify_clean
}

owned_gone() {
  [ -z "$(kn get sts,svc,cm,pdb,pods -l "app.kubernetes.io/instance=$story_name" -o name 2>/dev/null)" ]
}
node_state_is() { [ "$(kvc_field "{.status.nodes[?(@.ordinal==$1)].state}")" = "$2" ]; }
pod_gone() { ! kn get pod "$1" -o name >/dev/null 2>&1; }

step_delete_gc() {
  local policy pvcs_before pvcs_after
  policy=$(kn get sts "$story_name" -o jsonpath='{.spec.persistentVolumeClaimRetentionPolicy.whenDeleted}')
  pvcs_before=$(kn get pvc -o name | wc -l)
  kn delete kvc "$story_name" --wait=true --timeout="${story_wait}s" >/dev/null \
    || { why "kubectl delete kvc did not return within $story_wait s"; return 1; }
  wait_for 120 "owned StatefulSet, Services, ConfigMap, PDB, pods garbage-collected" owned_gone || return 1
  sleep 5
  pvcs_after=$(kn get pvc -o name | wc -l)
  say "  StatefulSet PVC retention whenDeleted='${policy:-<unset: Retain>}': PVCs $pvcs_before before, $pvcs_after after"
  grep -q persistentVolumeClaimRetentionPolicy < <(k get crd kvclusters.kvstore.dev -o yaml) \
    || { why "spec.storage has no PVC retention policy: $pvcs_after PVCs left behind (retention cannot be chosen)"; return 1; }
  case "${policy:-Retain}" in
    Delete) [ "$pvcs_after" = 0 ] || { why "whenDeleted=Delete but $pvcs_after PVCs remain"; return 1; } ;;
    *) [ "$pvcs_after" = "$pvcs_before" ] || { why "whenDeleted=Retain but PVCs went from $pvcs_before to $pvcs_after"; return 1; } ;;
  esac
}

# run_story: every step after the platform is up; prints the summary.
run_story() {
  story_dir=${story_dir:-$(mktemp -d)}
  mkdir -p "$story_dir"
  k create namespace "$ns" >/dev/null 2>&1 || true
  step invalid-examples-refused step_invalid_examples_refused
  step available step_available
  if [ "$story_failed" -gt 0 ] && ! kn get kvc "$story_name" >/dev/null 2>&1; then
    say "no KvCluster: the later steps cannot run"
  else
    step read-write-levels step_read_write_levels
    step failed-node step_failed_node
    step scale-and-factor step_scale_and_factor
    step operator-restart step_operator_restart
    step rolling-update step_rolling_update
    step restart step_restart
    step wiped-volume step_wiped_volume
    step delete-gc step_delete_gc
  fi
}

story_summary() {
  local r
  echo
  echo "== end-to-end story: $story_passed passed, $story_failed failed, $story_skipped skipped (known operator gaps)"
  for r in "${story_results[@]}"; do echo "  $r"; done
}
