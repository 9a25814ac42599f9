#!/usr/bin/env bash
# Builds the control plane test/kube/../scripts/kube-up.sh runs, from the Go
# module proxy, at the versions pinned in versions.env:
#   etcd                      go.etcd.io/etcd/server/v3   (wrapper: test/kube/etcd)
#   kube-apiserver, kube-controller-manager, kube-scheduler, kubectl
#                             k8s.io/kubernetes/cmd/...   (wrapper: test/kube/k8s)
# into $KV_KUBE_BIN (default test/kube/bin). Idempotent: a binary whose stamp
# (versions, wrapper go.sum, flags, go version) matches is not rebuilt.
# Static (CGO_ENABLED=0), -trimpath, -s -w and the tags upstream uses
# (hack/lib/golang.sh); version ldflags as hack/lib/version.sh sets them.
# Gentle on CPU by default: one compile job (see KV_KUBE_JOBS in lib.sh).
# Packages are compiled without DWARF (-gcflags=all=-dwarf=false): the linker
# strips it from the binaries anyway (-w), and without it the build cache
# holds less on a machine where disk is scarce.
# KV_KUBE_PRUNE_CACHES=1 (what scripts/test.sh sets under CI) deletes the
# Go build and module caches once every binary is built: a CI clone is used
# once, and those caches were its largest directory.
#
# usage: test/kube/build.sh [--force] [NAME...]   (default: all five)
set -euo pipefail
. "$(dirname "$0")/lib.sh"

force=0
if [ "${1:-}" = --force ]; then force=1; shift; fi
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(etcd kubectl kube-scheduler kube-controller-manager kube-apiserver)

export CGO_ENABLED=0
mkdir -p "$KV_KUBE_BIN" "$GOMODCACHE" "$GOCACHE"
GO_VERSION=$(cd "$KUBE_TEST_DIR/k8s" && go env GOVERSION)

# k8s: what `make` does for a release build (hack/lib/golang.sh, version.sh).
K8S_MAJOR=${K8S_VERSION#v}; K8S_MAJOR=${K8S_MAJOR%%.*}
K8S_MINOR=${K8S_VERSION#v*.}; K8S_MINOR=${K8S_MINOR%%.*}
# The module zip is an archive of the release tag: no git commit id in it
# (the proxy's .info has none), hence gitCommit=unknown, gitTreeState=archive
# (upstream's word for a tree exported by git archive).
BUILD_DATE=$(date -u ${SOURCE_DATE_EPOCH:+--date=@$SOURCE_DATE_EPOCH} +%Y-%m-%dT%H:%M:%SZ)
k8s_ldflags() {
  local f="" pkg kv
  for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
    for kv in "gitVersion=$K8S_VERSION" "gitMajor=$K8S_MAJOR" "gitMinor=$K8S_MINOR" \
              "gitCommit=unknown" "gitTreeState=archive" "buildDate=$BUILD_DATE"; do
      f="$f -X $pkg.$kv"
    done
  done
  echo "all=$f -s -w"
}
K8S_TAGS=selinux,notest,grpcnotrace
GCFLAGS=all=-dwarf=false
# etcd: its ./build sets only GitSHA; there is none here either.
ETCD_LDFLAGS="-X go.etcd.io/etcd/api/v3/version.GitSHA=unknown-module-proxy-$ETCD_VERSION -s -w"

stamp_of() { # NAME -> the text that must match for NAME to be up to date
  local name=$1 dir
  case "$name" in etcd) dir=etcd ;; *) dir=k8s ;; esac
  printf '%s\n' "$name" "k8s=$K8S_VERSION" "etcd=$ETCD_VERSION" "$GO_VERSION" "cgo=0" \
    "tags=$K8S_TAGS" "gcflags=$GCFLAGS" "$(sha256sum < "$KUBE_TEST_DIR/$dir/go.sum")" \
    "$(sha256sum < "$KUBE_TEST_DIR/$dir/go.mod")"
}

build_one() {
  local name=$1 dir pkg out="$KV_KUBE_BIN/$1" stamp="$KV_KUBE_BIN/.$1.stamp" t0 args
  if [ $force = 0 ] && [ -x "$out" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$(stamp_of "$name")" ]; then
    echo "build.sh: $name is up to date ($out)"
    return
  fi
  case "$name" in
    etcd) dir=etcd; pkg=go.etcd.io/etcd/server/v3
          args=(-trimpath -gcflags "$GCFLAGS" -ldflags "$ETCD_LDFLAGS") ;;
    kube-apiserver|kube-controller-manager|kube-scheduler|kubectl)
          dir=k8s; pkg=k8s.io/kubernetes/cmd/$name
          args=(-trimpath -tags "$K8S_TAGS" -gcflags "$GCFLAGS" -ldflags "$(k8s_ldflags)") ;;
    *) echo "build.sh: unknown binary $name" >&2; exit 2 ;;
  esac
  echo "build.sh: building $name ($pkg, GOFLAGS=$GOFLAGS GOMAXPROCS=$GOMAXPROCS) ..."
  t0=$(date +%s)
  (cd "$KUBE_TEST_DIR/$dir" && go build "${args[@]}" -o "$out.tmp" "$pkg")
  mv "$out.tmp" "$out"
  stamp_of "$name" > "$stamp"
  echo "build.sh: $name built in $(( $(date +%s) - t0 )) s"
}

t_all=$(date +%s)
for n in "${names[@]}"; do build_one "$n"; done
echo "build.sh: done in $(( $(date +%s) - t_all )) s; binaries in $KV_KUBE_BIN"
if [ "${KV_KUBE_PRUNE_CACHES:-0}" = 1 ]; then
  echo "build.sh: caches before pruning: $(du -sh "$GOCACHE" "$GOMODCACHE" 2>/dev/null | cut -f1 | paste -sd' ')"
  # (the module cache is read-only on purpose; `go clean -modcache` knows how)
  (cd "$KUBE_TEST_DIR/k8s" && go clean -cache -modcache)
  echo "build.sh: Go build and module caches deleted (KV_KUBE_PRUNE_CACHES=1)"
fi
