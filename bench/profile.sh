#!/usr/bin/env bash
# Profiles kvstore's write path: one node, then 3 nodes (RF 3, quorum), each
# under `kvctl bench` write-only load. For each: CPU seconds per process
# (/proc/PID/stat), commit and batch metrics (kv_commit_batch_size,
# kv_fsync_duration_seconds, kv_peer_batch_size of replica writes, deltas over
# the window), `perf record` of the coordinating node (if perf works) and
# `strace -c` of it (separate run, as strace slows the node). Output:
# bench/raw/profile/*.txt; findings are written by hand into bench/profile.md
# (appended to results.md by render.py).
# Usage: CARGO_TARGET_DIR=... bash bench/profile.sh   (binaries must be built)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${PROF_OUT:-$REPO/bench/raw/profile}"
TARGET_DIR="${CARGO_TARGET_DIR:-$REPO/target}"
KV_NODE="$TARGET_DIR/release/kv-node"
KVCTL="$TARGET_DIR/release/kvctl"
WINDOW="${PROF_WINDOW:-8}"       # seconds sampled inside a run
CONNS="${BENCH_CONNECTIONS:-32}"
PORT_BASE="${BENCH_PORT_BASE:-17400}"
TOKEN="prof-token-$$"
CTOKEN="prof-cluster-$$"
[[ -x "$KV_NODE" && -x "$KVCTL" ]] || { echo "ERROR: build kv-node and kvctl first ($TARGET_DIR/release)" >&2; exit 1; }

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

