# shellcheck shell=bash
# Sourced by test/kube/*.sh: the pinned versions and the Go environment the
# wrapper modules are resolved and built with.
#   KV_KUBE_CACHE   Go caches (default: <repo>/.tools/go); GOMODCACHE=$KV_KUBE_CACHE/mod,
#                   GOCACHE=$KV_KUBE_CACHE/build
#   KV_KUBE_BIN     where the binaries go (default: test/kube/bin)
#   KV_KUBE_JOBS    parallel compile jobs (default 1: -p=1, GOMAXPROCS=1, gentle
#                   on a shared 2-core machine; set 2 on an idle one)
#   KV_KUBE_GOTOOLCHAIN  GOTOOLCHAIN for these builds (default auto: the
#                   machine's go unless a go.mod here asks for a newer one, which
#                   then comes through the Go module proxy into GOMODCACHE)
KUBE_TEST_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$KUBE_TEST_DIR/../.." && pwd)
# shellcheck source=versions.env
. "$KUBE_TEST_DIR/versions.env"

# v1.37.2 -> v0.37.2: the version the staging modules (k8s.io/api, ...) are
# published at for a k8s.io/kubernetes release.
# shellcheck disable=SC2034 # used by gen-replaces.sh
K8S_STAGING_VERSION="v0.${K8S_VERSION#v1.}"

KV_KUBE_CACHE=${KV_KUBE_CACHE:-$REPO_ROOT/.tools/go}
KV_KUBE_BIN=${KV_KUBE_BIN:-$KUBE_TEST_DIR/bin}
KV_KUBE_JOBS=${KV_KUBE_JOBS:-1}

export GOMODCACHE="$KV_KUBE_CACHE/mod"
export GOCACHE="$KV_KUBE_CACHE/build"
export GOMAXPROCS="$KV_KUBE_JOBS"
export GOFLAGS="-p=$KV_KUBE_JOBS -buildvcs=false -mod=readonly"
export GOTOOLCHAIN="${KV_KUBE_GOTOOLCHAIN:-auto}"
export GOWORK=off
# The default proxy and checksum database unless the caller set others.
export GOPROXY="${GOPROXY:-https://proxy.golang.org,direct}"
