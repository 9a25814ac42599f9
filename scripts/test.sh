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

step "rust toolchain components"
rustup component add rustfmt clippy >/dev/null 2>&1 || true

step "tools for the artefact checks (scripts/install-tools.sh)"
scripts/install-tools.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo test (workspace)"
cargo test --workspace --locked --no-fail-fast

step "deployment artefacts (scripts/test-deploy.sh)"
scripts/test-deploy.sh
