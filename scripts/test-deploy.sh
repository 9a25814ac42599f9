#!/usr/bin/env bash
# Checks kvstore's deployment artefacts (run by scripts/test.sh after the cargo
# tests; needs scripts/install-tools.sh first):
#   - the chart's CRD copies equal deploy/crd.yaml and deploy/crd-kvbackup.yaml;
#   - helm lint --strict and helm template with every charts/kvstore/ci/*.yaml;
#   - every built-in object rendered (and deploy/*.yaml) validates with
#     kubernetes-validate --strict for Kubernetes 1.33 and 1.37;
#   - KvCluster objects (rendered, deploy/examples/*.yaml) validate against the
#     schema of deploy/crd.yaml; deploy/examples/invalid/*.yaml are refused
#     (CEL-only cases: operator/tests/k8s_cel.rs);
#   - yamllint on the chart's static YAML, deploy/ and observability/;
#   - promtool check rules / test rules (a unit test for every alert), and every
#     dashboard query parses and uses only metrics named in docs/design.md;
#   - scripts/build-images.sh and image checks (entry point, user, no shell:
#     only the binary in the image, FROM scratch layers, OCI title; kv-node's
#     /healthz as non-root on a read-only root filesystem), then the 3-container
#     test operator/tests/docker_cluster.rs. Against the Docker daemon that
#     answers, or else one that scripts/dockerd.sh starts here (Debian's
#     docker.io, from scripts/install-tools.sh) and stops at the end; when none
#     can run: a loud SKIP, or a failure with KV_REQUIRE_DOCKER=1 (.ci/run).
#   - scripts/test-prometheus.sh: a real Prometheus scraping `kvctl up` answers
#     every dashboard query and alert expression (KvNodeFailed with a node down).
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
tools="${KV_TOOLS_DIR:-$root/.tools}"
export PATH="$tools/bin:$PATH"
chart=charts/kvstore
kube_versions=(1.33.0 1.37.0)
work="$(mktemp -d)"
# a Docker daemon started by this script (scripts/dockerd.sh) is stopped by pid
own_dockerd=0
stop_dockerd() { if [ "$own_dockerd" = 1 ]; then own_dockerd=0; unset DOCKER_HOST; scripts/dockerd.sh stop || true; fi; }
trap 'stop_dockerd; rm -rf "$work"' EXIT

failures=()
fail() { printf 'FAIL: %s\n' "$*" >&2; failures+=("$*"); }
step() { printf '\n--> %s\n' "$*"; }

for t in helm helm3 kubernetes-validate check-jsonschema yamllint kv-python promtool; do
  command -v "$t" >/dev/null || { echo "FAIL: $t not found; run scripts/install-tools.sh" >&2; exit 1; }
done

# --- CRD ---------------------------------------------------------------------
have_crd=0
if git ls-files --error-unmatch deploy/crd.yaml >/dev/null 2>&1; then
  have_crd=1
  step "chart CRDs are deploy/crd.yaml and deploy/crd-kvbackup.yaml"
  for f in crd.yaml crd-kvbackup.yaml; do
    cmp -s "deploy/$f" "$chart/files/$f" \
      || fail "$chart/files/$f differs from deploy/$f (cp deploy/$f $chart/files/$f)"
  done
else
  fail "deploy/crd.yaml is not in git: the chart and the KvCluster checks need it"
fi

