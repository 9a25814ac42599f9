#!/usr/bin/env bash
# Builds kvstore/kv-node:<tag> and kvstore/kv-operator:<tag> (tag: $KV_IMAGE_TAG,
# default dev) without any registry: each binary is built statically linked
# (glibc, crt-static) and copied into a build context that holds only that
# binary; the Dockerfiles in deploy/docker/ are FROM scratch, so nothing is pulled.
#   scripts/build-images.sh              both images
#   scripts/build-images.sh kv-node      one of them
# Cargo target directory: $KV_IMAGE_TARGET_DIR (default target-deploy/).
# Cargo profile: $KV_IMAGE_PROFILE (default release; scripts/test.sh asks for
# image-test, unoptimised, because the tests only need the images to run and
# a cold release build was the longest single step of CI).
set -euo pipefail
cd "$(dirname "$0")/.."
tag="${KV_IMAGE_TAG:-dev}"
# The machine's own architecture (x86_64 or aarch64, e.g. kind on an arm64
# host) unless KV_IMAGE_TARGET names another target (its linker is then yours).
target="${KV_IMAGE_TARGET:-$(uname -m)-unknown-linux-gnu}"
case "$target" in
  x86_64-unknown-linux-gnu | aarch64-unknown-linux-gnu) ;;
  *) echo "unsupported image target $target (x86_64 or aarch64 -unknown-linux-gnu)" >&2; exit 2 ;;
esac
target_dir="${KV_IMAGE_TARGET_DIR:-$PWD/target-deploy}"
profile="${KV_IMAGE_PROFILE:-release}"
case "$profile" in dev) profile_dir=debug ;; *) profile_dir=$profile ;; esac
images=("$@")
[ "${#images[@]}" -gt 0 ] || images=(kv-node kv-operator)

packages=()
for img in "${images[@]}"; do
  case "$img" in
    kv-node | kv-operator) packages+=(-p "$img") ;;
    *) echo "unknown image $img (kv-node, kv-operator)" >&2; exit 2 ;;
  esac
done

rustup target add "$target" >/dev/null 2>&1 || true
echo "==> cargo build --profile $profile --target $target (static) ${packages[*]}"
RUSTFLAGS='-C target-feature=+crt-static' CARGO_TARGET_DIR="$target_dir" CARGO_PROFILE_RELEASE_DEBUG=false \
  cargo build --profile "$profile" --locked --target "$target" "${packages[@]}"

version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)"
revision="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
created="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
ctx="$(mktemp -d)"
trap 'rm -rf "$ctx"' EXIT
for img in "${images[@]}"; do
  bin="$target_dir/$target/$profile_dir/$img"
  # static: no program interpreter, so it runs in an empty filesystem
  if readelf -l "$bin" | grep 'Requesting program interpreter' >/dev/null; then
    echo "$bin is dynamically linked; it cannot run FROM scratch" >&2
    exit 1
  fi
  rm -rf "${ctx:?}/$img" && mkdir -p "$ctx/$img"
  # no debug info in the image (none is built: CARGO_PROFILE_RELEASE_DEBUG=false above)
  strip --strip-debug -o "$ctx/$img/$img" "$bin"
  chmod 0555 "$ctx/$img/$img"
  # kv-node's image carries an empty /data for named volumes to inherit its owner
  if [ "$img" = kv-node ]; then mkdir -p "$ctx/$img/data"; fi
  echo "==> docker build kvstore/$img:$tag"
  docker build -q -f "deploy/docker/$img.Dockerfile" \
    --build-arg "VERSION=$version" --build-arg "REVISION=$revision" --build-arg "CREATED=$created" \
    -t "kvstore/$img:$tag" "$ctx/$img"
done
