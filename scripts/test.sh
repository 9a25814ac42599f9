#!/usr/bin/env bash
# Runs every test kvstore has, on a fresh machine: installs what the tests need
# first (idempotent, cached), then formatting, lints, the Rust test suites, and
# the deployment-artefact checks.
#
#   scripts/test.sh            everything
#   KV_TOOLS_DIR=DIR ...       cache the installed tools in DIR (default .tools/)
set -euo pipefail
cd "$(dirname "$0")/.."

# Each step says how long the run has taken so far: the CI budget is read from these.
step() { printf '\n==> [%d s] %s\n' "$SECONDS" "$*"; }

# Disk is the scarce thing on a CI machine (one run ran out of space building
# the images): no incremental caches, and the free space printed at each phase.
if [ "${CI:-}" = true ]; then export CARGO_INCREMENTAL=0; fi
# A sampler keeps the least free space seen (every 5 s) in $disk_low, so that
# a run that fails for want of space says how low it went and what held it.
disk_low=$(mktemp); df -Pk . | awk 'NR==2 {print $4}' > "$disk_low"
( while sleep 5; do
    free=$(df -Pk . | awk 'NR==2 {print $4}')
    [ "$free" -lt "$(cat "$disk_low")" ] && echo "$free" > "$disk_low"
  done ) &
disk_sampler=$!
disk() { printf '[disk] %s: %s free (least so far %s MiB), target/ %s\n' "$1" \
  "$(df -Ph . | awk 'NR==2 {print $4}')" "$(( $(cat "$disk_low") / 1024 ))" \
  "$(du -sh "${CARGO_TARGET_DIR:-target}" 2>/dev/null | cut -f1 || echo 0)"; }
on_exit() {
  local rc=$?
  kill "$disk_sampler" 2>/dev/null || true
  if [ "$rc" != 0 ]; then
    disk "exit $rc"
    du -sh "${CARGO_TARGET_DIR:-target}" fuzz/target target-deploy .tools/* 2>/dev/null || true
  fi
  rm -f "$disk_low"
}
trap on_exit EXIT
disk start

step "rust toolchain components"
rustup component add rustfmt clippy >/dev/null 2>&1 || true

step "tools for the artefact checks (scripts/install-tools.sh)"
scripts/install-tools.sh

# The control plane for scripts/test-kubernetes.sh is built from the Go
# module proxy (test/kube/build.sh: ~16 min cold, seconds when .tools/go is
# warm); started now, niced, so that it overlaps the Rust suites. Two jobs:
# at nice 19 it takes only the CPU the Rust suites leave idle, and with one
# job the second core idled while they linked or waited (CI: 2 929 s cold).
kube_build_log=${TMPDIR:-/tmp}/kvstore-kube-build.log
kube_build_t0=$SECONDS
if [ "${CI:-}" = true ]; then export KV_KUBE_PRUNE_CACHES=1; fi
KV_KUBE_JOBS=${KV_KUBE_JOBS:-2} nice -n 19 test/kube/build.sh > "$kube_build_log" 2>&1 &
kube_build_pid=$!

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets --locked --features kvctl/etcd -- -D warnings

# Fuzzing before the workspace tests: its own target directory (other
# RUSTFLAGS, nothing shared) is deleted under CI before the test build fills
# target/, so the two never take disk at once.
step "cargo fuzz: every target for ${FUZZ_SECONDS:-20} s from fuzz/corpus (scripts/fuzz.sh, dev build)"
FUZZ_BUILD="${FUZZ_BUILD:-dev}" scripts/fuzz.sh
disk "after fuzzing"
if [ "${CI:-}" = true ]; then rm -rf fuzz/target; fi

step "cargo test (workspace)"
cargo test --workspace --locked --no-fail-fast --features kvctl/etcd
disk "after cargo test"
if [ "${CI:-}" = true ]; then
  # The test executables (one per suite, each linking the whole dependency
  # tree) are not run again; the binaries the later steps start are hard links
  # in target/debug, so a file in deps/ with one link is a test executable.
  find "${CARGO_TARGET_DIR:-target}/debug/deps" -maxdepth 1 -type f -links 1 -executable \
    ! -name '*.so' ! -name '*.rlib' ! -name '*.rmeta' ! -name '*.d' -delete
  disk "test executables deleted"
fi

step "deployment artefacts (scripts/test-deploy.sh)"
# Unoptimised images: a cold release build of both was CI's longest step.
KV_IMAGE_PROFILE="${KV_IMAGE_PROFILE:-image-test}" scripts/test-deploy.sh
disk end

# The end-to-end story on real Kubernetes components (docs/kubernetes-tests.md).
# Under CI always; elsewhere with KV_TEST_KUBERNETES=1 (it needs root for the
# network and mount namespaces, and the control plane's build).
step "control plane build (test/kube/build.sh, started at the beginning)"
if wait "$kube_build_pid"; then
  echo "test/kube/build.sh finished $((SECONDS - kube_build_t0)) s after it started"
else
  tail -n 30 "$kube_build_log"; echo "test/kube/build.sh failed (log: $kube_build_log)"; exit 1
fi
if [ "${CI:-}" = true ] || [ "${KV_TEST_KUBERNETES:-0}" = 1 ]; then
  step "end-to-end story on Kubernetes (scripts/test-kubernetes.sh)"
  # The binaries and the kubelet `cargo test --workspace` built above (debug).
  e2e_target=${CARGO_TARGET_DIR:-target}
  case $e2e_target in /*) ;; *) e2e_target=$PWD/$e2e_target ;; esac
  KV_E2E_BIN_DIR="$e2e_target/debug" KV_KUBELET_TARGET_DIR="$e2e_target" scripts/test-kubernetes.sh
  disk "after test-kubernetes"
else
  step "SKIP scripts/test-kubernetes.sh: runs under CI (CI=true) or with KV_TEST_KUBERNETES=1"
fi