# --- helm lint + template ------------------------------------------------------
# splits rendered YAML into built-in objects (dir builtin/) and KvClusters
# (dir kvcluster/); the Prometheus Operator and cert-manager kinds are checked
# by name and apiVersion only.
split_objects() { # <file> <outdir>
  kv-python - "$1" "$2" <<'EOF'
import os, sys, yaml
src, out = sys.argv[1], sys.argv[2]
crd_kinds = {"ServiceMonitor": "monitoring.coreos.com/v1", "PodMonitor": "monitoring.coreos.com/v1",
             "PrometheusRule": "monitoring.coreos.com/v1", "Issuer": "cert-manager.io/v1",
             "Certificate": "cert-manager.io/v1"}
for d in ("builtin", "kvcluster"):
    os.makedirs(os.path.join(out, d), exist_ok=True)
with open(src) as f:
    docs = [d for d in yaml.safe_load_all(f) if d]
for i, doc in enumerate(docs):
    kind = doc.get("kind")
    if kind in crd_kinds:
        if doc.get("apiVersion") != crd_kinds[kind]:
            sys.exit(f"{kind} with apiVersion {doc.get('apiVersion')}")
        continue
    sub = "kvcluster" if kind == "KvCluster" else "builtin"
    name = f"{i:03d}-{kind}-{doc['metadata']['name']}.yaml"
    with open(os.path.join(out, sub, name), "w") as f:
        yaml.safe_dump(doc, f)
print(f"{len(docs)} objects")
EOF
}

