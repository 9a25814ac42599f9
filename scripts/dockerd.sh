#!/usr/bin/env bash
# Starts and stops a private Docker daemon for the container tests, on a machine
# where the docker CLI is installed but no daemon runs (CI's). dockerd,
# containerd and runc come from Debian's docker.io (scripts/install-tools.sh).
# Nothing is pulled: the images are FROM scratch (scripts/build-images.sh).
#
#   eval "$(scripts/dockerd.sh start)"   a daemon answers afterwards: the one
#                                        already running, or ours (prints
#                                        `export DOCKER_HOST=...`); exit 1 and
#                                        the reason on stderr if none can run
#   scripts/dockerd.sh stop              stops ours (by the pid it wrote), if any
#   scripts/dockerd.sh status            exit 0 when ours answers
#
# Ours: socket $dir/docker.sock, exec root $dir/exec, pid file $dir/dockerd.pid,
# log $dir/dockerd.log (dir: $KV_DOCKERD_DIR, default /run/kvstore-dockerd), data
# root $KV_DOCKERD_DATA (default /var/lib/kvstore-dockerd). Storage drivers tried
# in order: overlay2, vfs. Docker's iptables rules are needed: without them
# (--iptables=false) the containers reach each other and the host by address,
# but not by name (Docker's DNS at 127.0.0.11 in each container is an iptables
# redirect), and operator/tests/docker_cluster.rs names its nodes.
set -euo pipefail
dir="${KV_DOCKERD_DIR:-/run/kvstore-dockerd}"
data="${KV_DOCKERD_DATA:-/var/lib/kvstore-dockerd}"
sock="$dir/docker.sock"
pidfile="$dir/dockerd.pid"
log="$dir/dockerd.log"
wait_secs="${KV_DOCKERD_WAIT_SECS:-60}"

ours_answers() { [ -S "$sock" ] && DOCKER_HOST="unix://$sock" docker info >/dev/null 2>&1; }
ours_pid() {
  local pid
  pid="$(cat "$pidfile" 2>/dev/null)" || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

stop() {
  local pid
  pid="$(ours_pid)" || { echo "dockerd.sh: no daemon of ours runs" >&2; return 0; }
  # dangling images of earlier builds (the tags move on every build)
  DOCKER_HOST="unix://$sock" docker image prune -f >/dev/null 2>&1 || true
  echo "dockerd.sh: stopping dockerd (pid $pid)" >&2
  kill -TERM "$pid" 2>/dev/null || true
  # dockerd stops its containers and its containerd before it exits
  for _ in $(seq 1 150); do
    kill -0 "$pid" 2>/dev/null || { rm -f "$pidfile"; return 0; }
    sleep 0.2
  done
  echo "dockerd.sh: dockerd (pid $pid) still runs after 30 s: SIGKILL" >&2
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$pidfile"
}

start() {
  if docker info >/dev/null 2>&1; then
    echo "dockerd.sh: a Docker daemon answers already (${DOCKER_HOST:-default socket}); using it" >&2
    return 0
  fi
  if ours_answers; then
    echo "dockerd.sh: our dockerd answers already on $sock (pid $(ours_pid || echo '?'))" >&2
    echo "export DOCKER_HOST=unix://$sock"
    return 0
  fi
  command -v dockerd >/dev/null 2>&1 || {
    echo "dockerd.sh: dockerd not found (Debian's docker.io; scripts/install-tools.sh installs it)" >&2
    return 1
  }
  # a daemon of ours that no longer answers (an interrupted run) goes first
  if ours_pid >/dev/null; then stop; fi
  mkdir -p "$dir" "$data"
  rm -f "$pidfile" "$sock"
  : >"$log"
  local driver pid ok why tried=()
  for driver in overlay2 vfs; do
    printf '\n=== dockerd --storage-driver %s\n' "$driver" >>"$log"
    dockerd --data-root "$data" --exec-root "$dir/exec" --pidfile "$pidfile" \
      -H "unix://$sock" --storage-driver "$driver" >>"$log" 2>&1 </dev/null &
    pid=$!
    ok=0
    for _ in $(seq 1 $((wait_secs * 5))); do
      if ours_answers; then ok=1; break; fi
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.2
    done
    if [ "$ok" = 1 ]; then
      echo "dockerd.sh: dockerd $(dockerd --version | sed 's/^Docker version //') answers on $sock (pid $pid, storage driver $driver; log $log)" >&2
      echo "export DOCKER_HOST=unix://$sock"
      return 0
    fi
    if kill -0 "$pid" 2>/dev/null; then
      echo "dockerd.sh: --storage-driver $driver: no answer in ${wait_secs} s" >&2
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
    rm -f "$pidfile" "$sock"
    why="$(sed -n "/^=== dockerd --storage-driver $driver\$/,\$p" "$log" \
      | grep -E 'level=(fatal|error)|failed to start|[Ee]rror' | tail -n1 | cut -c1-400)"
    tried+=("$driver")
    echo "dockerd.sh: dockerd --storage-driver $driver failed: ${why:-no error logged}" >&2
  done
  {
    echo "dockerd.sh: no dockerd could start (${#tried[@]} tries, each above); the last lines of $log:"
    tail -n 15 "$log"
  } >&2
  return 1
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) ours_answers ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
