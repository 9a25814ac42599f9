#!/usr/bin/env bash
# Runs the cargo-fuzz targets in fuzz/ for a bounded time each, starting from
# the checked-in seed corpus, and fails on the first crash with the path of
# its reproducer. Installs cargo-fuzz (pinned) into the tools cache first.
#
#   scripts/fuzz.sh                      every target, FUZZ_SECONDS (default 20) each
#   scripts/fuzz.sh topology wire_batch  only these targets
#   FUZZ_SECONDS=1800 scripts/fuzz.sh    a longer run (what to do before a release)
#   FUZZ_SANITIZER=address scripts/fuzz.sh   with AddressSanitizer (needs nightly)
#   FUZZ_BUILD=dev scripts/fuzz.sh       unoptimised build: half the build time,
#                                        fewer runs per second (what test.sh uses)
#   KV_TOOLS_DIR=DIR ...                 cache cargo-fuzz in DIR (default .tools/)
#
# Targets (checks in fuzz/checks/<target>.rs, replayed by `cargo test`):
#   http_request    requests through a real in-process node, both ports
#   topology        topology file / push parser and the node's install path
#   wire_batch      every decoder of the peer port's binary batches
#   kvcluster_spec  KvCluster YAML/JSON and KvClusterSpec::validate
#
# New inputs the fuzzer finds go to fuzz/target/corpus-work/<target> (not
# committed); crashes to fuzz/artifacts/<target>/. After fixing a crash, keep
# its reproducer (minimize it: cargo fuzz tmin) in fuzz/corpus/<target>/ so
# that `cargo test` replays it from then on.
#
# Without a sanitizer the targets build with the stable toolchain (cargo-fuzz
# adds only -C flags then); a sanitizer needs nightly, and a missing nightly
# is then an error, never a skip.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${FUZZ_SECONDS:-20}"
sanitizer="${FUZZ_SANITIZER:-none}"
targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then
  targets=(http_request topology wire_batch kvcluster_spec)
fi

tools="${KV_TOOLS_DIR:-$PWD/.tools}"
mkdir -p "$tools"
tools="$(cd "$tools" && pwd)"
pin=0.13.2
cargo_fuzz="$tools/cargo-fuzz/bin/cargo-fuzz"
if [ ! -x "$cargo_fuzz" ] || [ "$("$cargo_fuzz" --version 2>/dev/null)" != "cargo-fuzz $pin" ]; then
  echo "installing cargo-fuzz $pin into $tools/cargo-fuzz"
  start=$SECONDS
  cargo install cargo-fuzz --version "$pin" --locked --root "$tools/cargo-fuzz"
  echo "[fuzz] cargo-fuzz installed in $((SECONDS - start)) s"
fi

toolchain=()
if [ "$sanitizer" != none ]; then
  if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    echo "ERROR: FUZZ_SANITIZER=$sanitizer needs the nightly toolchain, which is not installed." >&2
    echo "ERROR: run with FUZZ_SANITIZER=none (the default) or install nightly." >&2
    exit 1
  fi
  toolchain=(+nightly)
fi

# One target directory for every fuzz build, whatever CARGO_TARGET_DIR says.
target_dir="$PWD/fuzz/target"
flags=(--fuzz-dir fuzz --target-dir "$target_dir" --sanitizer "$sanitizer")
build="${FUZZ_BUILD:-release}"
case "$build" in
  release) ;;
  dev) flags+=(--dev) ;;
  *) echo "ERROR: FUZZ_BUILD=$build (expected release or dev)" >&2; exit 2 ;;
esac

echo "[fuzz] building ${targets[*]} ($build, sanitizer $sanitizer)"
start=$SECONDS
for t in "${targets[@]}"; do
  "$cargo_fuzz" "${toolchain[@]}" build "${flags[@]}" "$t"
done
echo "[fuzz] built in $((SECONDS - start)) s; fuzz/target is $(du -sh "$target_dir" | cut -f1)"

failed=()
for t in "${targets[@]}"; do
  seeds="fuzz/corpus/$t"
  work="$target_dir/corpus-work/$t"
  mkdir -p "$work" "fuzz/artifacts/$t"
  if [ -z "$(ls -A "$seeds" 2>/dev/null)" ]; then
    echo "ERROR: $seeds holds no seed" >&2
    exit 1
  fi
  log="$target_dir/fuzz-$t.log"
  echo "[fuzz] $t: ${seconds} s from $(ls "$seeds" | wc -l) seeds"
  start=$SECONDS
  # New inputs go to the first corpus directory only: the seeds stay as committed.
  if "$cargo_fuzz" "${toolchain[@]}" run "${flags[@]}" "$t" "$work" "$seeds" -- \
      -max_total_time="$seconds" -timeout=20 -rss_limit_mb=4096 -max_len=4096 \
      -print_final_stats=1 >"$log" 2>&1; then
    execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)"
    echo "[fuzz] $t: ok, ${execs:-?} runs in $((SECONDS - start)) s, coverage $(grep -o 'cov: [0-9]*' "$log" | tail -1)"
  else
    tail -n 60 "$log" >&2
    crash="$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -1)"
    echo "ERROR: $t failed after $((SECONDS - start)) s (full log: $log)" >&2
    if [ -n "$crash" ]; then
      echo "ERROR: reproducer: $crash" >&2
      echo "ERROR: replay it: $cargo_fuzz run ${flags[*]} $t $crash" >&2
    fi
    failed+=("$t")
  fi
done

if [ "${#failed[@]}" -gt 0 ]; then
  echo "ERROR: fuzz targets with crashes: ${failed[*]}" >&2
  exit 1
fi
echo "[fuzz] every target ran ${seconds} s without a crash: ${targets[*]}"
