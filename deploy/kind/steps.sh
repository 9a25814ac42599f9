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
#   platform_curl ARGS...        curl able to reach them too (URLs by those names)
#   platform_service_url         the client Service's URL for kvctl
#   platform_pod_url ORDINAL     one node's URL
#   platform_operator_kill       SIGKILL the leading operator; echo its name
#   platform_operator_start      start an operator replica (a standby if one leads)
#   platform_operator_leaders    echo how many replicas say they lead, then how many wait
#   platform_dump DIR            copy logs and object dumps to DIR
#   platform_extra_spec          YAML lines added under the KvCluster's spec (may be empty)
#   platform_expandable_class    echo a storage class that allows volume expansion
#                                and whose volumes really grow (empty: none)
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
# load_start NAME [secret]: Quorum writes of NAME-i through the client
# Service; each write retried twice (what a client library does);
# acknowledged ones go to $story_dir/NAME.acked, those failing after the
# retries to NAME.failed. With `secret` the token is read from the client
# token Secret before each write (its first line: the one to send).
load_start() {
  local name=$1 from_secret=${2:-}
  rm -f "$story_dir/$name".{acked,failed,stop,err}
  touch "$story_dir/$name".{acked,failed,err}
  (
    i=0
    while [ ! -f "$story_dir/$name.stop" ]; do
      i=$((i + 1)); ok=0
      for _ in 1 2 3; do
        if [ "$from_secret" = secret ]; then story_token=$(first_token "$story_name-auth" token); fi
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
hibernated() {
  phase_is Hibernated && [ "$(kn get sts "$story_name" -o jsonpath='{.spec.replicas}')" = 0 ] && [ -z "$(node_pods)" ]
}
awake() { [ "$(ready_pods '.metadata.name' | wc -w)" = 3 ] && settled 3; }
# told_early: sets wake_phase to the status' phase, and wake_early (returning
# 0) when a status of the current generation shows Running, or a node Up,
# whose pod is not Ready. The status is read before the pods: during a
# wake-up pods only become Ready, so a status written before a pod was Ready
# is caught, never one written after.
told_early() {
  local gen obs states ready o
  read -r gen obs wake_phase states < <(kvc_field '{.metadata.generation} {.status.observedGeneration} {.status.phase} {range .status.nodes[*]}{.ordinal}={.state} {end}')
  ready=$(ready_pods '.metadata.name' | tr '\n' ' ')
  [ "$gen" = "$obs" ] || return 1
  if [ "$wake_phase" = Running ] && [ "$(wc -w <<<"$ready")" != 3 ]; then
    wake_early="phase Running with Ready pods [${ready% }]"; return 0
  fi
  for o in $(tr ' ' '\n' <<<"$states" | sed -n 's/=Up$//p'); do
    grep -qw "$story_name-$o" <<<"$ready" \
      || { wake_early="node $o Up while its pod is not Ready (phase $wake_phase, nodes $states)"; return 0; }
  done
  return 1
}

# Hibernation (issue 20): every pod stops, the volumes stay, and waking up
# brings the same nodes back with their data: no node marked Failed, no new
# epoch, every key written before readable, co-owners agreeing. While the
# pods come back the status must not say Running or show a node Up whose
# pod is not Ready (the first real run saw both one second after waking).
step_hibernate() {
  local epoch pvcs t0 phases= wake_phase wake_early
  story_token=$(token)
  load_start hib; sleep 3; load_stop hib || return 1
  epoch=$(kvc_field '{.status.topologyEpoch}'); pvcs=$(data_pvcs)
  kn patch kvc "$story_name" --type merge -p '{"spec":{"hibernation":true}}' >/dev/null
  wait_for "$story_wait" "phase Hibernated, StatefulSet at 0, no node pod" hibernated || return 1
  [ "$(data_pvcs)" = "$pvcs" ] || { why "PVCs went from $pvcs to $(data_pvcs) while hibernated"; return 1; }
  say "  hibernated: $pvcs PVCs kept, epoch $(kvc_field '{.status.topologyEpoch}')"
  kn patch kvc "$story_name" --type merge -p '{"spec":{"hibernation":false}}' >/dev/null
  t0=$SECONDS
  until awake; do
    [ $((SECONDS - t0)) -lt "$story_wait" ] \
      || { why "not awake within $story_wait s: phase $(kvc_field '{.status.phase}'), nodes $(node_states), Ready pods $(ready_pods '.metadata.name' | wc -w)"; return 1; }
    if told_early; then why "the status ran ahead of the pods while waking: $wake_early"; return 1; fi
    case " $phases " in *" $wake_phase "*) ;; *) phases="$phases $wake_phase" ;; esac
    sleep 0.5
  done
  say "  awake in $((SECONDS - t0)) s: 3 pods Ready, Running with 3 nodes Up (phases seen:$phases)"
  [ "$(kvc_field '{.status.topologyEpoch}')" = "$epoch" ] \
    || { why "topology epoch went from $epoch to $(kvc_field '{.status.topologyEpoch}') across hibernation (a node marked down, or a rebalance)"; return 1; }
  check_endpointslices || return 1
  check_acked hib || return 1
  verify_clean
}

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

# first_token SECRET KEY: the first token a token Secret holds (the one sent)
first_token() { kn get secret "$1" -o "jsonpath={.data.${2//./\\.}}" | base64 -d | head -n 1; }
# code_with TOKEN: the HTTP status of a read through the client Service with TOKEN
code_with() {
  platform_curl -s -m 5 -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $1" "$(platform_service_url)/v1/kv/rotation-probe" || true
}

