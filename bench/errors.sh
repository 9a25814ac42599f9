#!/usr/bin/env bash
# Quorum reads right after a write load, against `kvctl up`'s node 0, over
# and over: the sequence that once answered 2 407 of ~207 000 reads non-2xx
# (issue 16, item 4). Each round starts a fresh 3-node cluster (Full,
# Quorum), writes for DURATION with CONNS connections to node 0, then reads
# the same keys at Quorum for DURATION, and prints every run's errors by
# kind with the first message of each (kvctl bench's errorExamples).
#
# Usage: bench/errors.sh [ROUNDS]     (default 10)
#   DURATION=6s CONNS=32 KEYS=10000 VALUE_SIZE=100   the load of each run
#   CARGO_TARGET_DIR                                 where the release build goes
# Exit status 1 when any run had an error.
set -euo pipefail
ROUNDS="${1:-10}"
DURATION="${DURATION:-6s}"
CONNS="${CONNS:-32}"
KEYS="${KEYS:-10000}"
VALUE_SIZE="${VALUE_SIZE:-100}"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
TARGET_DIR="${CARGO_TARGET_DIR:-$REPO/target}"
log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
for tool in curl jq; do command -v "$tool" >/dev/null || die "$tool is needed"; done

(cd "$REPO" && CARGO_TARGET_DIR="$TARGET_DIR" cargo build --release -q -p kv-node -p kvctl) ||
    die "cargo build --release -p kv-node -p kvctl"
KVCTL="$TARGET_DIR/release/kvctl"
KV_NODE="$TARGET_DIR/release/kv-node"

WORK="$(mktemp -d /tmp/kv-errors.XXXXXX)"
UP_PID=""
stop_up() {
    if [[ -n "$UP_PID" ]]; then
        kill -TERM "$UP_PID" 2>/dev/null || true
        wait "$UP_PID" 2>/dev/null || true
        UP_PID=""
    fi
}
trap 'stop_up; rm -rf "$WORK"' EXIT

# one_run ID ARGS...: a kvctl bench run against node 0; prints its errors
one_run() {
    local id="$1"
    shift
    "$KVCTL" bench --driver kvstore --endpoints "$NODE0" --token "$TOKEN" \
        --connections "$CONNS" --keys "$KEYS" --value-size "$VALUE_SIZE" \
        --duration "$DURATION" --warmup 0s --quiet -o json "$@" >"$WORK/$id.json"
    jq -r --arg id "$id" '"\($id): \(.opsPerSecond | floor) ops/s, \(.errors) errors" +
        (if .errors > 0 then " \(.errorsByKind)\n" + ([.errorExamples | to_entries[] | "    first \(.key): \(.value)"] | join("\n")) else "" end)' \
        "$WORK/$id.json"
    jq -e '.errors == 0' "$WORK/$id.json" >/dev/null
}

failed=0
for round in $(seq 1 "$ROUNDS"); do
    dir="$WORK/up-$round"
    mkdir -p "$dir"
    "$KVCTL" up --data-dir "$dir" --nodes 3 --listen 127.0.0.1:0 --node-binary "$KV_NODE" \
        >"$dir/up.log" 2>&1 &
    UP_PID=$!
    gateway="" TOKEN=""
    for _ in $(seq 1 100); do
        gateway="$(awk '/^gateway: / {print $2; exit}' "$dir/up.log")"
        TOKEN="$(awk '/^token: / {print $2; exit}' "$dir/up.log")"
        [[ -n "$gateway" && -n "$TOKEN" ]] && break
        sleep 0.1
    done
    [[ -n "$gateway" ]] || die "kvctl up printed no gateway: $(cat "$dir/up.log")"
    NODE0=""
    for _ in $(seq 1 300); do
        view="$(curl -s --max-time 2 -H "Authorization: Bearer $TOKEN" "$gateway/v1/cluster" || true)"
        if jq -e '[.nodes[] | select(.state == "Up" and .running)] | length == 3' <<<"$view" >/dev/null 2>&1; then
            NODE0="http://$(jq -r '.nodes[0].address' <<<"$view")"
            break
        fi
        sleep 0.1
    done
    [[ -n "$NODE0" ]] || die "round $round: the cluster was not Up within 30 s: $(tail -5 "$dir/up.log")"
    one_run "round $round write" --read-ratio 0 --consistency quorum || failed=1
    one_run "round $round read " --read-ratio 1 --consistency quorum || failed=1
    stop_up
done
if [[ "$failed" == 1 ]]; then
    log "some runs had errors (above)"
    exit 1
fi
log "$ROUNDS rounds, no errors"