for values in "$chart"/ci/*.yaml; do
  name="$(basename "$values" .yaml)"
  step "helm lint --strict -f $values"
  helm lint --strict "$chart" -f "$values" >"$work/lint.log" 2>&1 \
    || { cat "$work/lint.log"; fail "helm lint --strict $chart -f $values"; }
  for kv in "${kube_versions[@]}"; do
    out="$work/render/$name-$kv"
    mkdir -p "$out"
    step "helm template -f $values (Kubernetes $kv)"
    if ! helm template kvstore "$chart" -n kvstore-system --kube-version "$kv" \
         -f "$values" >"$out/all.yaml"; then
      fail "helm template $chart -f $values --kube-version $kv"; continue
    fi
    split_objects "$out/all.yaml" "$out" || { fail "parsing the output of helm template -f $values"; continue; }
    for f in "$out"/builtin/*.yaml; do
      kubernetes-validate --strict --quiet -k "$kv" "$f" >"$out/validate.log" 2>&1 \
        || { cat "$out/validate.log"; fail "kubernetes-validate $kv: $(basename "$f") from $values"; }
    done
  done
done

step "Helm 3 ($(helm3 version --short)) lints and renders exactly what Helm 4 does"
for values in "$chart"/ci/*.yaml; do
  helm3 lint --strict "$chart" -f "$values" >"$work/lint3.log" 2>&1 \
    || { cat "$work/lint3.log"; fail "helm3 lint --strict $chart -f $values"; }
  helm3 template kvstore "$chart" -n kvstore-system -f "$values" >"$work/h3.yaml" 2>&1 \
    || { cat "$work/h3.yaml"; fail "helm3 template $chart -f $values"; continue; }
  helm template kvstore "$chart" -n kvstore-system -f "$values" >"$work/h4.yaml" 2>&1 \
    || { fail "helm template $chart -f $values"; continue; }
  diff -u "$work/h4.yaml" "$work/h3.yaml" || fail "helm3 and helm render $values differently"
done

step "kvCluster.certManager: a Certificate naming every pod, and the KvCluster on it"
helm template kvstore "$chart" -n kvstore-system -f "$chart/ci/cert-manager-values.yaml" >"$work/cm.yaml" \
  || fail "helm template -f cert-manager-values.yaml"
kv-python - "$work/cm.yaml" <<'EOF' || fail "kvCluster.certManager renders a Certificate the KvCluster does not use, or that misses the pods"
import fnmatch, sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
kvc = next(d for d in docs if d["kind"] == "KvCluster")
name, ns = kvc["metadata"]["name"], kvc["metadata"]["namespace"]
certs = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Certificate"}
issuers = {d["metadata"]["name"] for d in docs if d["kind"] == "Issuer"}
tls = kvc["spec"]["tls"]
assert tls == {"mode": "Provided", "secretName": f"{name}-cert"}, tls
cert = certs[f"{name}-cert"]["spec"]
assert cert["secretName"] == tls["secretName"], cert
# what kv-operator calls each pod (objects::pod_host), also after a scale-up;
# a wildcard covers one label only
for o in range(0, kvc["spec"]["replicas"] + 5):
    host = f"{name}-{o}.{name}-peers.{ns}.svc"
    assert any(fnmatch.fnmatchcase(host, n) and n.count(".") == host.count(".") for n in cert["dnsNames"]), host
assert {"server auth", "client auth"} <= set(cert["usages"]), cert["usages"]
assert cert["issuerRef"]["name"] in issuers, (cert["issuerRef"], issuers)
ca = certs[f"{name}-ca"]["spec"]
assert ca["isCA"] is True and ca["issuerRef"]["name"] in issuers, ca
print("certificate for", tls["secretName"], "names", cert["dnsNames"])
EOF

step "the CRD template keeps the CRD on uninstall and can be switched off"
helm template kvstore "$chart" --show-only templates/crd.yaml >"$work/crd-template.yaml"
[ "$(grep -c 'helm.sh/resource-policy: keep' "$work/crd-template.yaml")" = 2 ] \
  || fail "templates/crd.yaml: not both CRDs with helm.sh/resource-policy: keep"
grep -q 'name: kvbackups.kvstore.dev' "$work/crd-template.yaml" \
  || fail "templates/crd.yaml: no KvBackup CRD"
helm template kvstore "$chart" --set crds.install=false >"$work/no-crd.yaml"
if grep -q 'kind: CustomResourceDefinition' "$work/no-crd.yaml"; then
  fail "crds.install=false still renders the CRD"
fi
step "values.schema.json refuses bad values"
if helm template kvstore "$chart" --set operator.replicas=0 >/dev/null 2>&1; then
  fail "values.schema.json accepts operator.replicas=0"
fi
if helm template kvstore "$chart" --set nosuchkey=1 >/dev/null 2>&1; then
  fail "values.schema.json accepts an unknown top-level key"
fi

# --- what kv-operator renders -------------------------------------------------------
step "building kv-operator (crd, render)"
if cargo build -q -p kv-operator --locked; then
  operator="${CARGO_TARGET_DIR:-target}/debug/kv-operator"
  "$operator" crd | diff -u deploy/crd.yaml - >/dev/null \
    || fail "deploy/crd.yaml differs from 'kv-operator crd'"
  "$operator" crd kvbackup | diff -u deploy/crd-kvbackup.yaml - >/dev/null \
    || fail "deploy/crd-kvbackup.yaml differs from 'kv-operator crd kvbackup'"
  mkdir -p "$work/operator"
  for ex in deploy/examples/*.yaml; do
    "$operator" render -f "$ex" >"$work/operator/rendered-$(basename "$ex")" \
      || fail "kv-operator render -f $ex"
  done
else
  fail "cargo build -p kv-operator"
fi

step "deploy/*.yaml and kv-operator render output with kubernetes-validate --strict"
deploy_builtin=()
for f in deploy/*.yaml; do
  [ "$f" = deploy/crd.yaml ] && continue
  deploy_builtin+=("$f")
done
for kv in "${kube_versions[@]}"; do
  for f in "${deploy_builtin[@]}" deploy/crd.yaml "$work"/operator/rendered-*.yaml; do
    [ -e "$f" ] || continue
    kubernetes-validate --strict --quiet -k "$kv" "$f" >"$work/deploy.log" 2>&1 \
      || { cat "$work/deploy.log"; fail "kubernetes-validate $kv: ${f#"$work"/}"; }
  done
done

# --- KvCluster instances against the CRD schema -------------------------------
if [ "$have_crd" = 1 ]; then
  step "KvCluster objects against the schema of deploy/crd.yaml"
  kv-python scripts/crd-schema.py deploy/crd.yaml >"$work/kvcluster.schema.json"
  valid=(deploy/examples/*.yaml)
  rendered=("$work"/render/*/kvcluster/*.yaml)
  [ -e "${rendered[0]}" ] || fail "no ci values file renders a KvCluster"
  for f in "${valid[@]}" "${rendered[@]}"; do
    [ -e "$f" ] || continue
    check-jsonschema --schemafile "$work/kvcluster.schema.json" "$f" >"$work/cj.log" 2>&1 \
      || { cat "$work/cj.log"; fail "valid KvCluster refused: ${f#"$work"/}"; }
  done
  n_invalid=0
  for f in deploy/examples/invalid/*.yaml; do
    [ -e "$f" ] || continue
    n_invalid=$((n_invalid + 1))
    if [[ "$(sed -n 1p "$f")" == *'(CEL rule'* ]]; then
      # CEL rules are not JSON Schema: operator/tests/k8s_cel.rs refuses these.
      grep -q "$(basename "$f")" operator/tests/k8s_cel.rs 2>/dev/null \
        || grep -q 'deploy/examples/invalid/' operator/tests/k8s_cel.rs \
        || fail "$f needs a CEL rule but operator/tests/k8s_cel.rs does not check the invalid examples"
      echo "  $f: CEL rule, checked by operator/tests/k8s_cel.rs"
      continue
    fi
    if check-jsonschema --schemafile "$work/kvcluster.schema.json" "$f" >/dev/null 2>&1; then
      fail "invalid KvCluster accepted by the schema: $f"
    else
      echo "  $f: refused, as it must be"
    fi
  done
  [ "$n_invalid" -gt 0 ] || fail "deploy/examples/invalid/ holds no invalid examples"
fi

# --- yamllint -------------------------------------------------------------------
step "yamllint"
yamllint_config='{extends: default, rules: {line-length: {max: 160}, document-start: disable, indentation: {spaces: 2, indent-sequences: whatever}, truthy: {check-keys: false}, comments: {min-spaces-from-content: 1}, braces: {max-spaces-inside: 1}, brackets: {max-spaces-inside: 1}}}'
yamllint --strict -d "$yamllint_config" \
  "$chart/Chart.yaml" "$chart/values.yaml" "$chart"/ci/*.yaml "$chart/files/rules.yaml" "$chart/files/crd.yaml" "$chart/files/crd-kvbackup.yaml" \
  deploy/ observability/ $( [ -d .github ] && echo .github/ ) \
  || fail "yamllint"

# --- Prometheus rules and dashboard ---------------------------------------------------
step "promtool check rules / test rules"
promtool check rules "$chart/files/rules.yaml" || fail "promtool check rules $chart/files/rules.yaml"
promtool test rules observability/tests/*.yaml || fail "promtool test rules observability/tests"
kv-python - "$chart/files/rules.yaml" observability/tests/*.yaml <<'EOF' || fail "an alert has no promtool unit test"
import sys, yaml
alerts = {r["alert"] for g in yaml.safe_load(open(sys.argv[1]))["groups"] for r in g["rules"] if "alert" in r}
tested = set()
for t in sys.argv[2:]:
    for case in yaml.safe_load(open(t)).get("tests", []):
        for a in case.get("alert_rule_test", []):
            if a.get("exp_alerts"):
                tested.add(a["alertname"])
missing = sorted(alerts - tested)
if missing:
    sys.exit(f"alerts without a firing unit test: {missing}")
print(f"{len(alerts)} alerts, each with a firing unit test")
EOF

step "Grafana dashboard: JSON, queries parse, metric names from docs/design.md"
kv-python - "$chart/files/dashboard.json" "$chart/files/rules.yaml" docs/design.md "$work/dashboard-rules.yaml" <<'EOF' \
  && promtool check rules "$work/dashboard-rules.yaml" >/dev/null || fail "dashboard queries"
import json, re, sys, yaml
dash, rules, design, out = sys.argv[1:5]
d = json.load(open(dash))
known = set(re.findall(r"`(kv_[a-z_]+)", open(design).read()))
exprs = [t["expr"] for p in d["panels"] for t in p.get("targets", [])]
exprs += [r["expr"] for g in yaml.safe_load(open(rules))["groups"] for r in g["rules"]]
bad = []
for e in exprs:
    for m in re.findall(r"\b(kv_[a-z_]+)", e):
        base = re.sub(r"_(bucket|sum|count)$", "", m)
        if m not in known and base not in known:
            bad.append((m, e))
if bad:
    sys.exit(f"metrics not in docs/design.md: {bad}")
rules_out = {"groups": [{"name": "dashboard", "rules": [
    {"record": f"dashboard:query{i}", "expr": e.replace("$__rate_interval", "5m").replace("$kvcluster", ".*")}
    for i, e in enumerate(exprs)]}]}
yaml.safe_dump(rules_out, open(out, "w"))
print(f"{len(exprs)} queries")
EOF

# --- images ---------------------------------------------------------------------
step "container images"
images_t0=$SECONDS
# the daemon that answers, or one of our own (CI's machine has only the CLI)
docker_ok=0
if docker_env="$(scripts/dockerd.sh start)"; then
  docker_ok=1
  if [ -n "$docker_env" ]; then eval "$docker_env"; own_dockerd=1; fi
  echo "Docker daemon: $(docker version -f '{{.Server.Version}}' 2>&1) at ${DOCKER_HOST:-the default socket}"
  # free space where the images are written (a CI run once filled the disk here)
  df -Ph . "$(docker info -f '{{.DockerRootDir}}' 2>/dev/null || echo /var/lib/docker)" 2>/dev/null \
    | awk 'NR>1 {print "[disk] " $6 ": " $4 " free"}' || true
fi
if [ "$docker_ok" = 1 ]; then
  # an image is built once its crate has its binary (kv-node lands in steps:
  # storage first, the server later); a missing one is reported loudly
  members="$(cargo metadata --no-deps --format-version 1 --locked 2>/dev/null \
    | kv-python -c 'import json,sys; print(" ".join(t["name"] for p in json.load(sys.stdin)["packages"] for t in p["targets"] if "bin" in t["kind"]))')" \
    || fail "cargo metadata"
  images=()
  for img in kv-node kv-operator; do
    if [[ " $members " == *" $img "* ]]; then
      images+=("$img")
    else
      printf '\n!!!!!!!!\nNOT BUILT: image kvstore/%s (crate %s has no binary yet)\n!!!!!!!!\n' "$img" "$img" >&2
    fi
  done
  tag="${KV_IMAGE_TAG:-dev}"
  if [ "${#images[@]}" -eq 0 ]; then
    fail "no image can be built: neither kv-node nor kv-operator has a binary"
  elif scripts/build-images.sh "${images[@]}"; then
    for img in "${images[@]}"; do
      docker run --rm "kvstore/$img:$tag" --help >"$work/help.log" 2>&1 \
        || { cat "$work/help.log"; fail "docker run kvstore/$img:$tag --help"; }
      user="$(docker image inspect -f '{{.Config.User}}' "kvstore/$img:$tag")"
      [ "$user" = 65532:65532 ] || fail "kvstore/$img:$tag runs as '$user', not 65532:65532"
      layers="$(docker image inspect -f '{{len .RootFS.Layers}}' "kvstore/$img:$tag")"
      # FROM scratch: the binary, and for kv-node an empty /data
      want=1; [ "$img" = kv-node ] && want=2
      [ "$layers" = "$want" ] || fail "kvstore/$img:$tag has $layers layers, expected $want (FROM scratch)"
      title="$(docker image inspect -f '{{index .Config.Labels "org.opencontainers.image.title"}}' "kvstore/$img:$tag")"
      [ "$title" = "$img" ] || fail "kvstore/$img:$tag: OCI label title is '$title'"
      entry="$(docker image inspect -f '{{json .Config.Entrypoint}}' "kvstore/$img:$tag")"
      [ "$entry" = "[\"/$img\"]" ] || fail "kvstore/$img:$tag: entry point is $entry, not [\"/$img\"]"
      # no shell, nothing but the binary (and kv-node's empty /data): the files
      # of every layer of the saved image
      docker image save "kvstore/$img:$tag" -o "$work/$img.tar" \
        && kv-python - "$work/$img.tar" "$img" <<'EOF' || fail "kvstore/$img:$tag holds more than its binary"
import io, json, sys, tarfile
path, img = sys.argv[1:3]
want = {img: "file"} | ({"data": "dir"} if img == "kv-node" else {})
files = {}
with tarfile.open(path) as t:
    for layer in json.load(t.extractfile("manifest.json"))[0]["Layers"]:
        with tarfile.open(fileobj=io.BytesIO(t.extractfile(layer).read())) as lt:
            for m in lt.getmembers():
                name = m.name.strip("./").rstrip("/")
                if name:
                    files[name] = "dir" if m.isdir() else "file" if m.isfile() else m.type.decode()
if files != want:
    sys.exit(f"{img}: image files {files}, expected {want}")
print(f"  {img}: image holds {sorted(files)} only")
EOF
      rm -f "$work/$img.tar"
      if docker run --rm --entrypoint /bin/sh "kvstore/$img:$tag" -c true >/dev/null 2>&1; then
        fail "kvstore/$img:$tag runs /bin/sh"
      fi
    done
    if [[ " ${images[*]} " == *" kv-node "* ]]; then
      # the node serves its API as a non-root user on a read-only root filesystem
      cid="$(docker run -d --read-only --tmpfs /data:uid=65532,gid=65532 "kvstore/kv-node:$tag" \
        --data-dir /data --node-id 0 --listen 0.0.0.0:7400 --peer-listen 0.0.0.0:7401 \
        --token smoke-token --cluster-token smoke-cluster-token)"
      ok=0
      for _ in $(seq 1 50); do
        ip="$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$cid")"
        if [ -n "$ip" ] && kv-python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://$ip:7400/healthz', timeout=1).status == 200 else 1)" 2>/dev/null; then
          ok=1; break
        fi
        sleep 0.2
      done
      [ "$ok" = 1 ] || { docker logs "$cid" 2>&1 | tail -20; fail "kv-node container: /healthz did not answer 200"; }
      docker rm -f "$cid" >/dev/null
      # three containers on a private network, driven by the planner: kill,
      # disconnect, rm + recreate on the same volume (operator/tests/docker_cluster.rs)
      step "multi-container test (3 kv-node containers, private Docker network)"
      KV_IMAGE_TAG="$tag" cargo test --locked -p kv-operator --test docker_cluster -- --ignored --nocapture \
        || fail "multi-container test (operator/tests/docker_cluster.rs)"
    fi
  else
    fail "scripts/build-images.sh ${images[*]}"
  fi
  stop_dockerd
  echo "container images and the multi-container test: $((SECONDS - images_t0)) s"
elif [ "${KV_REQUIRE_DOCKER:-0}" = 1 ]; then
  fail "no Docker daemon answers, scripts/dockerd.sh could not start one (why: above), and KV_REQUIRE_DOCKER=1"
else
  printf '\n!!!!!!!!\nSKIP: no Docker daemon answers and scripts/dockerd.sh could not start one (why: above): images are NOT built or tested (KV_REQUIRE_DOCKER=1 makes this fail)\n!!!!!!!!\n' >&2
fi

# --- Prometheus ------------------------------------------------------------------
# every dashboard query returns data and every alert expression is valid against
# a real Prometheus scraping `kvctl up` (debug binaries from the cargo test phase)
step "Prometheus scraping a local cluster: dashboard queries and alerts (scripts/test-prometheus.sh)"
scripts/test-prometheus.sh || fail "scripts/test-prometheus.sh: dashboard queries / alert expressions against a real Prometheus"

if [ "${#failures[@]}" -gt 0 ]; then
  printf '\ndeployment checks FAILED (%d):\n' "${#failures[@]}" >&2
  printf '  - %s\n' "${failures[@]}" >&2
  exit 1
fi
echo
echo "deployment checks passed"
