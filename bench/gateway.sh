#!/usr/bin/env bash
# What `kvctl up`'s gateway costs (issue 16: >= 0.9x direct, <= 0.1 ms added
# p50): one cluster (3 nodes, Full, Quorum), the same load in rounds that
# interleave the three targets, so a machine's drift hits each alike:
#   gateway   the gateway's address (shared by the Up nodes, no hop)
#   node0     node 0's own port (the issue's comparison: one coordinator)
#   nodes     round-robin over the three nodes' own ports (the same spread
#             as the gateway's, without it)
# Writes and quorum reads, over KEYS keys written once first; with wrk
# installed also the original store's routes (create-only POST /write of new
# keys, GET /read/<key>) through the gateway and to node 0. Prints every
# run and the medians, and the gateway's ratios to each direct target.
#
#   bash bench/gateway.sh [ROUNDS]        (default 3)
#   DURATION=8s CONNS=32 KEYS=20000 VALUE_SIZE=100 GATEWAY_MODE=shared|proxy
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${1:-3}" DURATION="${DURATION:-8s}" CONNS="${CONNS:-32}" KEYS="${KEYS:-20000}"
VALUE_SIZE="${VALUE_SIZE:-100}" MODE="${GATEWAY_MODE:-shared}"
KVCTL="${CARGO_TARGET_DIR:-target}/release/kvctl"
cargo build --release -q -p kvctl
for tool in curl jq; do command -v "$tool" >/dev/null || { echo "$tool is needed" >&2; exit 2; }; done
WORK=$(mktemp -d)
UP_PID=""
stop() {
    if [[ -n "$UP_PID" ]]; then
        kill -INT "$UP_PID" 2>/dev/null || true
        wait "$UP_PID" 2>/dev/null || true
    fi
}
trap 'stop; rm -rf "$WORK"' EXIT

"$KVCTL" up --nodes 3 --strategy full --data-dir "$WORK/data" --listen 127.0.0.1:0 \
    --gateway "$MODE" --anti-entropy-secs 0 >"$WORK/up.log" 2>&1 &
UP_PID=$!
GW="" TOKEN="" NODE0="" NODES=""
for _ in $(seq 300); do
    GW=$(awk '/^gateway: / {print $2; exit}' "$WORK/up.log")
    TOKEN=$(awk '/^token: / {print $2; exit}' "$WORK/up.log")
    if [[ -n "$GW" ]] && view=$(curl -fsS --max-time 2 -H "Authorization: Bearer $TOKEN" "$GW/v1/cluster" 2>/dev/null) &&
        [[ $(jq '[.nodes[] | select(.state == "Up" and .running)] | length' <<<"$view") == 3 ]]; then
        NODE0="http://$(jq -r '.nodes[0].address' <<<"$view")"
        NODES=$(jq -r '[.nodes[] | "http://" + .address] | join(",")' <<<"$view")
        break
    fi
    sleep 0.2
done
[[ -n "$NODES" ]] || { echo "cluster not Up within 60 s:" >&2; tail -20 "$WORK/up.log" >&2; exit 1; }
sleep 1 # the nodes take the gateway's port within a report round

bench() { # ENDPOINTS READ_RATIO: "ops/s p50_us"; refuses errors and misses
    local out
    out=$("$KVCTL" bench --endpoints "$1" --token "$TOKEN" --read-ratio "$2" --connections "$CONNS" \
        --keys "$KEYS" --value-size "$VALUE_SIZE" --duration "$DURATION" --warmup 2s \
        --consistency quorum --quiet -o json)
    if [[ $(jq '.errors + .misses' <<<"$out") != 0 ]]; then
        echo "run with errors or misses: $(jq -c '{errors, misses, errorsByKind, errorExamples}' <<<"$out")" >&2
        exit 1
    fi
    jq -r '"\(.opsPerSecond | floor) \(.latencyUs.p50)"' <<<"$out"
}
"$KVCTL" bench --endpoints "$NODE0" --token "$TOKEN" --keys "$KEYS" --value-size "$VALUE_SIZE" \
    --connections 64 --ops 1 --warmup 0s --prefill --read-ratio 1 --quiet -o json >/dev/null

