#!/usr/bin/env bash
# kvstore against etcd and Redis, same load generator (kvctl bench), same run.
# Usage: bash bench/compare.sh        (see bench/README.md for the env vars)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH_DIR="$REPO/bench"

# ---- parameters (env) -------------------------------------------------------
DURATION="${BENCH_DURATION:-10s}"          # measured time per run
WARMUP="${BENCH_WARMUP:-2s}"               # unmeasured warm-up per run
CONNS="${BENCH_CONNECTIONS:-32}"           # concurrent connections
VALUE_SIZE="${BENCH_VALUE_SIZE:-100}"      # bytes per value
KEYS="${BENCH_KEYS:-100000}"               # key space of scenarios 1, 2, 5
CATCHUP_KEYS="${BENCH_CATCHUP_KEYS:-100000}" # writes node 2 misses (scenario 3)
MEM_KEYS="${BENCH_MEM_KEYS:-1000000}"      # keys written before measuring RSS (scenario 4)
FILL_CONNS="${BENCH_FILL_CONNECTIONS:-128}" # connections of the bulk-load steps (not measured)
SCENARIOS="${BENCH_SCENARIOS:-1 5 3 4 2 6 7}"  # which scenarios, in this order
PORT_BASE="${BENCH_PORT_BASE:-17400}"      # kvstore ports; etcd +5000.., redis +6000
CATCHUP_TIMEOUT="${BENCH_CATCHUP_TIMEOUT:-300}" # seconds
RAW_DIR="${BENCH_RAW_DIR:-$BENCH_DIR/raw}"  # per-run JSON + manifests
RESULTS="${BENCH_RESULTS:-$BENCH_DIR/results.md}"
TARGET_DIR="${CARGO_TARGET_DIR:-$REPO/target}"
TOKEN="bench-token-$$"
CLUSTER_TOKEN="bench-cluster-token-$$"

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---- dependencies ---------------------------------------------------------------
SUDO=()
if [[ "$(id -u)" != 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then SUDO=(sudo); fi
fi
need_pkgs=()
command -v etcd >/dev/null 2>&1 || need_pkgs+=(etcd-server)
command -v redis-server >/dev/null 2>&1 || need_pkgs+=(redis-server)
if ((${#need_pkgs[@]})); then
    log "installing ${need_pkgs[*]} with apt-get"
    "${SUDO[@]}" apt-get update -q || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -q "${need_pkgs[@]}" \
        || die "apt-get install ${need_pkgs[*]} failed"
fi
for tool in etcd redis-server curl python3 cargo; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found in PATH"
done
# Debian's redis-server package starts a system instance on 6379; we use our own port.

# ---- build -------------------------------------------------------------------------
if [[ "${BENCH_SKIP_BUILD:-0}" == 1 ]]; then
    log "BENCH_SKIP_BUILD=1: using the binaries in $TARGET_DIR/release as they are"
else
    log "building release binaries (CARGO_TARGET_DIR=$TARGET_DIR)"
    (cd "$REPO" && CARGO_TARGET_DIR="$TARGET_DIR" cargo build --release -q -p kv-node -p kvctl --features kvctl/etcd) \
        || die "cargo build failed"
fi
KV_NODE="$TARGET_DIR/release/kv-node"
KVCTL="$TARGET_DIR/release/kvctl"
[[ -x "$KV_NODE" && -x "$KVCTL" ]] || die "binaries missing in $TARGET_DIR/release"

# ---- process bookkeeping -------------------------------------------------------------
WORK="$(mktemp -d "${TMPDIR:-/tmp}/kvbench.XXXXXX")"
declare -A PIDS=()   # name -> pid of every process we started and that may be alive

stop_pid() { # name: TERM, wait up to 5 s, then KILL
    local name="$1" pid="${PIDS[$1]:-}" i
    [[ -n "$pid" ]] || return 0
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "$name (pid $pid) ignored TERM; killing"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    wait "$pid" 2>/dev/null || true
    unset "PIDS[$name]"
}
kill9_pid() { # name: crash it (kill -9)
    local name="$1" pid="${PIDS[$1]:-}"
    [[ -n "$pid" ]] || return 0
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    unset "PIDS[$name]"
}
cleanup() {
    local rc=$? name
    trap - EXIT INT TERM
    for name in "${!PIDS[@]}"; do stop_pid "$name"; done
    if [[ "${BENCH_KEEP_WORK:-0}" == 1 ]]; then
        log "work directory kept: $WORK"
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port_free() { # port: up to 10 s
    local i
    for ((i = 0; i < 100; i++)); do
        port_free "$1" && return 0
        sleep 0.1
    done
    die "port $1 is still in use"
}
wait_http() { # url expected-code seconds what
    local url="$1" want="$2" secs="$3" what="$4" i code
    for ((i = 0; i < secs * 10; i++)); do
        # shellcheck disable=SC2046 # curl_tls: zero or two words
        code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 $(curl_tls) "$url" || true)"
        [[ "$code" == "$want" ]] && return 0
        sleep 0.1
    done
    die "$what: $url did not answer $want within ${secs}s (last: ${code:-none})"
}
now() { date +%s.%N; }

# ---- kvstore -------------------------------------------------------------------------
kv_port() { echo $((PORT_BASE + $1)); }
kv_peer_port() { echo $((PORT_BASE + 10 + $1)); }
KV_EPOCH=0
KV_TAG=""
KV_TLS=() # cert key ca: the nodes serve both ports over TLS (scenario 6)
kv_scheme() { if ((${#KV_TLS[@]})); then echo https; else echo http; fi; }
curl_tls() { if ((${#KV_TLS[@]})); then echo "--cacert ${KV_TLS[2]}"; fi; }
declare -a KV_STATE=(Up Up Up)
TOPO="$WORK/topology.json"

write_topology() { # bumps the epoch; atomically replaces the file
    KV_EPOCH=$((KV_EPOCH + 1))
    local i nodes="" sep=""
    for i in 0 1 2; do
        nodes+="$sep{\"ordinal\":$i,\"address\":\"127.0.0.1:$(kv_port "$i")\",\"peerAddress\":\"127.0.0.1:$(kv_peer_port "$i")\",\"state\":\"${KV_STATE[$i]}\"}"
        sep=","
    done
    printf '{"clusterId":"bench","epoch":%d,"readConsistency":"Quorum","writeConsistency":"Quorum","placement":{"strategy":"ConsistentHashing","factor":3,"members":[0,1,2]},"nodes":[%s]}\n' \
        "$KV_EPOCH" "$nodes" >"$TOPO.tmp"
    mv -f "$TOPO.tmp" "$TOPO"
}
cluster_field() { # ordinal jq-expr
    curl -s --max-time 2 -H "Authorization: Bearer $TOKEN" \
        "http://127.0.0.1:$(kv_port "$1")/v1/cluster" | jq -r "$2" 2>/dev/null || true
}
wait_epoch() { # ordinal epoch: node has the topology of at least that epoch (30 s)
    local i e
    for ((i = 0; i < 300; i++)); do
        e="$(cluster_field "$1" '.topology.epoch')"
        [[ "$e" =~ ^[0-9]+$ ]] && ((e >= $2)) && return 0
        sleep 0.1
    done
    die "kv node $1 did not take topology epoch $2 within 30 s"
}
start_kv_node() { # ordinal datadir [topology-file] ; name kv<ordinal>
    local i="$1" dir="$2" topo="${3:-}"
    local port peer
    port="$(kv_port "$i")"
    peer="$(kv_peer_port "$i")"
    wait_port_free "$port"
    wait_port_free "$peer"
    mkdir -p "$dir"
    local args=(--listen "127.0.0.1:$port" --peer-listen "127.0.0.1:$peer" --data-dir "$dir"
        --node-id "$i" --token "$TOKEN" --cluster-token "$CLUSTER_TOKEN")
    # three nodes share this machine's cores: each gets its share, as `kvctl up`
    # gives it (a single node, no topology file, takes them all)
    if [[ -n "$topo" ]]; then args+=(--topology-file "$topo" --worker-threads "$(( $(nproc) / 3 > 1 ? $(nproc) / 3 : 1 ))"); fi
    if ((${#KV_TLS[@]})); then args+=(--tls-cert "${KV_TLS[0]}" --tls-key "${KV_TLS[1]}" --tls-cluster-ca "${KV_TLS[2]}"); fi
    RUST_LOG="${BENCH_RUST_LOG:-warn}" "$KV_NODE" "${args[@]}" >>"$WORK/kv$i.log" 2>&1 &
    PIDS[kv$i]=$!
}
start_kv_cluster() { # tag: fresh data, 3 nodes, RF 3, Quorum/Quorum, all Up
    local tag="$1" i
    KV_TAG="$tag"
    KV_EPOCH=0
    KV_STATE=(Up Up Up)
    write_topology
    for i in 0 1 2; do start_kv_node "$i" "$WORK/$tag/kv$i" "$TOPO"; done
    for i in 0 1 2; do wait_http "$(kv_scheme)://127.0.0.1:$(kv_port "$i")/readyz" 200 60 "kv node $i"; done
    log "kvstore cluster $tag up (pids ${PIDS[kv0]} ${PIDS[kv1]} ${PIDS[kv2]})"
}
stop_kv_cluster() {
    local i
    for i in 0 1 2; do stop_pid "kv$i"; done
}
kv_endpoints() { # ordinals...
    local out="" i
    for i in "$@"; do out+="${out:+,}$(kv_scheme)://127.0.0.1:$(kv_port "$i")"; done
    echo "$out"
}

# ---- etcd ---------------------------------------------------------------------------
ETCD_BASE=$((PORT_BASE - 5000))
etcd_client_port() { echo $((ETCD_BASE + 10 * $1)); }
etcd_peer_port() { echo $((ETCD_BASE + 10 * $1 + 1)); }
start_etcd_member() { # index
    local i="$1" initial="" j
    for j in 0 1 2; do initial+="${initial:+,}e$j=http://127.0.0.1:$(etcd_peer_port "$j")"; done
    wait_port_free "$(etcd_client_port "$i")"
    wait_port_free "$(etcd_peer_port "$i")"
    mkdir -p "$WORK/etcd"
    etcd --name "e$i" --data-dir "$WORK/etcd/e$i" --logger zap --log-level warn \
        --listen-client-urls "http://127.0.0.1:$(etcd_client_port "$i")" \
        --advertise-client-urls "http://127.0.0.1:$(etcd_client_port "$i")" \
        --listen-peer-urls "http://127.0.0.1:$(etcd_peer_port "$i")" \
        --initial-advertise-peer-urls "http://127.0.0.1:$(etcd_peer_port "$i")" \
        --initial-cluster "$initial" --initial-cluster-token bench \
        --initial-cluster-state new >>"$WORK/etcd$i.log" 2>&1 &
    PIDS[etcd$i]=$!
}
start_etcd() {
    local i
    for i in 0 1 2; do start_etcd_member "$i"; done
    for i in 0 1 2; do wait_http "http://127.0.0.1:$(etcd_client_port "$i")/health" 200 60 "etcd member $i"; done
    log "etcd up (pids ${PIDS[etcd0]} ${PIDS[etcd1]} ${PIDS[etcd2]})"
}
stop_etcd() {
    local i
    for i in 0 1 2; do stop_pid "etcd$i"; done
}
etcd_endpoints() {
    local out="" i
    for i in "$@"; do out+="${out:+,}127.0.0.1:$(etcd_client_port "$i")"; done
    echo "$out"
}

# ---- redis --------------------------------------------------------------------------
REDIS_PORT=$((PORT_BASE - 6000 + 9))
start_redis() {
    wait_port_free "$REDIS_PORT"
    mkdir -p "$WORK/redis"
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$WORK/redis" \
        --appendonly yes --appendfsync always --save "" --daemonize no \
        --logfile "$WORK/redis.log" >>"$WORK/redis.out" 2>&1 &
    PIDS[redis]=$!
    local i
    for ((i = 0; i < 100; i++)); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$REDIS_PORT") 2>/dev/null; then break; fi
        sleep 0.1
    done
    ((i < 100)) || die "redis did not start (see $WORK/redis.log)"
    log "redis up (pid ${PIDS[redis]})"
}

# ---- runs and the manifest -------------------------------------------------------------
mkdir -p "$RAW_DIR"
MANIFEST=""
begin_scenario() { # n
    MANIFEST="$RAW_DIR/manifest-s$1.tsv"
    : >"$MANIFEST"
    rm -f "$RAW_DIR/s$1-"*.json
    log "=== scenario $1 ==="
}
fact() { printf 'fact\t%s\t%s\n' "$1" "$2" >>"$MANIFEST"; }
pair() { printf 'pair\t%s\t%s\t%s\n' "$1" "$2" "$3" >>"$MANIFEST"; } # title kv-id peer-id
# sut_ticks DRIVER: CPU clock ticks used so far by the driver's server processes
sut_ticks() {
    local prefix name total=0 t
    case "$1" in kvstore) prefix=kv ;; etcd) prefix=etcd ;; *) prefix=redis ;; esac
    for name in "${!PIDS[@]}"; do
        [[ "$name" == "$prefix"* ]] || continue
        t="$(awk '{print $14 + $15}' "/proc/${PIDS[$name]}/stat" 2>/dev/null || echo 0)"
        total=$((total + t))
    done
    echo "$total"
}
# bench ID LABEL DRIVER [kvctl bench args...]: one measured run, JSON kept in RAW_DIR
bench() {
    local id="$1" label="$2" driver="$3"
    shift 3
    local out="$RAW_DIR/$id.json" err="$WORK/$id.err"
    log "run $id: $label"
    # Other work on the machine (e.g. compilers) skews the figures: note it.
    printf 'busy\t%s\t%s\t%s\n' "$id" "$(pgrep -c -x rustc || true)" "$(cut -d' ' -f1 /proc/loadavg)" >>"$MANIFEST"
    local args=(bench --driver "$driver" --value-size "$VALUE_SIZE" --quiet -o json)
    if [[ " $* " != *" --connections "* ]]; then args+=(--connections "$CONNS"); fi
    if [[ " $* " != *" --warmup "* ]]; then args+=(--warmup "$WARMUP"); fi
    if [[ "$driver" == kvstore && " $* " != *" --token "* ]]; then args+=(--token "$TOKEN"); fi
    # CPU of the system under test (its server processes) and of the load
    # generator over the whole run (warm-up included): what each operation
    # costs, and whether the 2 cores were the limit.
    local cpu0 t0 rc=0 TIMEFORMAT='%U %S'
    cpu0="$(sut_ticks "$driver")"
    t0="$(now)"
    { time "$KVCTL" "${args[@]}" "$@" >"$out.tmp" 2>"$err"; } 2>"$WORK/$id.time" || rc=$?
    printf 'cpu\t%s\t%s\t%s\t%s\n' "$id" \
        "$(python3 -c "print(f'{($(sut_ticks "$driver") - $cpu0) / $(getconf CLK_TCK):.2f}')")" \
        "$(awk '{printf "%.2f", $1 + $2}' "$WORK/$id.time" 2>/dev/null || echo 0)" \
        "$(python3 -c "print(f'{$(now) - $t0:.2f}')")" >>"$MANIFEST"
    if [[ "$rc" == 0 ]]; then
        mv -f "$out.tmp" "$out"
        printf 'run\t%s\t%s\t%s\n' "$id" "$label" "$driver" >>"$MANIFEST"
        python3 "$BENCH_DIR/render.py" --one "$out" >&2 || true
    else
        log "run $id FAILED: $(tail -c 400 "$err" | tr '\n' ' ')"
        rm -f "$out.tmp"
        printf 'run\t%s\t%s\t%s\t%s\n' "$id" "$label" "$driver" \
            "$(tail -c 200 "$err" | tr '\n\t' '  ')" >>"$MANIFEST"
    fi
}
digest_records() { # ordinal: records the node holds (sum of its bucket digest counts)
    curl -s --max-time 10 -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$(kv_port "$1")/v1/digests" |
        jq '[.buckets[].count] | add // 0' 2>/dev/null || echo n/a
}
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
hwm_kib() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
metric() { # ordinal name: first sample value
    curl -s --max-time 2 "http://127.0.0.1:$(kv_port "$1")/metrics" |
        awk -v m="$2" '$1 == m || index($1, m "{") == 1 {print $2; exit}'
}

# ---- scenarios ------------------------------------------------------------------------
KV_RR="$(kv_endpoints 0 1 2)"
KV_ONE="$(kv_endpoints 0)"
ETCD_ALL="$(etcd_endpoints 0 1 2)"
common=(--keys "$KEYS" --duration "$DURATION")

scenario_1() {
    begin_scenario 1
    start_kv_cluster s1
    start_etcd
    # write-only
    bench s1-w-kv-rr "kvstore write, quorum, round-robin 3 nodes" kvstore "${common[@]}" --read-ratio 0 --endpoints "$KV_RR" --consistency quorum
    bench s1-w-kv-one "kvstore write, quorum, via 1 node" kvstore "${common[@]}" --read-ratio 0 --endpoints "$KV_ONE" --consistency quorum
    bench s1-w-etcd "etcd put, 3 endpoints" etcd "${common[@]}" --read-ratio 0 --endpoints "$ETCD_ALL"
    # read-only (each system's first read run prefills the whole key space)
    bench s1-fill-kv "kvstore: write the key space once" kvstore --keys "$KEYS" --connections "$FILL_CONNS" --ops 1 --warmup 0s --prefill --read-ratio 1 --endpoints "$KV_RR"
    bench s1-r-kv-q-rr "kvstore read, quorum, round-robin" kvstore "${common[@]}" --read-ratio 1 --endpoints "$KV_RR" --consistency quorum
    bench s1-r-kv-q-one "kvstore read, quorum, via 1 node" kvstore "${common[@]}" --read-ratio 1 --endpoints "$KV_ONE" --consistency quorum
    bench s1-r-kv-one-rr "kvstore read, one, round-robin" kvstore "${common[@]}" --read-ratio 1 --endpoints "$KV_RR" --consistency one
    bench s1-fill-etcd "etcd: write the key space once" etcd --keys "$KEYS" --connections "$FILL_CONNS" --ops 1 --warmup 0s --prefill --read-ratio 1 --endpoints "$ETCD_ALL"
    bench s1-r-etcd-lin "etcd get, linearizable" etcd "${common[@]}" --read-ratio 1 --endpoints "$ETCD_ALL"
    bench s1-r-etcd-ser "etcd get, serializable" etcd "${common[@]}" --read-ratio 1 --etcd-serializable --endpoints "$ETCD_ALL"
    # 50/50
    bench s1-m-kv-rr "kvstore 50/50, quorum, round-robin" kvstore "${common[@]}" --read-ratio 0.5 --endpoints "$KV_RR" --consistency quorum
    bench s1-m-kv-one "kvstore 50/50, quorum, via 1 node" kvstore "${common[@]}" --read-ratio 0.5 --endpoints "$KV_ONE" --consistency quorum
    bench s1-m-etcd "etcd 50/50, linearizable" etcd "${common[@]}" --read-ratio 0.5 --endpoints "$ETCD_ALL"
    pair "writes (round-robin)" s1-w-kv-rr s1-w-etcd
    pair "writes (one node)" s1-w-kv-one s1-w-etcd
    pair "reads quorum vs linearizable (round-robin)" s1-r-kv-q-rr s1-r-etcd-lin
    pair "reads quorum vs linearizable (one node)" s1-r-kv-q-one s1-r-etcd-lin
    pair "reads one vs serializable" s1-r-kv-one-rr s1-r-etcd-ser
    pair "50/50 (round-robin)" s1-m-kv-rr s1-m-etcd
    pair "50/50 (one node)" s1-m-kv-one s1-m-etcd
    # memory at the scenario's key space, for scenario 4's comparison
    local i
    for i in 0 1 2; do
        fact "rss100k.kv$i" "$(rss_kib "${PIDS[kv$i]}")"
        fact "rss100k.etcd$i" "$(rss_kib "${PIDS[etcd$i]}")"
    done
    fact "dbsize100k.kv0" "$(du -sk "$WORK/s1/kv0" | cut -f1)"
    fact "dbsize100k.etcd0" "$(du -sk "$WORK/etcd/e0" | cut -f1)"
    fact "keys100k.kv0" "$(metric 0 kv_keys)"
    if [[ " $SCENARIOS " != *" 5 "* ]]; then
        stop_kv_cluster
        stop_etcd
    fi
}

scenario_5() { # one node down: 50/50 throughput (reuses scenario 1's clusters when running)
    begin_scenario 5
    local fresh=0
    if [[ -z "${PIDS[kv0]:-}" ]]; then
        fresh=1
        start_kv_cluster s5
        start_etcd
        bench s5-prefill-kv "kvstore prefill" kvstore --keys "$KEYS" --connections "$FILL_CONNS" --ops 1 --warmup 0s --prefill --read-ratio 1 --endpoints "$KV_RR"
        bench s5-prefill-etcd "etcd prefill" etcd --keys "$KEYS" --connections "$FILL_CONNS" --ops 1 --warmup 0s --prefill --read-ratio 1 --endpoints "$ETCD_ALL"
    fi
    KV_STATE[2]=Failed
    write_topology
    wait_epoch 0 "$KV_EPOCH"
    wait_epoch 1 "$KV_EPOCH"
    kill9_pid kv2
    kill9_pid etcd2
    sleep 1
    bench s5-m-kv-down "kvstore 50/50, node 2 down (Failed), round-robin 0,1" kvstore "${common[@]}" --read-ratio 0.5 --endpoints "$(kv_endpoints 0 1)" --consistency quorum
    bench s5-m-etcd-down "etcd 50/50, member 2 killed, endpoints 0,1" etcd "${common[@]}" --read-ratio 0.5 --endpoints "$(etcd_endpoints 0 1)"
    pair "50/50 with one node down" s5-m-kv-down s5-m-etcd-down
    ((fresh)) || pair "reference: 50/50 all up (scenario 1)" s1-m-kv-rr s1-m-etcd
    stop_kv_cluster
    stop_etcd
}

scenario_3() { # catch-up of a node that missed CATCHUP_KEYS writes
    begin_scenario 3
    start_kv_cluster s3
    KV_STATE[2]=Failed
    write_topology
    wait_epoch 0 "$KV_EPOCH"
    wait_epoch 1 "$KV_EPOCH"
    kill9_pid kv2
    bench s3-missed "kvstore: $CATCHUP_KEYS distinct keys written while node 2 is down" kvstore \
        --keys "$CATCHUP_KEYS" --connections "$FILL_CONNS" --ops 1 --warmup 0s --prefill --read-ratio 0 --endpoints "$(kv_endpoints 0 1)" --consistency quorum
    fact hints.kv0 "$(metric 0 kv_hints_pending)"
    fact hints.kv1 "$(metric 1 kv_hints_pending)"
    local t0 t1 t2 i synced epoch
    t0="$(now)"
    start_kv_node 2 "$WORK/s3/kv2" "$TOPO"
    wait_http "http://127.0.0.1:$(kv_port 2)/healthz" 200 60 "restarted kv node 2"
    fact catchup.restart_seconds "$(python3 -c "print(f'{$(now) - $t0:.2f}')")"
    KV_STATE[2]=Recovering
    write_topology
    epoch="$KV_EPOCH"
    t1="$(now)"
    synced=""
    for ((i = 0; i < CATCHUP_TIMEOUT * 20; i++)); do
        synced="$(cluster_field 2 '.syncedEpoch')"
        [[ "$synced" =~ ^[0-9]+$ ]] && ((synced >= epoch)) && break
        sleep 0.05
    done
    t2="$(now)"
    [[ "$synced" =~ ^[0-9]+$ ]] && ((synced >= epoch)) ||
        die "node 2 did not report syncedEpoch >= $epoch within ${CATCHUP_TIMEOUT}s (last: ${synced:-none})"
    fact catchup.seconds "$(python3 -c "print(f'{$t2 - $t1:.2f}')")"
    fact catchup.from_start_seconds "$(python3 -c "print(f'{$t2 - $t0:.2f}')")"
    fact catchup.keys_moved "$(cluster_field 2 '.resync.keysMoved')"
    # exact record counts (sum of the per-bucket digest counts) when synced was seen
    fact catchup.records_node2 "$(digest_records 2)"
    fact catchup.records_node0 "$(digest_records 0)"
    KV_STATE[2]=Up
    write_topology
    wait_http "http://127.0.0.1:$(kv_port 2)/readyz" 200 60 "kv node 2 back Up"
    log "catch-up: $(python3 -c "print(f'{$t2 - $t1:.2f}')") s after publishing Recovering"
    if [[ " $SCENARIOS " != *" 4 "* ]]; then stop_kv_cluster; fi
}

scenario_4() { # RSS per node at MEM_KEYS keys (reuses scenario 3's cluster when running)
    begin_scenario 4
    if [[ -z "${PIDS[kv0]:-}" ]]; then start_kv_cluster s4; fi
    local i
    bench s4-fill "kvstore: write $MEM_KEYS keys (prefill, round-robin)" kvstore \
        --keys "$MEM_KEYS" --connections "$FILL_CONNS" --ops 1 --warmup 0s --prefill --read-ratio 1 --endpoints "$KV_RR" --consistency quorum
    sleep 2
    for i in 0 1 2; do
        fact "rss.kv$i" "$(rss_kib "${PIDS[kv$i]}")"
        fact "hwm.kv$i" "$(hwm_kib "${PIDS[kv$i]}")"
        fact "keys.kv$i" "$(metric "$i" kv_keys)"
        fact "dbbytes.kv$i" "$(metric "$i" kv_db_bytes)"
    done
    for i in 0 1 2; do fact "du.kv$i" "$(du -sk "$WORK/$KV_TAG/kv$i" | cut -f1)"; done
    # restart one node on its MEM_KEYS-key data: opening rebuilds the bucket
    # digests from the records before the node answers
    stop_pid kv2
    local t0
    t0="$(now)"
    start_kv_node 2 "$WORK/$KV_TAG/kv2" "$TOPO"
    wait_http "http://127.0.0.1:$(kv_port 2)/readyz" 200 120 "kv node 2 after restart"
    fact reopen.seconds "$(python3 -c "print(f'{$(now) - $t0:.2f}')")"
    stop_kv_cluster
}

scenario_2() { # one kvstore node (no topology file) vs one Redis (appendfsync always)
    begin_scenario 2
    start_kv_node 0 "$WORK/s2/kv0"
    wait_http "http://127.0.0.1:$(kv_port 0)/readyz" 200 60 "single kv node"
    log "single kv node up (pid ${PIDS[kv0]})"
    start_redis
    local redis_ep="redis://127.0.0.1:$REDIS_PORT"
    bench s2-w-kv "kvstore 1 node, write" kvstore "${common[@]}" --read-ratio 0 --endpoints "$KV_ONE"
    bench s2-w-redis "redis SET, appendfsync always" redis "${common[@]}" --read-ratio 0 --endpoints "$redis_ep"
    bench s2-fill-kv "kvstore: write the key space once" kvstore --keys "$KEYS" --connections "$FILL_CONNS" --ops 1 --warmup 0s --prefill --read-ratio 1 --endpoints "$KV_ONE"
    bench s2-r-kv "kvstore 1 node, read" kvstore "${common[@]}" --read-ratio 1 --endpoints "$KV_ONE"
    bench s2-fill-redis "redis: write the key space once" redis --keys "$KEYS" --connections "$FILL_CONNS" --ops 1 --warmup 0s --prefill --read-ratio 1 --endpoints "$redis_ep"
    bench s2-r-redis "redis GET" redis "${common[@]}" --read-ratio 1 --endpoints "$redis_ep"
    pair "writes" s2-w-kv s2-w-redis
    pair "reads" s2-r-kv s2-r-redis
    fact rss.kv "$(rss_kib "${PIDS[kv0]}")"
    fact rss.redis "$(rss_kib "${PIDS[redis]}")"
    stop_pid kv0
    stop_pid redis
}

# ---- machine and versions -----------------------------------------------------------------
machine_info() {
    local f="$RAW_DIR/machine.tsv" dev rota fsync_line
    {
        printf 'date\t%s\n' "$(date -u '+%Y-%m-%d %H:%M UTC')"
        printf 'cpu\t%s\n' "$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
        printf 'nproc\t%s\n' "$(nproc)"
        printf 'memory\t%s MiB\n' "$(awk '/^MemTotal:/ {print int($2/1024)}' /proc/meminfo)"
        printf 'kernel\t%s\n' "$(uname -r)"
        dev="$(df --output=source "$WORK" | tail -1)"
        rota="$(lsblk -ndo ROTA "$dev" 2>/dev/null | head -1 | tr -d ' ' || true)"
        printf 'disk\t%s (%s, %s; rotational flag %s)\n' "$dev" \
            "$(df --output=fstype "$WORK" | tail -1)" \
            "$(case "$dev" in /dev/vd*) echo virtio block device ;; /dev/nvme*) echo NVMe ;; *) echo block device ;; esac)" \
            "${rota:-unknown}"
        fsync_line="$(dd if=/dev/zero of="$WORK/ddsync" bs=4k count=300 oflag=dsync 2>&1 | tail -1)"
        rm -f "$WORK/ddsync"
        printf 'fsync\t%s\n' "dd 300 x 4 KiB oflag=dsync: $fsync_line"
        printf 'kvstore\t%s\n' "$(git -C "$REPO" rev-parse --short HEAD)$(git -C "$REPO" diff --quiet HEAD -- node core kvctl 2>/dev/null || echo ' (+ uncommitted changes in node/core/kvctl)')"
        printf 'binaries\t%s\n' "$KV_NODE built $(date -u -r "$KV_NODE" '+%Y-%m-%d %H:%M UTC')$([[ "${BENCH_SKIP_BUILD:-0}" == 1 ]] && echo ' (BENCH_SKIP_BUILD=1: not rebuilt by this run)')"
        printf 'etcd\t%s\n' "$(etcd --version | head -1)"
        printf 'redis\t%s\n' "$(redis-server --version)"
        printf 'params\tduration %s + warm-up %s per run, %s connections, %s-byte values, uniform keys over %s, catch-up %s keys, memory at %s keys (bulk loads, not measured: %s connections)\n' \
            "$DURATION" "$WARMUP" "$CONNS" "$VALUE_SIZE" "$KEYS" "$CATCHUP_KEYS" "$MEM_KEYS" "$FILL_CONNS"
    } >"$f"
}

scenario_6() { # TLS vs plaintext: the same 3-node cluster, once over http, once over https
    begin_scenario 6
    local tls_dir="$WORK/tls" san="subjectAltName=IP:127.0.0.1,DNS:localhost"
    mkdir -p "$tls_dir"
    # The shape `kvctl up --tls` and kv-operator's Generated mode give: a P-256
    # CA, one certificate for server and client use (the peer port is mutual TLS).
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$tls_dir/ca.key" \
        -out "$tls_dir/ca.crt" -subj /CN=bench-ca -days 2 \
        -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign 2>/dev/null \
        || die "openssl: the bench CA"
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$tls_dir/node.key" \
        -out "$tls_dir/node.csr" -subj /CN=bench-node 2>/dev/null || die "openssl: the node key"
    openssl x509 -req -in "$tls_dir/node.csr" -CA "$tls_dir/ca.crt" -CAkey "$tls_dir/ca.key" -CAcreateserial \
        -days 2 -out "$tls_dir/node.crt" \
        -extfile <(printf '%s\nextendedKeyUsage=serverAuth,clientAuth\nkeyUsage=critical,digitalSignature\n' "$san") \
        2>/dev/null || die "openssl: the node certificate"
    local plain_rr tls_rr
    plain_rr="$(kv_endpoints 0 1 2)"
    start_kv_cluster s6p
    bench s6-w-plain "plaintext: write, quorum, round-robin" kvstore "${common[@]}" --read-ratio 0 --endpoints "$plain_rr" --consistency quorum
    bench s6-fill-plain "plaintext: write the key space once" kvstore --keys "$KEYS" --connections "$FILL_CONNS" --ops 1 --warmup 0s --prefill --read-ratio 1 --endpoints "$plain_rr"
    bench s6-r-plain "plaintext: read, quorum, round-robin" kvstore "${common[@]}" --read-ratio 1 --endpoints "$plain_rr" --consistency quorum
    bench s6-m-plain "plaintext: 50/50, quorum, round-robin" kvstore "${common[@]}" --read-ratio 0.5 --endpoints "$plain_rr" --consistency quorum
    stop_kv_cluster
    KV_TLS=("$tls_dir/node.crt" "$tls_dir/node.key" "$tls_dir/ca.crt")
    tls_rr="$(kv_endpoints 0 1 2)"
    start_kv_cluster s6t
    bench s6-w-tls "TLS: write, quorum, round-robin" kvstore "${common[@]}" --read-ratio 0 --endpoints "$tls_rr" --consistency quorum --cacert "$tls_dir/ca.crt"
    bench s6-fill-tls "TLS: write the key space once" kvstore --keys "$KEYS" --connections "$FILL_CONNS" --ops 1 --warmup 0s --prefill --read-ratio 1 --endpoints "$tls_rr" --cacert "$tls_dir/ca.crt"
    bench s6-r-tls "TLS: read, quorum, round-robin" kvstore "${common[@]}" --read-ratio 1 --endpoints "$tls_rr" --consistency quorum --cacert "$tls_dir/ca.crt"
    bench s6-m-tls "TLS: 50/50, quorum, round-robin" kvstore "${common[@]}" --read-ratio 0.5 --endpoints "$tls_rr" --consistency quorum --cacert "$tls_dir/ca.crt"
    stop_kv_cluster
    KV_TLS=()
    pair "writes: TLS / plaintext" s6-w-tls s6-w-plain
    pair "reads: TLS / plaintext" s6-r-tls s6-r-plain
    pair "50/50: TLS / plaintext" s6-m-tls s6-m-plain
}

scenario_7() { # kvctl up's gateway vs node 0 direct, on the same cluster
    begin_scenario 7
    local gw_port=$((PORT_BASE + 40)) dir="$WORK/up" tok node0 gw
    wait_port_free "$gw_port"
    # kvctl up runs its nodes as `kvctl node` subprocesses of the same binary.
    RUST_LOG="${BENCH_RUST_LOG:-warn}" "$KVCTL" up --data-dir "$dir" --nodes 3 --strategy full \
        --listen "127.0.0.1:$gw_port" >>"$WORK/up.log" 2>&1 &
    PIDS[kvup]=$!
    gw="http://127.0.0.1:$gw_port"
    wait_http "$gw/readyz" 200 120 "kvctl up gateway"
    tok="$(head -n 1 "$dir/token")"
    local view all
    view="$(curl -s --max-time 5 -H "Authorization: Bearer $tok" "$gw/v1/cluster")"
    node0="$(jq -r '.topology.nodes[] | select(.ordinal == 0) | .address' <<<"$view")"
    [[ "$node0" == 127.0.0.1:* ]] || die "kvctl up: no address of node 0 in $gw/v1/cluster"
    # every node's own port, for the same load spread by the client instead
    all="$(jq -r '[.topology.nodes[] | "http://" + .address] | join(",")' <<<"$view")"
    fact "gateway" "$gw"
    fact "node0" "http://$node0"
    fact "nodes" "$all"
    local g=(--token "$tok")
    bench s7-w-gw "gateway: write, quorum" kvstore "${common[@]}" "${g[@]}" --read-ratio 0 --endpoints "$gw" --consistency quorum
    bench s7-w-direct "node 0 direct: write, quorum" kvstore "${common[@]}" "${g[@]}" --read-ratio 0 --endpoints "http://$node0" --consistency quorum
    bench s7-w-rr "3 nodes direct, round-robin: write, quorum" kvstore "${common[@]}" "${g[@]}" --read-ratio 0 --endpoints "$all" --consistency quorum
    bench s7-fill "write the key space once (through node 0)" kvstore "${g[@]}" --keys "$KEYS" --connections "$FILL_CONNS" --ops 1 --warmup 0s --prefill --read-ratio 1 --endpoints "http://$node0"
    bench s7-r-gw "gateway: read, quorum" kvstore "${common[@]}" "${g[@]}" --read-ratio 1 --endpoints "$gw" --consistency quorum
    bench s7-r-direct "node 0 direct: read, quorum" kvstore "${common[@]}" "${g[@]}" --read-ratio 1 --endpoints "http://$node0" --consistency quorum
    bench s7-r-rr "3 nodes direct, round-robin: read, quorum" kvstore "${common[@]}" "${g[@]}" --read-ratio 1 --endpoints "$all" --consistency quorum
    stop_pid kvup
    pair "writes: gateway / node 0 direct" s7-w-gw s7-w-direct
    pair "reads: gateway / node 0 direct" s7-r-gw s7-r-direct
    pair "writes: gateway / 3 nodes direct" s7-w-gw s7-w-rr
    pair "reads: gateway / 3 nodes direct" s7-r-gw s7-r-rr
}

T_START="$(now)"
machine_info
for s in $SCENARIOS; do
    case "$s" in
        1 | 2 | 3 | 4 | 5 | 6 | 7)
            t_s="$(now)"
            "scenario_$s"
            fact started "$(date -u -d "@${t_s%.*}" '+%Y-%m-%d %H:%M UTC')"
            fact seconds "$(python3 -c "print(round($(now) - $t_s))")"
            ;;
        *) die "unknown scenario $s (1..7)" ;;
    esac
done
python3 "$BENCH_DIR/render.py" --raw "$RAW_DIR" --out "$RESULTS" \
    --elapsed "$(python3 -c "print(round($(now) - $T_START))")"
cat "$RESULTS"
log "done: $RESULTS"