WORK="$(mktemp -d "${TMPDIR:-/tmp}/kvprof.XXXXXX")"
mkdir -p "$OUT"
declare -A PIDS=()
stop_pid() {
    local name="$1" pid="${PIDS[$1]:-}" i
    [[ -n "$pid" ]] || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    unset "PIDS[$name]"
}
cleanup() {
    local rc=$? n
    trap - EXIT INT TERM
    for n in "${!PIDS[@]}"; do stop_pid "$n"; done
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_ready() { # port
    local i
    for ((i = 0; i < 600; i++)); do
        [[ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "http://127.0.0.1:$1/readyz" || true)" == 200 ]] && return 0
        sleep 0.1
    done
    die "node on port $1 not ready within 60 s"
}
start_node() { # ordinal [topology]
    local i="$1" topo="${2:-}" args
    args=(--listen "127.0.0.1:$((PORT_BASE + i))" --peer-listen "127.0.0.1:$((PORT_BASE + 10 + i))"
        --data-dir "$WORK/kv$i" --node-id "$i" --token "$TOKEN" --cluster-token "$CTOKEN")
    if [[ -n "$topo" ]]; then args+=(--topology-file "$topo"); fi
    RUST_LOG=warn "$KV_NODE" "${args[@]}" >>"$WORK/kv$i.log" 2>&1 &
    PIDS[kv$i]=$!
}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
metrics() { # port file
    curl -s --max-time 2 "http://127.0.0.1:$1/metrics" >"$2" || true
}
# hist_delta before after name [label, e.g. op="apply"]: observations, mean,
# buckets
hist_delta() {
    python3 - "$1" "$2" "$3" "${4:-}" <<'EOF'
import sys, re
def load(p, name):
    d = {}
    for line in open(p):
        if line.startswith(name):
            k, v = line.rsplit(" ", 1)
            d[k] = float(v)
    return d
a, b, name, label = load(sys.argv[1], sys.argv[3]), load(sys.argv[2], sys.argv[3]), sys.argv[3], sys.argv[4]
sel = "{" + label + "}" if label else ""
cnt = b.get(name + "_count" + sel, 0) - a.get(name + "_count" + sel, 0)
s = b.get(name + "_sum" + sel, 0) - a.get(name + "_sum" + sel, 0)
print(f"{name}{sel}: {cnt:.0f} observations, mean {s / cnt if cnt else 0:.6g}, sum {s:.4g}")
prev = 0
for k in b:
    if "_bucket" in k and label in k:
        v = b[k] - a.get(k, 0)
        le = re.search(r'le="([^"]+)"', k).group(1)
        print(f"  le {le:>8}: {v - prev:8.0f}")
        prev = v
EOF
}

profile_case() { # tag node-pid-name endpoints...
    local tag="$1" target="$2" endpoints="$3" dur=$((WINDOW + 8))
    local f="$OUT/$tag.txt" n
    log "$tag: load for ${dur}s"
    "$KVCTL" bench --driver kvstore --token "$TOKEN" --endpoints "$endpoints" --connections "$CONNS" \
        --read-ratio 0 --keys 100000 --duration "${dur}s" --warmup 2s --quiet -o json >"$OUT/$tag-bench.json" 2>"$WORK/$tag.err" &
    PIDS[bench]=$!
    sleep 4
    declare -A c0=()
    for n in "${!PIDS[@]}"; do c0[$n]="$(cpu_ticks "${PIDS[$n]}")"; done
    for n in 0 1 2; do [[ -n "${PIDS[kv$n]:-}" ]] && metrics $((PORT_BASE + n)) "$WORK/$tag-m0-$n"; done
    local t0 t1
    t0="$(date +%s.%N)"
    if perf record -F 499 -g -o "$WORK/$tag.perf" -p "${PIDS[$target]}" -- sleep "$WINDOW" >"$WORK/$tag.perf.log" 2>&1; then
        :
    else
        log "perf record failed: $(tail -2 "$WORK/$tag.perf.log")"
    fi
    t1="$(date +%s.%N)"
    for n in 0 1 2; do [[ -n "${PIDS[kv$n]:-}" ]] && metrics $((PORT_BASE + n)) "$WORK/$tag-m1-$n"; done
    {
        echo "# $tag: write-only load, $CONNS connections, endpoints $endpoints; perf/CPU window ${WINDOW}s"
        echo "## CPU seconds per process over the window (2 cores = $(python3 -c "print(f'{2 * ($t1 - $t0):.1f}')") core-seconds available)"
        local hz
        hz="$(getconf CLK_TCK)"
        for n in "${!PIDS[@]}"; do
            echo "  $n: $(python3 -c "print(f'{($(cpu_ticks "${PIDS[$n]}") - ${c0[$n]}) / $hz:.2f}')") s"
        done
        echo "  machine load average: $(cat /proc/loadavg); other rustc processes: $(pgrep -c -x rustc || true)"
        for n in 0 1 2; do
            [[ -f "$WORK/$tag-m1-$n" ]] || continue
            echo "## node $n commit metrics over the window"
            hist_delta "$WORK/$tag-m0-$n" "$WORK/$tag-m1-$n" kv_commit_batch_size
            hist_delta "$WORK/$tag-m0-$n" "$WORK/$tag-m1-$n" kv_fsync_duration_seconds
            hist_delta "$WORK/$tag-m0-$n" "$WORK/$tag-m1-$n" kv_peer_batch_size 'op="apply"'
            grep -E '^kv_replication_total|^kv_requests_total\{route="kv_put"' "$WORK/$tag-m1-$n" || true
        done
    } >"$f"
    wait "${PIDS[bench]}" || log "bench of $tag failed: $(tail -c 300 "$WORK/$tag.err")"
    unset "PIDS[bench]"
    python3 -c "import json; r = json.load(open('$OUT/$tag-bench.json')); print(f\"## bench: {r['opsPerSecond']:.0f} writes/s, p50 {r['writeLatencyUs']['p50']/1000:.2f} ms, p99 {r['writeLatencyUs']['p99']/1000:.2f} ms\")" >>"$f" || true
    if [[ -s "$WORK/$tag.perf" ]]; then
        local rep="$WORK/$tag.rep"
        perf report -i "$WORK/$tag.perf" --no-children --sort comm --stdio -g none >"$rep.comm" 2>/dev/null || true
        perf report -i "$WORK/$tag.perf" --no-children --sort dso --stdio -g none >"$rep.dso" 2>/dev/null || true
        perf report -i "$WORK/$tag.perf" --no-children --sort symbol --stdio -g none >"$rep.self" 2>/dev/null || true
        perf report -i "$WORK/$tag.perf" --children --sort symbol --stdio -g none >"$rep.incl" 2>/dev/null || true
        {
            echo "## perf: where ${target}'s CPU goes, by thread"
            grep -v -e '^#' -e '^$' "$rep.comm" | head -15 || true
            echo "## perf: by shared object"
            grep -v -e '^#' -e '^$' "$rep.dso" | head -15 || true
            echo "## perf: top symbols (self)"
            grep -v -e '^#' -e '^$' "$rep.self" | head -45 || true
            echo "## perf: top symbols (inclusive, children)"
            grep -v -e '^#' -e '^$' "$rep.incl" | head -70 || true
        } >>"$f"
    fi
    # strace in its own run: it slows the traced process a lot
    if command -v strace >/dev/null 2>&1; then
        log "$tag: strace -c of $target"
        "$KVCTL" bench --driver kvstore --token "$TOKEN" --endpoints "$endpoints" --connections "$CONNS" \
            --read-ratio 0 --keys 100000 --duration 10s --warmup 1s --quiet -o json >"$OUT/$tag-strace-bench.json" 2>/dev/null &
        PIDS[bench]=$!
        sleep 3
        timeout -s INT 5 strace -c -f -p "${PIDS[$target]}" -o "$WORK/$tag.strace" >/dev/null 2>&1 || true
        wait "${PIDS[bench]}" || true
        unset "PIDS[bench]"
        { echo "## strace -c -f of $target for 5 s (under load; strace itself slows it)"; cat "$WORK/$tag.strace" 2>/dev/null; } >>"$f"
    fi
    log "$tag: written $f"
}

# one node
start_node 0
wait_ready "$PORT_BASE"
profile_case single kv0 "http://127.0.0.1:$PORT_BASE"
stop_pid kv0
rm -rf "$WORK/kv0"

# three nodes, RF 3, quorum
TOPO="$WORK/topology.json"
nodes=""
for i in 0 1 2; do
    nodes+="${nodes:+,}{\"ordinal\":$i,\"address\":\"127.0.0.1:$((PORT_BASE + i))\",\"peerAddress\":\"127.0.0.1:$((PORT_BASE + 10 + i))\",\"state\":\"Up\"}"
done
printf '{"clusterId":"prof","epoch":1,"readConsistency":"Quorum","writeConsistency":"Quorum","placement":{"strategy":"ConsistentHashing","factor":3,"members":[0,1,2]},"nodes":[%s]}\n' "$nodes" >"$TOPO"
for i in 0 1 2; do start_node "$i" "$TOPO"; done
for i in 0 1 2; do wait_ready $((PORT_BASE + i)); done
profile_case three-rr kv0 "http://127.0.0.1:$PORT_BASE,http://127.0.0.1:$((PORT_BASE + 1)),http://127.0.0.1:$((PORT_BASE + 2))"
log "done: $OUT"