# Token rotation on Kubernetes (issue 18): kvctl rotate-token --cluster
# writes the token Secret in three steps, each awaited in the nodes'
# fingerprints in the status, under a write load whose client takes its
# token from the Secret before each write (as a client that mounts it
# would). No write fails; the old token is refused at the end, the new one
# taken; the cluster token rotates the same way.
step_rotate_token() {
  local old new out fp_new shown code
  old=$(first_token "$story_name-auth" token)
  [ -n "$old" ] || { why "no token in Secret $story_name-auth"; return 1; }
  story_token=$old
  load_start rot secret
  out=$(platform_kvctl --timeout 10 rotate-token client --cluster "$story_name" -n "$ns" --wait-timeout 120 -o json 2>"$story_dir/rotate.err") \
    || { story_token=$(first_token "$story_name-auth" token); load_stop rot || true; why "kvctl rotate-token client --cluster: $(tail -n 3 "$story_dir/rotate.err" | tr '\n' ' ')"; return 1; }
  new=$(first_token "$story_name-auth" token)
  story_token=$new # the acknowledged writes are read back with the new token
  load_stop rot || return 1
  [ "$(kn get secret "$story_name-auth" -o jsonpath='{.data.token}' | base64 -d | grep -c .)" = 1 ] \
    || { why "Secret $story_name-auth holds more than the new token after the rotation"; return 1; }
  fp_new=$(jq -r .fingerprint <<<"$out")
  say "  client token rotated: $(jq -c '[.steps[] | {tokens, nodes, s: (.waitedMs / 1000)}]' <<<"$out")"
  shown=$(kvc_field '{range .status.nodes[*]}{.tokens.client[0]}{" "}{end}')
  [ "$(tr ' ' '\n' <<<"$shown" | grep -c "^$fp_new$")" = 3 ] || { why "status.nodes[].tokens.client shows '$shown', not $fp_new on 3 nodes"; return 1; }
  code=$(code_with "$old"); case $code in 401|403) ;; *) why "the old client token got $code, not 401/403"; return 1 ;; esac
  [ "$(code_with "$new")" = 404 ] || { why "the new client token got $(code_with "$new") for a missing key, not 404"; return 1; }
  say "  old token: $code; new token: 404 for a missing key"
  [ -z "$(kvc_field '{.metadata.annotations.kvstore\.dev/token-rotation}')" ] || { why "the token-rotation annotation is still set"; return 1; }

  story_token=$new
  load_start crot
  out=$(platform_kvctl --timeout 10 rotate-token cluster --cluster "$story_name" -n "$ns" --wait-timeout 120 -o json 2>"$story_dir/rotate.err") \
    || { load_stop crot || true; why "kvctl rotate-token cluster --cluster: $(tail -n 3 "$story_dir/rotate.err" | tr '\n' ' ')"; return 1; }
  load_stop crot || return 1
  say "  cluster token rotated: $(jq -c '[.steps[] | {nodes, s: (.waitedMs / 1000)}]' <<<"$out")"
  settled 3 || { why "not settled after the rotations: phase $(kvc_field '{.status.phase}'), nodes $(node_states)"; return 1; }
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

volumes_condition() { # volumes_condition KVC: "STATUS REASON" of VolumesResized
  kn get kvc "$1" -o jsonpath='{.status.conditions[?(@.type=="VolumesResized")].status} {.status.conditions[?(@.type=="VolumesResized")].reason}'
}
volumes_condition_is() { [ "$(volumes_condition "$1")" = "$2" ]; }
claim_is() { # claim_is PVC REQUEST CAPACITY
  [ "$(kn get pvc "$1" -o jsonpath='{.spec.resources.requests.storage} {.status.capacity.storage}')" = "$2 $3" ]
}

# Volume expansion (issue 17 item 3). The story's claims have no storage
# class, which the API server never lets grow: a larger size must say so and
# change no claim. A cluster of a class that allows expansion grows every
# claim, and its pods keep running.
step_volume_expansion() {
  local class pvc="data-$story_name-0" before
  before=$(kn get pvc "$pvc" -o jsonpath='{.spec.resources.requests.storage}')
  kn patch kvc "$story_name" --type merge -p '{"spec":{"storage":{"size":"128Mi"}}}' >/dev/null
  wait_for 60 "no class: VolumesResized False ExpansionNotSupported" \
    volumes_condition_is "$story_name" "False ExpansionNotSupported" || return 1
  [ "$(kn get pvc "$pvc" -o jsonpath='{.spec.resources.requests.storage}')" = "$before" ] \
    || { why "$pvc was changed though its class cannot grow"; return 1; }
  settled 3 || { why "the refused resize disturbed the cluster: $(node_states) $(kvc_field '{.status.phase}')"; return 1; }
  kn patch kvc "$story_name" --type merge -p "{\"spec\":{\"storage\":{\"size\":\"$before\"}}}" >/dev/null
  wait_for 60 "size back: VolumesResized True" volumes_condition_is "$story_name" "True Resized" || return 1

  class=$(platform_expandable_class)
  if [ -z "$class" ]; then say "  no storage class here lets volumes grow: the growing half is not run"; return 0; fi
  kn apply -f - >/dev/null <<YAML || { why "kubectl apply of KvCluster grow"; return 1; }
apiVersion: kvstore.dev/v1alpha1
kind: KvCluster
metadata: {name: grow}
spec:
  replicas: 1
  replication: {factor: 1}
  image: $image_a
  storage: {size: 64Mi, storageClassName: $class}
$(platform_extra_spec)
YAML
  grow_running() { [ "$(kn get kvc grow -o jsonpath='{.status.phase}')" = Running ]; }
  wait_for "$story_wait" "KvCluster grow Running" grow_running || return 1
  kn patch kvc grow --type merge -p '{"spec":{"storage":{"size":"256Mi"}}}' >/dev/null
  wait_for 60 "grow: VolumesResized True Resized" volumes_condition_is grow "True Resized" || return 1
  claim_is data-grow-0 256Mi 256Mi || { why "data-grow-0: $(kn get pvc data-grow-0 -o jsonpath='{.spec.resources.requests.storage} {.status.capacity.storage}')"; return 1; }
  [ "$(kn get sts grow -o jsonpath='{.spec.volumeClaimTemplates[0].spec.resources.requests.storage}')" = 64Mi ] \
    || { why "the StatefulSet's claim template changed"; return 1; }
  grow_running || { why "grow is $(kn get kvc grow -o jsonpath='{.status.phase}') after the resize"; return 1; }
  kn delete kvc grow --wait=true --timeout=60s >/dev/null || { why "kubectl delete kvc grow"; return 1; }
}

