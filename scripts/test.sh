#!/usr/bin/env bash
# Runs every test kvstore has, on a fresh machine: installs what the tests need
# first (idempotent, cached), then formatting, lints, the Rust test suites, and
# the deployment-artefact checks.
#
#   scripts/test.sh            everything
#   KV_TOOLS_DIR=DIR ...       cache the installed tools in DIR (default .tools/)
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

# Disk is the scarce thing on a CI machine (one run ran out of space building
# the images): no incremental caches, and the free space printed at each phase.
if [ "${CI:-}" = true ]; then export CARGO_INCREMENTAL=0; fi
disk() { printf '[disk] %s: %s free, target/ %s\n' "$1" \
  "$(df -Ph . | awk 'NR==2 {print $4}')" "$(du -sh "${CARGO_TARGET_DIR:-target}" 2>/dev/null | cut -f1 || echo 0)"; }
disk start

step "rust toolchain components"
rustup component add rustfmt clippy >/dev/null 2>&1 || true

step "tools for the artefact checks (scripts/install-tools.sh)"
scripts/install-tools.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets --locked --features kvctl/etcd -- -D warnings

step "cargo test (workspace)"
cargo test --workspace --locked --no-fail-fast --features kvctl/etcd
disk "after cargo test"
step "cargo fuzz: every target for ${FUZZ_SECONDS:-20} s from fuzz/corpus (scripts/fuzz.sh, dev build)"
FUZZ_BUILD="${FUZZ_BUILD:-dev}" scripts/fuzz.sh
# the fuzz build is not needed again; on a CI machine its disk is (images next)
if [ "${CI:-}" = true ]; then rm -rf fuzz/target; fi
disk "after fuzzing"

step "deployment artefacts (scripts/test-deploy.sh)"
scripts/test-deploy.sh
disk end
