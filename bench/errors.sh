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
#   LOADGEN=kvctl|wrk      the load generator (wrk: bench/wrk/kv.lua, 2
#                          threads, as in the issue; counts every non-2xx
#                          answer by status, 404 included)
#   PREFILL=0|1            write every key once before the write load
#   CARGO_TARGET_DIR                                 where the release build goes
# Before the reads, the keys that exist are counted (listing through node 0):
# a read of a key no write reached answers 404, which wrk counts as an error.
# Exit status 1 when any run had an error other than such 404s.
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
LOADGEN="${LOADGEN:-kvctl}"
PREFILL="${PREFILL:-0}"
for tool in curl jq; do command -v "$tool" >/dev/null || die "$tool is needed"; done
if [[ "$LOADGEN" == wrk ]]; then
    command -v wrk >/dev/null || die "wrk is needed for LOADGEN=wrk (apt-get install wrk)"
fi

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

# wrk_run ID METHOD: a wrk run against node 0; prints its answers that are
# not 2xx by status; fails on socket errors or on a status other than 404
wrk_run() {
    local id="$1" method="$2"
    KEYS="$KEYS" VALUE_SIZE="$VALUE_SIZE" TOKEN="$TOKEN" WRK_METHOD="$method" \
        wrk -t 2 -c "$CONNS" -d "$DURATION" -s "$REPO/bench/wrk/kv.lua" "$NODE0" >"$WORK/$id.txt" 2>&1 || true
    local rate
    rate="$(awk '/^Requests\/sec/ {print int($2)}' "$WORK/$id.txt")"
    echo "$id: ${rate:-?} ops/s; $(grep -E '^requests ' "$WORK/$id.txt")"
    grep -E '^status ' "$WORK/$id.txt" | sed 's/^/    /' | cut -c1-300
    MISSING_READS="$(awk '/^status 404:/ {print $3}' "$WORK/$id.txt")"
    ! grep -qE 'socket errors connect [1-9]|read [1-9]|write [1-9]|timeout [1-9]' "$WORK/$id.txt" &&
        ! grep -E '^status ' "$WORK/$id.txt" | grep -qv '^status 404:'
}

# present: how many of the KEYS keys exist now (a listing through node 0)
present() {
    local after="" n=0 page
    while :; do
        page="$(curl -s --max-time 10 -H "Authorization: Bearer $TOKEN" \
            "$NODE0/v1/kv?prefix=bench-&limit=1000${after:+&after=$after}")"
        n=$((n + $(jq '.keys | length' <<<"$page")))
        after="$(jq -r '.next // empty' <<<"$page")"
        [[ -n "$after" ]] || break
    done
    echo "$n"
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
    if [[ "$PREFILL" == 1 ]]; then
        "$KVCTL" bench --driver kvstore --endpoints "$NODE0" --token "$TOKEN" --keys "$KEYS" \
            --value-size "$VALUE_SIZE" --connections 16 --ops 1 --warmup 0s --prefill \
            --read-ratio 1 --quiet -o json >/dev/null
    fi
    if [[ "$LOADGEN" == wrk ]]; then
        wrk_run "round $round write" PUT || failed=1
        have="$(present)"
        echo "round $round: $have of $KEYS keys exist before the reads"
        MISSING_READS=0
        wrk_run "round $round read " GET || failed=1
        reads="$(awk '/^requests / {print $2+0}' "$WORK/round $round read .txt")"
        echo "round $round: ${MISSING_READS:-0} reads answered 404; $(( KEYS - have )) of $KEYS keys never written predict $(awk -v r="$reads" -v m="$((KEYS - have))" -v k="$KEYS" 'BEGIN {printf "%d", r * m / k}')"
    else
        one_run "round $round write" --read-ratio 0 --consistency quorum || failed=1
        one_run "round $round read " --read-ratio 1 --consistency quorum || failed=1
    fi
    stop_up
done
if [[ "$failed" == 1 ]]; then
    log "some runs had errors (above)"
    exit 1
fi
log "$ROUNDS rounds, no errors"