pod_monitor_field() { kn get podmonitor "$story_name" -o "jsonpath=$1" 2>/dev/null; }
pod_monitor_gone() { ! kn get podmonitor "$story_name" -o name >/dev/null 2>&1; }
pod_monitor_there() { kn get podmonitor "$story_name" -o name >/dev/null 2>&1; }

# Monitoring per cluster (issue 20): where the Prometheus Operator's CRDs are
# installed, the operator makes a PodMonitor for the cluster's node pods (the
# API server checks it against the real CRD's schema), owned by the
# KvCluster; spec.monitoring.podMonitor false deletes it.
step_pod_monitor() {
  if ! k get crd podmonitors.monitoring.coreos.com >/dev/null 2>&1; then
    say "  no PodMonitor CRD on this cluster: nothing to check"; return 0
  fi
  wait_for 60 "PodMonitor $story_name" pod_monitor_there || return 1
  local instance port label owner
  instance=$(pod_monitor_field '{.spec.selector.matchLabels.app\.kubernetes\.io/instance}')
  port=$(pod_monitor_field '{.spec.podMetricsEndpoints[0].port}')
  label=$(pod_monitor_field '{.spec.podMetricsEndpoints[0].relabelings[0].targetLabel}')
  owner=$(pod_monitor_field '{.metadata.ownerReferences[0].kind}/{.metadata.ownerReferences[0].name}')
  [ "$instance $port $label $owner" = "$story_name client kvcluster KvCluster/$story_name" ] \
    || { why "PodMonitor: selector instance '$instance', port '$port', relabel '$label', owner '$owner'"; return 1; }
  kn patch kvc "$story_name" --type merge -p '{"spec":{"monitoring":{"podMonitor":false}}}' >/dev/null
  wait_for 60 "podMonitor false: PodMonitor deleted" pod_monitor_gone || return 1
  kn patch kvc "$story_name" --type merge -p '{"spec":{"monitoring":{"podMonitor":true}}}' >/dev/null
  wait_for 60 "podMonitor true: PodMonitor back" pod_monitor_there
}

# --- tls: a second cluster with spec.tls.mode Generated ---------------------------
secure_field() { kn get kvc secure -o "jsonpath=$1"; }
# secure_running N: KvCluster secure Running, N nodes in its status, all Up
secure_running() {
  local states
  [ "$(secure_field '{.status.phase}')" = Running ] || return 1
  states=$(secure_field '{range .status.nodes[*]}{.state}{"\n"}{end}') || return 1
  [ "$(grep -c . <<<"$states")" = "$1" ] && [ "$(grep -c '^Up$' <<<"$states")" = "$1" ]
}
secure_pods_ready() {
  [ "$(kn get pods -l app.kubernetes.io/instance=secure,app.kubernetes.io/component=node -o json \
    | jq '[.items[] | select(any(.status.conditions[]?; .type == "Ready" and .status == "True"))] | length')" = "$1" ]
}
# secret_file SECRET KEY FILE: one key of a Secret, decoded into FILE (not empty)
secret_file() {
  kn get secret "$1" -o "jsonpath={.data.${2//./\\.}}" | base64 -d > "$3" && [ -s "$3" ]
}
# curl_code ARGS...: "EXIT STATUS" of a curl through the cluster's names
# (STATUS 000: no HTTP answer)
curl_code() {
  local code rc=0
  code=$(platform_curl -s -m 5 -o /dev/null -w '%{http_code}' "$@") || rc=$?
  echo "$rc ${code:-000}"
}

