#!/usr/bin/env bash
# Stops the control plane scripts/kube-up.sh started, by the pids it recorded
# (scheduler and controller-manager first, etcd last), and removes its state
# dir. A pid is signalled only while it still runs the binary it was recorded
# for. KV_KUBE_DIR as for kube-up.sh (default ${TMPDIR:-/tmp}/kvstore-kube).
set -euo pipefail
dir=${KV_KUBE_DIR:-${TMPDIR:-/tmp}/kvstore-kube}
marker=.kvstore-kube-state
log() { printf 'kube-down: %s\n' "$*" >&2; }

if [ ! -d "$dir" ]; then log "$dir does not exist: nothing to stop"; exit 0; fi
if [ ! -f "$dir/$marker" ]; then
  log "ERROR: $dir has no $marker: not a kube-up.sh state dir, left alone"; exit 1
fi

# ours PID NAME: the pid still runs $NAME (not a reused pid)
ours() {
  local exe
  exe=$(readlink "/proc/$1/exe" 2>/dev/null) || return 1
  [ "$(basename "${exe% (deleted)}")" = "$2" ]
}

for name in kube-scheduler kube-controller-manager kube-apiserver etcd; do
  f=$dir/pids/$name.pid
  [ -f "$f" ] || continue
  pid=$(cat "$f")
  if ! ours "$pid" "$name"; then log "$name (pid $pid) not running"; continue; fi
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do ours "$pid" "$name" || break; sleep 0.1; done
  if ours "$pid" "$name"; then
    log "$name (pid $pid) still running after 10 s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do ours "$pid" "$name" || break; sleep 0.1; done
  fi
  log "$name (pid $pid) stopped"
done
rm -rf "$dir"
log "removed $dir"