# wrk_bench URL METHOD: the original store's routes (bench/wrk/kv.lua,
# WRK_API=classic): "ops/s p50_us"; refuses answers that are not 2xx
wrk_bench() {
    local out
    out=$(KEYS="$KEYS" VALUE_SIZE="$VALUE_SIZE" TOKEN="$TOKEN" WRK_METHOD="$2" WRK_API=classic \
        wrk -t 2 -c "$CONNS" -d "$DURATION" --latency -s bench/wrk/kv.lua "$1" 2>&1)
    if grep -qE '^status |socket errors connect [1-9]|read [1-9]|write [1-9]|timeout [1-9]' <<<"$out"; then
        echo "classic run with errors: $(grep -E '^(status|requests) ' <<<"$out")" >&2
        exit 1
    fi
    awk '/^Requests\/sec/ {ops = int($2)}
        $1 == "50%" {v = $2; u = 1; if (v ~ /us$/) u = 1; else if (v ~ /ms$/) u = 1000; else if (v ~ /s$/) u = 1000000;
            sub(/[a-z]+$/, "", v); p50 = int(v * u)}
        END {print ops, p50}' <<<"$out"
}
TARGETS="gateway node0 nodes"
if command -v wrk >/dev/null; then
    TARGETS+=" classic-gateway classic-node0"
else
    echo "wrk not found: the original store's routes are not measured (apt-get install wrk)" >&2
fi

declare -A OPS P50
median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
for round in $(seq "$ROUNDS"); do
    for op in write read; do
        ratio=0; [[ $op == read ]] && ratio=1
        for target in $TARGETS; do
            case $target in
            gateway) read -r ops p50 < <(bench "$GW" "$ratio") ;;
            node0) read -r ops p50 < <(bench "$NODE0" "$ratio") ;;
            nodes) read -r ops p50 < <(bench "$NODES" "$ratio") ;;
            classic-gateway) read -r ops p50 < <(wrk_bench "$GW" "$([[ $op == write ]] && echo PUT || echo GET)") ;;
            classic-node0) read -r ops p50 < <(wrk_bench "$NODE0" "$([[ $op == write ]] && echo PUT || echo GET)") ;;
            esac
            printf 'round %s %-5s %-7s %6s ops/s  p50 %s us  (load %s)\n' "$round" "$op" "$target" "$ops" "$p50" "$(cut -d' ' -f1 /proc/loadavg)"
            OPS[$op-$target]+="$ops " P50[$op-$target]+="$p50 "
        done
    done
done
echo
echo "medians of $ROUNDS rounds ($MODE gateway, $CONNS connections, $DURATION each):"
for op in write read; do
    g=$(median <<<"${OPS[$op-gateway]}") n0=$(median <<<"${OPS[$op-node0]}") rr=$(median <<<"${OPS[$op-nodes]}")
    gp=$(median <<<"${P50[$op-gateway]}") n0p=$(median <<<"${P50[$op-node0]}") rrp=$(median <<<"${P50[$op-nodes]}")
    awk -v op="$op" -v g="$g" -v n0="$n0" -v rr="$rr" -v gp="$gp" -v n0p="$n0p" -v rrp="$rrp" 'BEGIN {
        printf "%-5s gateway %d/s p50 %.2f ms | node 0 %d/s p50 %.2f ms | 3 nodes %d/s p50 %.2f ms | gateway/node0 %.2fx (p50 %+.2f ms), gateway/3 nodes %.2fx (p50 %+.2f ms)\n",
            op, g, gp / 1000, n0, n0p / 1000, rr, rrp / 1000, g / n0, (gp - n0p) / 1000, g / rr, (gp - rrp) / 1000 }'
    if [[ -n "${OPS[$op-classic-gateway]:-}" ]]; then
        g=$(median <<<"${OPS[$op-classic-gateway]}") n0=$(median <<<"${OPS[$op-classic-node0]}")
        gp=$(median <<<"${P50[$op-classic-gateway]}") n0p=$(median <<<"${P50[$op-classic-node0]}")
        awk -v op="$op" -v g="$g" -v n0="$n0" -v gp="$gp" -v n0p="$n0p" 'BEGIN {
            printf "%-5s classic routes (wrk): gateway %d/s p50 %.2f ms | node 0 %d/s p50 %.2f ms | gateway/node0 %.2fx, p50 added %+.2f ms\n",
                op, g, gp / 1000, n0, n0p / 1000, g / n0, (gp - n0p) / 1000 }'
    fi
done