# TLS (issue 18): the client port serves HTTPS only, the peer port wants a
# client certificate from the cluster's CA, and the pods are Ready only if
# the kubelet's HTTPS probes pass. Cluster secure is deleted at the end.
step_tls() {
  local rc=0
  tls_checks || rc=$?
  kn delete kvc secure --wait=true --timeout=120s >/dev/null 2>&1 || { [ "$rc" != 0 ] || why "kubectl delete kvc secure"; rc=1; }
  kn delete pvc data-secure-0 data-secure-1 data-secure-2 --ignore-not-found --wait=false >/dev/null 2>&1 || true
  return "$rc"
}
tls_checks() {
  local d=$story_dir/secure svc="secure.$ns.svc" peer="secure-0.secure-peers.$ns.svc" tok ctok got out seen
  mkdir -p "$d"
  kn apply -f - >/dev/null <<YAML || { why "kubectl apply of KvCluster secure"; return 1; }
apiVersion: kvstore.dev/v1alpha1
kind: KvCluster
metadata: {name: secure}
spec:
  replicas: 3
  image: $image_a
  replication: {factor: 3}
  storage: {size: 64Mi}
  tls: {mode: Generated}
$(platform_extra_spec)
YAML
  wait_for "$story_wait" "KvCluster secure Running, 3 nodes Up" secure_running 3 \
    || { why "secure: phase $(secure_field '{.status.phase}'), nodes $(secure_field '{range .status.nodes[*]}{.ordinal}={.state} {end}')"; return 1; }
  [ "$(kn get sts secure -o jsonpath='{.spec.template.spec.containers[0].readinessProbe.httpGet.scheme}')" = HTTPS ] \
    || { why "the readiness probe of secure's pods is not HTTPS"; return 1; }
  wait_for 60 "3 pods of secure Ready on HTTPS probes" secure_pods_ready 3 || return 1
  secret_file secure-ca ca.crt "$d/ca.crt" || { why "no ca.crt in Secret secure-ca"; return 1; }
  if ! secret_file secure-tls tls.crt "$d/tls.crt" || ! secret_file secure-tls tls.key "$d/tls.key"; then
    why "no tls.crt and tls.key in Secret secure-tls"; return 1
  fi
  tok=$(kn get secret secure-auth -o jsonpath='{.data.token}' | base64 -d)
  ctok=$(kn get secret secure-cluster-auth -o jsonpath='{.data.cluster-token}' | base64 -d)
  if [ -z "$tok" ] || [ -z "$ctok" ]; then why "no token in Secret secure-auth or secure-cluster-auth"; return 1; fi

  # At All every node stores the write: the nodes reach each other over mutual TLS.
  KV_TOKEN=$tok platform_kvctl --timeout 5 --cacert "$d/ca.crt" --endpoint "https://$svc:7400" --consistency all put tls-key over-https >/dev/null \
    || { why "kvctl --cacert put at All over https://$svc:7400 failed"; return 1; }
  got=$(KV_TOKEN=$tok platform_kvctl --timeout 5 --cacert "$d/ca.crt" --endpoint "https://secure-2.secure-peers.$ns.svc:7400" --consistency one get tls-key) \
    || { why "kvctl --cacert get through node 2 failed"; return 1; }
  [ "$got" = over-https ] || { why "tls-key reads '$got' through node 2"; return 1; }
  say "  kvctl --cacert: put at All and read back through node 2 over https"

  if out=$(KV_TOKEN=$tok platform_kvctl --timeout 5 --endpoint "https://$svc:7400" get tls-key 2>&1); then
    why "kvctl without the cluster's CA was answered: $out"; return 1
  fi
  grep -qi certificate <<<"$out" || { why "kvctl without the CA failed, but not on the certificate: $out"; return 1; }
  say "  kvctl without the CA refused: $(tail -n 1 <<<"$out")"

  seen=$(curl_code --cacert "$d/ca.crt" "https://$svc:7400/healthz")
  [ "$seen" = "0 200" ] || { why "https /healthz with the CA: curl exit and status $seen, not 0 200"; return 1; }
  seen=$(curl_code "http://$svc:7400/healthz")
  case ${seen#* } in 2*|3*) why "plain http to the client port answered $seen"; return 1 ;; esac
  say "  client port: https /healthz 200; plain http: curl exit and status $seen"

  seen=$(curl_code --cacert "$d/ca.crt" --cert "$d/tls.crt" --key "$d/tls.key" -H "Authorization: Bearer $ctok" "https://$peer:7401/internal/v1/clock")
  [ "$seen" = "0 200" ] || { why "peer port with the cluster's certificate and token: curl exit and status $seen, not 0 200"; return 1; }
  seen=$(curl_code --cacert "$d/ca.crt" -H "Authorization: Bearer $ctok" "https://$peer:7401/internal/v1/clock")
  case ${seen#* } in 000) ;; *) why "peer port without a client certificate answered $seen"; return 1 ;; esac
  say "  peer port: 200 with the cluster's certificate and token; without a client certificate: curl exit and status $seen"
}

# --- tls-provided: a certificate issued elsewhere (spec.tls.mode Provided) ------
# issue_cert DIR NAME DNS...: a CA and a certificate for the DNS names, good
# for server and client authentication, in DIR/{ca.crt,NAME.crt,NAME.key}:
# the files a cert-manager Certificate writes into its Secret.
issue_cert() {
  local d=$1 name=$2 san; shift 2
  san=$(printf 'DNS:%s,' "$@"); san=${san%,}
  [ -f "$d/ca.crt" ] || openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$d/ca.key" -out "$d/ca.crt" -subj /CN=e2e-issuer -days 2 \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign 2>/dev/null || return 1
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$d/$name.key" \
    -out "$d/$name.csr" -subj "/CN=$name" 2>/dev/null || return 1
  openssl x509 -req -in "$d/$name.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial -days 2 \
    -out "$d/$name.crt" -extfile <(printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\nkeyUsage=critical,digitalSignature\n' "$san") 2>/dev/null
}
# provided_kvc NAME N: a KvCluster of N nodes (factor N) on the Secret NAME-cert
provided_kvc() {
  cat <<YAML
apiVersion: kvstore.dev/v1alpha1
kind: KvCluster
metadata: {name: $1}
spec:
  replicas: $2
  image: $image_a
  replication: {factor: $2}
  storage: {size: 64Mi}
  tls: {mode: Provided, secretName: $1-cert}
$(platform_extra_spec)
YAML
}
provided_field() { kn get kvc "$1" -o "jsonpath=$2"; }
# progressing_is KVC "STATUS REASON"
progressing_is() { [ "$(provided_field "$1" '{.status.conditions[?(@.type=="Progressing")].status} {.status.conditions[?(@.type=="Progressing")].reason}')" = "$2" ]; }
provided_running() {
  local states
  [ "$(provided_field provided '{.status.phase}')" = Running ] || return 1
  states=$(provided_field provided '{range .status.nodes[*]}{.state}{"\n"}{end}') || return 1
  [ "$(grep -c '^Up$' <<<"$states")" = 2 ]
}

# TLS with a certificate issued elsewhere (issue 18): the Secret a
# cert-manager Certificate would write (tls.crt, tls.key, ca.crt; the
# certificate names every pod through a wildcard), made here with openssl.
# The nodes serve it on both ports, talk to each other over mutual TLS with
# it, and the operator calls them trusting its ca.crt. A Secret whose
# certificate does not name the pods is reported, not used quietly.
step_tls_provided() {
  local rc=0
  tls_provided_checks || rc=$?
  kn delete kvc provided misnamed --ignore-not-found --wait=true --timeout=120s >/dev/null 2>&1 || { [ "$rc" != 0 ] || why "kubectl delete kvc provided misnamed"; rc=1; }
  kn delete pvc data-provided-0 data-provided-1 data-misnamed-0 --ignore-not-found --wait=false >/dev/null 2>&1 || true
  kn delete secret provided-cert misnamed-cert --ignore-not-found >/dev/null 2>&1 || true
  return "$rc"
}
tls_provided_checks() {
  local d=$story_dir/provided tok got
  mkdir -p "$d"
  issue_cert "$d" provided "*.provided-peers.$ns.svc" "*.provided-peers.$ns.svc.cluster.local" "provided.$ns.svc" \
    || { why "openssl could not issue the test certificate"; return 1; }
  issue_cert "$d" misnamed "*.elsewhere.$ns.svc" || { why "openssl could not issue the misnamed certificate"; return 1; }
  kn create secret generic provided-cert --from-file=tls.crt="$d/provided.crt" --from-file=tls.key="$d/provided.key" \
    --from-file=ca.crt="$d/ca.crt" >/dev/null || { why "kubectl create secret provided-cert"; return 1; }
  kn create secret generic misnamed-cert --from-file=tls.crt="$d/misnamed.crt" --from-file=tls.key="$d/misnamed.key" \
    --from-file=ca.crt="$d/ca.crt" >/dev/null || { why "kubectl create secret misnamed-cert"; return 1; }
  { provided_kvc provided 2; echo ---; provided_kvc misnamed 1; } | kn apply -f - >/dev/null \
    || { why "kubectl apply of KvClusters provided and misnamed"; return 1; }
  wait_for "$story_wait" "KvCluster provided Running, 2 nodes Up" provided_running \
    || { why "provided: phase $(provided_field provided '{.status.phase}'), nodes $(provided_field provided '{range .status.nodes[*]}{.ordinal}={.state} {end}'), conditions $(provided_field provided '{.status.conditions}')"; return 1; }
  [ "$(kn get secret -o name | grep -c '^secret/provided-\(ca\|tls\)$')" = 0 ] \
    || { why "the operator made a CA or certificate Secret for a Provided cluster"; return 1; }
  tok=$(kn get secret provided-auth -o jsonpath='{.data.token}' | base64 -d)
  KV_TOKEN=$tok platform_kvctl --timeout 5 --cacert "$d/ca.crt" --endpoint "https://provided.$ns.svc:7400" --consistency all put provided-key issued-elsewhere >/dev/null \
    || { why "kvctl --cacert put at All over https://provided.$ns.svc:7400 failed"; return 1; }
  got=$(KV_TOKEN=$tok platform_kvctl --timeout 5 --cacert "$d/ca.crt" --endpoint "https://provided-1.provided-peers.$ns.svc:7400" --consistency one get provided-key) \
    || { why "kvctl --cacert get through node 1 failed"; return 1; }
  [ "$got" = issued-elsewhere ] || { why "provided-key reads '$got' through node 1"; return 1; }
  say "  provided: Running on the user's certificate; put at All (mutual TLS between the nodes) and read back through node 1"
  wait_for 60 "misnamed: Progressing False TlsSecretInvalid" progressing_is misnamed "False TlsSecretInvalid" \
    || { why "misnamed: conditions $(provided_field misnamed '{.status.conditions}')"; return 1; }
  got=$(provided_field misnamed '{.status.conditions[?(@.type=="Progressing")].message}')
  grep -q "not valid for misnamed-0.misnamed-peers.$ns.svc" <<<"$got" || { why "misnamed: the message does not name the pod: $got"; return 1; }
  say "  misnamed: $got"
}

# --- backup: a KvBackup under a write load, restored into a new cluster ------
# (issue 20) The operator takes the backup to a real S3-compatible server;
# kvctl restores it into a KvCluster of another placement; every write
# acknowledged before the backup began reads back there with its value.
step_backup() {
  local d=$story_dir/backup rc=0 endpoint
  mkdir -p "$d"
  if ! endpoint=$(platform_s3_start "$d"); then
    say "  no S3-compatible server on this platform: the backup step does nothing here"
    return 0
  fi
  backup_checks "$endpoint" "$d" || rc=$?
  if [ "$rc" = 0 ]; then bootstrap_checks "$endpoint" "$d" || rc=$?; fi
  kn delete kvc restored --ignore-not-found --wait=true --timeout=120s >/dev/null 2>&1 || { [ "$rc" != 0 ] || why "kubectl delete kvc restored"; rc=1; }
  kn delete pvc data-restored-0 data-restored-1 data-restored-2 --ignore-not-found --wait=false >/dev/null 2>&1 || true
  platform_s3_stop "$d"
  kn patch kvc "$story_name" --type json -p '[{"op":"remove","path":"/spec/backup"}]' >/dev/null 2>&1 || true
  kn delete kvbackup story-backup story-backup-again --ignore-not-found --wait=false >/dev/null 2>&1 || true
  kn delete kvbackup -l "kvstore.dev/scheduled-for=$story_name" --wait=false >/dev/null 2>&1 || true
  kn delete kvc bootstrapped --ignore-not-found --wait=true --timeout=120s >/dev/null 2>&1 || { [ "$rc" != 0 ] || why "kubectl delete kvc bootstrapped"; rc=1; }
  kn delete pvc data-bootstrapped-0 data-bootstrapped-1 data-bootstrapped-2 --ignore-not-found --wait=false >/dev/null 2>&1 || true
  return "$rc"
}
backup_field() { kn get kvbackup "$1" -o "jsonpath=$2"; }
scheduled_backups() {
  kn get kvbackup -l "kvstore.dev/scheduled-for=$story_name" \
    -o jsonpath='{range .items[*]}{.metadata.name}={.status.phase} {.spec.destination}; {end}'
}
scheduled_completed() { grep -q '=Completed ' <<<"$(scheduled_backups)"; }
backup_phase_is() { [ "$(backup_field "$1" '{.status.phase}')" = "$2" ]; }
backup_gone() { ! kn get kvbackup "$1" -o name >/dev/null 2>&1; }
schedule_refused() {
  kn get events --field-selector reason=BackupScheduleInvalid -o jsonpath='{range .items[*]}{.message}{"\n"}{end}' \
    | grep -q 'every day'
}
restored_field() { kn get kvc restored -o "jsonpath=$1"; }
restored_running() {
  local states
  [ "$(restored_field '{.status.phase}')" = Running ] || return 1
  states=$(restored_field '{range .status.nodes[*]}{.state}{"\n"}{end}') || return 1
  [ "$(grep -c . <<<"$states")" = 3 ] && [ "$(grep -c '^Up$' <<<"$states")" = 3 ]
}
# acked_read_back CLUSTER URL TOKEN FILE: every `key value` of FILE (writes
# acknowledged before the backup began) reads back at Quorum, and kvctl
# verify finds every bucket's owners equal.
acked_read_back() {
  local cluster=$1 url=$2 tok=$3 file=$4 key val got out lost=0 n
  n=$(grep -c . "$file")
  while read -r key val; do
    got=$(KV_TOKEN=$tok platform_kvctl --timeout 5 --endpoint "$url" --consistency quorum get "$key" 2>&1) || got="ERROR $got"
    if [ "$got" != "$val" ]; then lost=$((lost + 1)); [ "$lost" -le 3 ] && say "  $key=$val reads '$got' in $cluster"; fi
  done < "$file"
  [ "$lost" = 0 ] || { why "$lost of $n writes acknowledged before the backup are missing from $cluster"; return 1; }
  out=$(KV_TOKEN=$tok platform_kvctl --endpoint "$url" verify 2>&1) || { why "kvctl verify of $cluster: $(tail -n 3 <<<"$out" | tr '\n' ' ')"; return 1; }
  say "  all $n writes acknowledged before the backup read back in $cluster at Quorum; verify: $(tail -n 1 <<<"$out")"
}
bootstrapped_field() { kn get kvc bootstrapped -o "jsonpath=$1"; }
bootstrapped_restored() {
  [ "$(bootstrapped_field '{.status.bootstrap.phase}')" = Restored ] && [ "$(bootstrapped_field '{.status.phase}')" = Running ]
}
bootstrap_source_made() { kn get secret bootstrapped-bootstrap -o name >/dev/null 2>&1; }
bootstrap_source_gone() { ! bootstrap_source_made; }
# spec.bootstrap.fromBackup: `kvctl restore --cluster bootstrapped --like
# restored` makes a new KvCluster (restored's spec: factor 2) whose nodes load
# their buckets from the first backup before they serve; nothing is pushed
# into it. Every write acknowledged before that backup began reads back.
bootstrap_checks() {
  local endpoint=$1 d=$2 url="s3://kv-backups/$story_name/first" out tok svc started made sts_made
  started=$(date +%s)
  out=$(platform_kvctl restore --cluster bootstrapped -n "$ns" --like restored --from "$url" \
    --s3-endpoint "$endpoint" --s3-region us-east-1 --s3-credentials-secret backup-s3 --no-wait 2>&1) \
    || { why "kvctl restore --cluster bootstrapped: $(tail -n 3 <<<"$out" | tr '\n' ' ')"; return 1; }
  [ "$(bootstrapped_field '{.spec.bootstrap.fromBackup.destination}')" = "$url" ] \
    || { why "KvCluster bootstrapped has no spec.bootstrap.fromBackup of $url: $(bootstrapped_field '{.spec}')"; return 1; }
  # a KvCluster of that name now exists: a second restore is refused
  if out=$(platform_kvctl restore --cluster bootstrapped -n "$ns" --from "$url" --no-wait 2>&1); then
    why "a second kvctl restore --cluster bootstrapped succeeded: $out"; return 1
  fi
  grep -q "already exists" <<<"$out" || { why "the second restore failed for another reason: $out"; return 1; }
  # one restoring cluster at a time on the platform's cores
  kn delete kvc restored --wait=true --timeout=120s >/dev/null 2>&1 || { why "kubectl delete kvc restored"; return 1; }
  # the source is there for the nodes before any of them can start
  wait_for 30 "Secret bootstrapped-bootstrap made" bootstrap_source_made || return 1
  made=$(kn get secret bootstrapped-bootstrap -o jsonpath='{.metadata.creationTimestamp}')
  sts_made=$(kn get sts bootstrapped -o jsonpath='{.metadata.creationTimestamp}' 2>/dev/null || true)
  if [ -n "$sts_made" ] && [[ "$sts_made" < "$made" ]]; then
    why "StatefulSet bootstrapped made at $sts_made, before its source Secret ($made)"; return 1
  fi
  wait_for "$story_wait" "KvCluster bootstrapped Restored and Running" bootstrapped_restored \
    || { why "bootstrapped: phase $(bootstrapped_field '{.status.phase}'), bootstrap $(bootstrapped_field '{.status.bootstrap}')"; return 1; }
  say "  bootstrapped: Restored $(( $(date +%s) - started )) s after kvctl restore --cluster (finishedAt $(bootstrapped_field '{.status.bootstrap.finishedAt}'))"
  wait_for 60 "Secret bootstrapped-bootstrap deleted once restored" bootstrap_source_gone || return 1
  tok=$(kn get secret bootstrapped-auth -o jsonpath='{.data.token}' | base64 -d)
  svc=$(story_name=bootstrapped platform_service_url)
  acked_read_back bootstrapped "$svc" "$tok" "$d/before.acked" || return 1
  # the same comparison by kv-operator, through the Kubernetes API alone
  out=$(platform_kvctl verify --cluster bootstrapped -n "$ns" --verify-timeout 60 2>&1) \
    || { why "kvctl verify --cluster bootstrapped: $(tail -n 3 <<<"$out" | tr '\n' ' ')"; return 1; }
  grep -q ' 0 differ (kv-operator' <<<"$out" || { why "kvctl verify --cluster bootstrapped: $out"; return 1; }
  say "  kvctl verify --cluster: $(tail -n 1 <<<"$out")"
  if out=$(kn patch kvc bootstrapped --type merge -p '{"spec":{"bootstrap":{"fromBackup":{"destination":"s3://kv-backups/elsewhere"}}}}' 2>&1); then
    why "a change of spec.bootstrap was accepted: $out"; return 1
  fi
  grep -q "cannot change" <<<"$out" || { why "spec.bootstrap change refused for another reason: $out"; return 1; }
  say "  a change of spec.bootstrap refused by the API server"
}
backup_checks() {
  local endpoint=$1 d=$2 url="s3://kv-backups/$story_name/first" out records phase n old
  local restored_url tok ctok
  mkdir -p "$d/root/kv-backups"
  kn create secret generic backup-s3 --from-literal=accessKeyId="$s3_access_key" \
    --from-literal=secretAccessKey="$s3_secret_key" --dry-run=client -o yaml | kn apply -f - >/dev/null \
    || { why "cannot create the Secret backup-s3"; return 1; }
  story_token=$(token)
  load_start backup
  sleep 3
  # every write acknowledged before the backup begins must be in it
  cp "$story_dir/backup.acked" "$d/before.acked"
  out=$(platform_kvctl backup --cluster "$story_name" -n "$ns" --to "$url" --backup-name story-backup \
    --s3-endpoint "$endpoint" --s3-region us-east-1 --s3-credentials-secret backup-s3 --backup-timeout 180 2>&1) \
    || { why "kvctl backup --cluster: $(tail -n 3 <<<"$out" | tr '\n' ' ')"; load_stop backup || true; return 1; }
  say "  $(tail -n 1 <<<"$out")"
  load_stop backup || return 1
  phase=$(backup_field story-backup '{.status.phase}')
  records=$(backup_field story-backup '{.status.records}')
  n=$(wc -l < "$d/before.acked")
  [ "$phase" = Completed ] || { why "KvBackup story-backup is '$phase', not Completed"; return 1; }
  [ "${records:-0}" -ge "$n" ] || { why "KvBackup story-backup holds $records records, fewer than the $n writes acknowledged before it began"; return 1; }
  [ -f "$d/root/kv-backups/$story_name/first/manifest.json" ] \
    || { why "no manifest.json under the S3 server's kv-backups/$story_name/first"; return 1; }
  say "  KvBackup Completed: $records records, $(backup_field story-backup '{.status.bytes}') bytes, $(backup_field story-backup '{.status.segmentsDone}') segments, epoch $(backup_field story-backup '{.status.epoch}'); $n writes were acknowledged before it began"

  # A KvBackup's spec is immutable, and a destination holding a backup is refused.
  if out=$(kn patch kvbackup story-backup --type merge -p '{"spec":{"destination":"s3://kv-backups/elsewhere"}}' 2>&1); then
    why "a change of a KvBackup's spec was accepted: $out"; return 1
  fi
  grep -q "cannot change" <<<"$out" || { why "the spec change was refused, but not by the CEL rule: $out"; return 1; }
  if out=$(platform_kvctl backup --cluster "$story_name" -n "$ns" --to "$url" --backup-name story-backup-again \
    --s3-endpoint "$endpoint" --s3-credentials-secret backup-s3 --backup-timeout 60 2>&1); then
    why "a second backup to $url succeeded: $out"; return 1
  fi
  [ "$(backup_field story-backup-again '{.status.phase}')" = Failed ] || { why "the second backup to $url is not Failed: $out"; return 1; }
  grep -q "already holds a backup" <<<"$(backup_field story-backup-again '{.status.message}')" \
    || { why "the second backup failed for another reason: $(backup_field story-backup-again '{.status.message}')"; return 1; }
  say "  spec change refused by the API server; a second backup to the same place Failed: already holds a backup"

  # spec.backup.schedule: an invalid one is told (Warning Event) and the
  # cluster goes on; every minute, a KvBackup of the scheduled time is made
  # under <destination>/<its name> and completes.
  kn patch kvc "$story_name" --type merge -p "{\"spec\":{\"backup\":{\"schedule\":\"every day\",\"destination\":\"s3://kv-backups/$story_name/scheduled\",\"s3\":{\"endpoint\":\"$endpoint\",\"credentialsSecret\":\"backup-s3\"}}}}" >/dev/null \
    || { why "cannot set spec.backup"; return 1; }
  wait_for 60 "Warning BackupScheduleInvalid for the schedule 'every day'" schedule_refused || return 1
  phase_is Running || { why "phase $(kvc_field '{.status.phase}') with an invalid backup schedule, not Running"; return 1; }
  kn patch kvc "$story_name" --type merge -p '{"spec":{"backup":{"schedule":"* * * * *"}}}' >/dev/null \
    || { why "cannot set spec.backup.schedule"; return 1; }
  wait_for 90 "a scheduled KvBackup Completed" scheduled_completed || { why "scheduled KvBackups: $(scheduled_backups)"; return 1; }
  [ -f "$d/root/kv-backups/$story_name/scheduled/$(kn get kvbackup -l "kvstore.dev/scheduled-for=$story_name" -o jsonpath='{.items[0].metadata.name}')/manifest.json" ] \
    || { why "no manifest.json of the first scheduled backup under kv-backups/$story_name/scheduled/<its name>"; return 1; }
  # keep: 1 deletes an older scheduled backup, its objects first (one made
  # here in the form a schedule makes, for a time long past).
  old="$story_name-20200101-000000"
  kn apply -f - >/dev/null <<YAML || { why "kubectl apply of KvBackup $old"; return 1; }
apiVersion: kvstore.dev/v1alpha1
kind: KvBackup
metadata:
  name: $old
  labels: {kvstore.dev/scheduled-for: $story_name}
  annotations: {kvstore.dev/scheduled-at: "2020-01-01T00:00:00Z"}
spec:
  cluster: $story_name
  destination: s3://kv-backups/$story_name/scheduled/$old
  s3: {endpoint: "$endpoint", credentialsSecret: backup-s3}
YAML
  wait_for 60 "KvBackup $old Completed" backup_phase_is "$old" Completed || return 1
  [ -f "$d/root/kv-backups/$story_name/scheduled/$old/manifest.json" ] || { why "no manifest.json of $old"; return 1; }
  kn patch kvc "$story_name" --type merge -p '{"spec":{"backup":{"keep":1}}}' >/dev/null \
    || { why "cannot set spec.backup.keep"; return 1; }
  wait_for 60 "KvBackup $old deleted by keep: 1" backup_gone "$old" || return 1
  [ "$(find "$d/root/kv-backups/$story_name/scheduled/$old" -type f 2>/dev/null | wc -l)" = 0 ] \
    || { why "objects of $old left after it was deleted: $(find "$d/root/kv-backups/$story_name/scheduled/$old" -type f | head -n 3 | tr '\n' ' ')"; return 1; }
  scheduled_completed || { why "keep: 1 left no Completed scheduled backup: $(scheduled_backups)"; return 1; }
  kn patch kvc "$story_name" --type json -p '[{"op":"remove","path":"/spec/backup"}]' >/dev/null \
    || { why "cannot remove spec.backup"; return 1; }
  say "  keep: 1 deleted $old and its objects; scheduled now: $(scheduled_backups)"

  # Restore into a new cluster of another placement (factor 2), with kvctl.
  kn apply -f - >/dev/null <<YAML || { why "kubectl apply of KvCluster restored"; return 1; }
apiVersion: kvstore.dev/v1alpha1
kind: KvCluster
metadata: {name: restored}
spec:
  replicas: 3
  image: $image_a
  replication: {factor: 2}
  storage: {size: 64Mi}
$(platform_extra_spec)
YAML
  wait_for "$story_wait" "KvCluster restored Running, 3 nodes Up" restored_running \
    || { why "restored: phase $(restored_field '{.status.phase}')"; return 1; }
  tok=$(kn get secret restored-auth -o jsonpath='{.data.token}' | base64 -d)
  ctok=$(kn get secret restored-cluster-auth -o jsonpath='{.data.cluster-token}' | base64 -d)
  restored_url=$(story_name=restored platform_service_url)
  out=$(AWS_ENDPOINT_URL=$endpoint AWS_ACCESS_KEY_ID=$s3_access_key AWS_SECRET_ACCESS_KEY=$s3_secret_key AWS_REGION=us-east-1 \
    KV_TOKEN=$tok KV_CLUSTER_TOKEN=$ctok platform_kvctl --timeout 30 --endpoint "$restored_url" restore --from "$url" 2>&1) \
    || { why "kvctl restore into restored: $(tail -n 3 <<<"$out" | tr '\n' ' ')"; return 1; }
  say "  kvctl restore: $(tail -n 1 <<<"$out")"
  acked_read_back restored "$restored_url" "$tok" "$d/before.acked"
}

owned_gone() {
  [ -z "$(kn get sts,svc,cm,pdb,pods -l "app.kubernetes.io/instance=$story_name" -o name 2>/dev/null)" ]
}
node_state_is() { [ "$(kvc_field "{.status.nodes[?(@.ordinal==$1)].state}")" = "$2" ]; }
pod_gone() { ! kn get pod "$1" -o name >/dev/null 2>&1; }

step_delete_gc() {
  local policy pvcs_before pvcs_after
  policy=$(kn get sts "$story_name" -o jsonpath='{.spec.persistentVolumeClaimRetentionPolicy.whenDeleted}')
  pvcs_before=$(data_pvcs) # the story cluster's only: other steps' claims may still be terminating
  kn delete kvc "$story_name" --wait=true --timeout="${story_wait}s" >/dev/null \
    || { why "kubectl delete kvc did not return within $story_wait s"; return 1; }
  wait_for 120 "owned StatefulSet, Services, ConfigMap, PDB, pods garbage-collected" owned_gone || return 1
  sleep 5
  pvcs_after=$(data_pvcs)
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
    step hibernate step_hibernate
    step restart step_restart
    step rotate-token step_rotate_token
    step wiped-volume step_wiped_volume
    step volume-expansion step_volume_expansion
    step pod-monitor step_pod_monitor
    step tls step_tls
    step tls-provided step_tls_provided
    step backup step_backup
    step delete-gc step_delete_gc
  fi
}

story_summary() {
  local r
  echo
  echo "== end-to-end story: $story_passed passed, $story_failed failed, $story_skipped skipped (known operator gaps)"
  for r in "${story_results[@]}"; do echo "  $r"; done
}
