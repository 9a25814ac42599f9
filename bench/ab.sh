#!/usr/bin/env bash
# A/B of two kv-node binaries in the same run: the same 3-node cluster
# (consistent hashing, factor 3, Quorum) started by `kvctl up --node-binary`
# with each binary in turn, rounds interleaved (A B A B ...) so that a
# machine's drift hits both alike; `kvctl bench` drives the nodes directly
# (round-robin, no gateway). Prints each run and the median ratio B/A.
#
#   bash bench/ab.sh OLD_KV_NODE NEW_KV_NODE      # e.g. a build of an older commit vs target/release/kv-node
#   AB_ROUNDS=3 AB_DURATION=10s AB_CONNECTIONS=32 AB_KEYS=20000  # the defaults
#   AB_NODES=1                                    # a single node (factor 1) instead of 3
#   AB_READS=0                                    # writes only (for a node that stores nothing)
set -euo pipefail
cd "$(dirname "$0")/.."

[[ $# -eq 2 ]] || { echo "usage: $0 OLD_KV_NODE NEW_KV_NODE" >&2; exit 2; }
A=$(realpath "$1") B=$(realpath "$2")
[[ -x "$A" && -x "$B" ]] || { echo "both binaries must be executable" >&2; exit 2; }
ROUNDS="${AB_ROUNDS:-3}" DURATION="${AB_DURATION:-10s}" CONNS="${AB_CONNECTIONS:-32}"
KEYS="${AB_KEYS:-20000}" NODES="${AB_NODES:-3}" READS="${AB_READS:-1}"
FACTOR=$((NODES < 3 ? NODES : 3))
KVCTL="${CARGO_TARGET_DIR:-target}/release/kvctl"
[[ -x "$KVCTL" ]] || cargo build --release -p kvctl >&2
WORK=$(mktemp -d)
UP_PID="" EPS=""
stop() {
    if [[ -n "$UP_PID" ]] && kill -0 "$UP_PID" 2>/dev/null; then
        kill -INT "$UP_PID" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$UP_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$UP_PID" 2>/dev/null || true
    fi
    UP_PID=""
}
trap 'stop; rm -rf "$WORK"' EXIT

export KV_TOKEN=ab-token
GATEWAY=127.0.0.1:5090
export KV_ENDPOINT="http://$GATEWAY"

# Starts a fresh cluster on binary $1, waits (bounded) for $NODES Up nodes with
# caught-up stores and sets EPS to their client endpoints, comma-separated.
start() {
    rm -rf "$WORK/data"
    "$KVCTL" up --nodes "$NODES" --strategy consistent-hashing --replication-factor "$FACTOR" \
        --data-dir "$WORK/data" --listen "$GATEWAY" --node-binary "$1" \
        --anti-entropy-secs 0 >"$WORK/up.log" 2>&1 &
    UP_PID=$!
    for _ in $(seq 300); do
        if json=$("$KVCTL" nodes -o json 2>/dev/null) &&
            [[ $(jq '[.nodes[] | select(.state == "Up")] | length' <<<"$json" 2>/dev/null) == "$NODES" ]]; then
            local eps caught=0
            eps=$(jq -r '[.nodes[] | "http://" + .address] | join(",")' <<<"$json")
            # a new store serves no reads until it has caught up (SPEC §3); nodes
            # older than that report no such field
            for ep in ${eps//,/ }; do
                curl -fsS -H "Authorization: Bearer $KV_TOKEN" "$ep/v1/cluster" |
                    jq -e '(.storeCatchingUp // false) == false' >/dev/null 2>&1 && caught=$((caught + 1))
            done
            if [[ $caught == "$NODES" ]]; then
                EPS=$eps
                return
            fi
        fi
        sleep 0.2
    done
    echo "cluster on $1 not Up within 60 s; kvctl up said:" >&2
    tail -20 "$WORK/up.log" >&2
    exit 1
}

# ops/s and p99 latency (µs) of one measured run on $1 (endpoints) with read ratio $2; a run with
# errors or misses is refused (a read run writes its keys first: --prefill)
run() {
    local out prefill=()
    [[ $2 == 0.0 ]] || prefill=(--prefill)
    out=$("$KVCTL" bench --endpoints "$1" --read-ratio "$2" --connections "$CONNS" \
        --keys "$KEYS" --duration "$DURATION" --warmup 2s --consistency quorum --quiet \
        -o json "${prefill[@]}")
    if [[ $(jq '.errors + .misses' <<<"$out") != 0 ]]; then
        echo "run with errors or misses: $(jq -c '{errors, misses, errorsByKind}' <<<"$out")" >&2
        exit 1
    fi
    jq -r '"\(.opsPerSecond | floor) \(.latencyUs.p99)"' <<<"$out"
}

declare -A RES
for r in $(seq "$ROUNDS"); do
    for side in A B; do
        bin=$A
        [[ $side == B ]] && bin=$B
        start "$bin"
        wout=$(run "$EPS" 0.0)
        rout="- -"
        [[ $READS == 0 ]] || rout=$(run "$EPS" 1.0)
        read -r w wp <<<"$wout"
        read -r rd rp <<<"$rout"
        stop
        RES[$side-w]+="$w "
        RES[$side-r]+="$rd "
        RES[$side-wp]+="$wp "
        RES[$side-rp]+="$rp "
        printf 'round %d %s: writes %s/s (p99 %s µs), quorum reads %s/s (p99 %s µs)\n' "$r" "$side" "$w" "$wp" "$rd" "$rp"
    done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
kinds="w r"
[[ $READS == 0 ]] && kinds=w
for kind in $kinds; do
    ma=$(median <<<"${RES[A-$kind]}") mb=$(median <<<"${RES[B-$kind]}")
    pa=$(median <<<"${RES[A-${kind}p]}") pb=$(median <<<"${RES[B-${kind}p]}")
    name=writes
    [[ $kind == r ]] && name="quorum reads"
    printf '%s: A %s/s, B %s/s (medians of %d), B/A %.3f; p99 A %s µs, B %s µs\n' "$name" "$ma" "$mb" "$ROUNDS" \
        "$(awk -v a="$ma" -v b="$mb" 'BEGIN {print b / a}')" "$pa" "$pb"
done
