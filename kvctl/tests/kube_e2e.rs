//! The real `kvctl` binary against a fake Kubernetes API server on loopback.
//!
//! The fake serves one KvCluster (`ns/demo`) at its API path: GET, and merge
//! PATCH with the API server's optimistic concurrency (a
//! `metadata.resourceVersion` in the patch that is not the stored one is a
//! 409 Conflict). It records every request, so each test checks the exact
//! requests the binary sent, what it printed and its exit status. kvctl
//! finds the server through a temporary KUBECONFIG, as kubectl would. It
//! also serves the log of pod `ns/demo-1` ([`LOG_PATH`]) as text.
//!
//! The same binary runs as the kubectl plugin when its name is `kubectl-kv`:
//! the `plugin_*` tests run it through such a link (and through a real
//! `kubectl`, when one is installed).

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use warp::Filter;
use warp::Reply;
use warp::http::{HeaderMap, Method, StatusCode};

const PATH: &str = "/apis/kvstore.dev/v1alpha1/namespaces/ns/kvclusters/demo";
const TOKEN: &str = "kube-test-token";
const LOG_PATH: &str = "/api/v1/namespaces/ns/pods/demo-1/log";
const LOG_TEXT: &str = "{\"level\":\"INFO\",\"msg\":\"node 1 Up\"}\nsecond line\n";

/// One request the fake API server received.
#[derive(Clone, Debug)]
struct Request {
    method: Method,
    path: String,
    query: String,
    content_type: String,
    authorization: String,
    body: Value,
}

#[derive(Default)]
struct State {
    object: Value,
    requests: Vec<Request>,
    /// The next PATCH finds the object changed by someone else first: this
    /// becomes failedNodes, the resourceVersion moves on, and the PATCH gets 409.
    concurrent_change: Option<Vec<u32>>,
    /// Requests with this method get 403.
    forbid: Option<Method>,
}

fn status(code: StatusCode, reason: &str, message: &str) -> (StatusCode, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code.as_u16()}),
    )
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    let Some(fields) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    for (k, v) in fields {
        if v.is_null() {
            if let Some(t) = target.as_object_mut() {
                t.remove(k);
            }
        } else {
            merge(&mut target[k.as_str()], v);
        }
    }
}

fn bump(object: &mut Value) {
    let rv: u64 = object["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("numeric resourceVersion");
    object["metadata"]["resourceVersion"] = json!((rv + 1).to_string());
    let generation = object["metadata"]["generation"].as_i64().unwrap_or(1);
    object["metadata"]["generation"] = json!(generation + 1);
}

fn answer(state: &mut State, method: &Method, path: &str, body: &Value) -> (StatusCode, Value) {
    if state.forbid.as_ref() == Some(method) {
        let verb = if method == Method::GET {
            "get"
        } else {
            "patch"
        };
        return status(
            StatusCode::FORBIDDEN,
            "Forbidden",
            &format!(
                "kvclusters.kvstore.dev \"demo\" is forbidden: User \"alice\" cannot {verb} resource \"kvclusters\" in API group \"kvstore.dev\" in the namespace \"ns\""
            ),
        );
    }
    if path != PATH {
        let name = path.rsplit('/').next().unwrap_or_default();
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("kvclusters.kvstore.dev \"{name}\" not found"),
        );
    }
    if *method == Method::GET {
        return (StatusCode::OK, state.object.clone());
    }
    if *method != Method::PATCH {
        return status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "only GET and PATCH",
        );
    }
    if let Some(failed) = state.concurrent_change.take() {
        state.object["spec"]["faultInjection"]["failedNodes"] = json!(failed);
        bump(&mut state.object);
    }
    let wanted = &body["metadata"]["resourceVersion"];
    if !wanted.is_null() && *wanted != state.object["metadata"]["resourceVersion"] {
        return status(
            StatusCode::CONFLICT,
            "Conflict",
            "Operation cannot be fulfilled on kvclusters.kvstore.dev \"demo\": the object has been modified; please apply your changes to the latest version and try again",
        );
    }
    let mut patch = body.clone();
    if let Some(m) = patch.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("resourceVersion");
    }
    merge(&mut state.object, &patch);
    bump(&mut state.object);
    (StatusCode::OK, state.object.clone())
}

/// Serves `object` at [`PATH`] on 127.0.0.1 until the test ends.
async fn fake_api_server(object: Value) -> (SocketAddr, Arc<Mutex<State>>) {
    let state = Arc::new(Mutex::new(State {
        object,
        ..State::default()
    }));
    let shared = state.clone();
    let route = warp::method()
        .and(warp::path::full())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(warp::header::headers_cloned())
        .and(warp::body::bytes())
        .map(
            move |method: Method,
                  path: warp::path::FullPath,
                  query: String,
                  headers: HeaderMap,
                  bytes: warp::hyper::body::Bytes| {
                let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let header = |name: &str| {
                    headers
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string()
                };
                let mut state = shared.lock().expect("state lock");
                state.requests.push(Request {
                    method: method.clone(),
                    path: path.as_str().to_string(),
                    query,
                    content_type: header("content-type"),
                    authorization: header("authorization"),
                    body: body.clone(),
                });
                if method == Method::GET && path.as_str() == LOG_PATH {
                    let reply = warp::reply::with_header(LOG_TEXT, "content-type", "text/plain");
                    return warp::reply::with_status(reply, StatusCode::OK).into_response();
                }
                let (code, answer) = answer(&mut state, &method, path.as_str(), &body);
                warp::reply::with_status(warp::reply::json(&answer), code).into_response()
            },
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the fake API server");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(warp::serve(route).incoming(listener).run());
    (addr, state)
}

/// The KvCluster as stored: 3 replicas (factor 3), all Up, `failed` held down.
fn kvcluster(failed: &[u32], write_consistency: &str) -> Value {
    let states: Vec<&str> = (0..3)
        .map(|o| if failed.contains(&o) { "Failed" } else { "Up" })
        .collect();
    json!({
        "apiVersion": "kvstore.dev/v1alpha1",
        "kind": "KvCluster",
        "metadata": {"name": "demo", "namespace": "ns", "resourceVersion": "100",
                     "generation": 4, "uid": "uid-1"},
        "spec": {"replicas": 3,
                 "replication": {"strategy": "ConsistentHashing", "factor": 3,
                                 "writeConsistency": write_consistency, "readConsistency": "Quorum"},
                 "faultInjection": {"failedNodes": failed}},
        "status": {
            "phase": if failed.is_empty() { "Running" } else { "Degraded" },
            "observedGeneration": 4, "readyReplicas": 3 - failed.len(), "topologyEpoch": 9,
            "nodes": states.iter().enumerate().map(|(i, s)| json!({
                "ordinal": i, "pod": format!("demo-{i}"), "state": s
            })).collect::<Vec<_>>(),
            "conditions": [
                {"type": "Available", "status": "True", "observedGeneration": 4,
                 "reason": "QuorumAvailable", "message": "3 of 3 nodes Ready"},
                {"type": "Progressing", "status": "False", "observedGeneration": 4,
                 "reason": "Reconciled", "message": "nothing is changing"}
            ]
        }
    })
}

/// A kubeconfig whose current context `fake` (namespace `ns`) and context
/// `elsewhere` (namespace `other`) both point at `addr`.
fn kubeconfig(dir: &Path, addr: SocketAddr) -> PathBuf {
    let path = dir.join("kubeconfig");
    let text = format!(
        "apiVersion: v1
kind: Config
clusters:
- name: fake
  cluster:
    server: http://{addr}
users:
- name: alice
  user:
    token: {TOKEN}
contexts:
- name: fake
  context: {{cluster: fake, user: alice, namespace: ns}}
- name: elsewhere
  context: {{cluster: fake, user: alice, namespace: other}}
current-context: fake
"
    );
    std::fs::write(&path, text).expect("write the kubeconfig");
    path
}

/// Runs the kvctl binary with `KUBECONFIG` (or none) and an endpoint nothing
/// listens on, so that a command that used the endpoint would fail.
async fn kvctl(kubeconfig: Option<&Path>, home: &Path, args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(common::kvctl_bin());
    cmd.args(args)
        .env("HOME", home)
        .env("KV_ENDPOINT", "http://127.0.0.1:9")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .env_remove("KV_TOKEN")
        .kill_on_drop(true);
    match kubeconfig {
        Some(k) => cmd.env("KUBECONFIG", k),
        None => cmd.env("KUBECONFIG", home.join("no-such-kubeconfig")),
    };
    tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("kvctl finished within 30 s")
        .expect("kvctl runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

struct Fixture {
    _dir: tempfile::TempDir,
    home: PathBuf,
    kubeconfig: PathBuf,
    state: Arc<Mutex<State>>,
}

impl Fixture {
    async fn new(object: Value) -> Fixture {
        let dir = tempfile::tempdir().expect("temp dir");
        let (addr, state) = fake_api_server(object).await;
        let kubeconfig = kubeconfig(dir.path(), addr);
        Fixture {
            home: dir.path().to_path_buf(),
            _dir: dir,
            kubeconfig,
            state,
        }
    }

    async fn kvctl(&self, args: &[&str]) -> Output {
        kvctl(Some(&self.kubeconfig), &self.home, args).await
    }

    fn requests(&self) -> Vec<Request> {
        self.state.lock().expect("state lock").requests.clone()
    }

    fn stored_failed_nodes(&self) -> Value {
        self.state.lock().expect("state lock").object["spec"]["faultInjection"]["failedNodes"]
            .clone()
    }
}

fn assert_success(out: &Output) {
    assert!(
        out.status.success(),
        "kvctl failed ({}): stdout {:?} stderr {:?}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
}

fn assert_get(r: &Request) {
    assert_eq!((&r.method, r.path.as_str()), (&Method::GET, PATH), "{r:?}");
    assert_eq!(r.authorization, format!("Bearer {TOKEN}"));
}

fn assert_merge_patch(r: &Request, resource_version: &str, failed: Value) {
    assert_patch(
        r,
        json!({"metadata": {"resourceVersion": resource_version},
               "spec": {"faultInjection": {"failedNodes": failed}}}),
    );
}

/// A merge patch by kvctl with exactly this body.
fn assert_patch(r: &Request, body: Value) {
    assert_eq!(
        (&r.method, r.path.as_str()),
        (&Method::PATCH, PATH),
        "{r:?}"
    );
    assert_eq!(r.content_type, "application/merge-patch+json");
    let params: Vec<&str> = r.query.split('&').filter(|p| !p.is_empty()).collect();
    assert_eq!(params, ["fieldManager=kvctl"], "{r:?}");
    assert_eq!(r.authorization, format!("Bearer {TOKEN}"));
    assert_eq!(r.body, body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_patches_failed_nodes_with_the_resource_version_then_recover_removes_it() {
    let f = Fixture::new(kvcluster(&[], "Quorum")).await;

    let out = f
        .kvctl(&["fail", "1", "--cluster", "demo", "--no-wait"])
        .await;
    assert_success(&out);
    assert_eq!(
        text(&out.stdout),
        "KvCluster ns/demo: node 1 added to spec.faultInjection.failedNodes: kv-operator deletes its pod and holds it Failed until recovered\nfailedNodes: [1]\n"
    );
    let seen = f.requests();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_get(&seen[0]);
    assert_merge_patch(&seen[1], "100", json!([1]));
    assert_eq!(f.stored_failed_nodes(), json!([1]));

    // Again: nothing to write.
    let out = f
        .kvctl(&["fail", "1", "--cluster", "demo", "--no-wait"])
        .await;
    assert_success(&out);
    assert!(
        text(&out.stdout).starts_with("KvCluster ns/demo: node 1 is already held down"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(f.requests().len(), 3, "only a GET");

    // Recover, with the namespace given and JSON output.
    let out = f
        .kvctl(&[
            "recover",
            "1",
            "--cluster",
            "demo",
            "-n",
            "ns",
            "-o",
            "json",
            "--no-wait",
        ])
        .await;
    assert_success(&out);
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON output");
    assert_eq!(
        v,
        json!({"cluster": "demo", "namespace": "ns", "action": "recover", "node": 1,
               "changed": true, "failedNodesBefore": [1], "failedNodes": [],
               "forceAnnotationBefore": null, "forceAnnotation": null, "attempts": 1})
    );
    let seen = f.requests();
    assert_eq!(seen.len(), 5, "{seen:?}");
    assert_get(&seen[3]);
    assert_merge_patch(&seen[4], "101", json!([]));
    assert_eq!(f.stored_failed_nodes(), json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrent_change_gets_409_and_kvctl_keeps_it() {
    let f = Fixture::new(kvcluster(&[], "One")).await;
    f.state.lock().expect("state lock").concurrent_change = Some(vec![2]);

    let out = f
        .kvctl(&["fail", "0", "--cluster", "demo", "--no-wait"])
        .await;
    assert_success(&out);
    let stdout = text(&out.stdout);
    assert!(stdout.contains("failedNodes: [2, 0]\n"), "{stdout}");
    assert!(stdout.contains("retried 1 time(s)"), "{stdout}");
    let seen = f.requests();
    assert_eq!(seen.len(), 4, "{seen:?}");
    assert_get(&seen[0]);
    assert_merge_patch(&seen[1], "100", json!([0]));
    assert_get(&seen[2]);
    assert_merge_patch(&seen[3], "101", json!([2, 0]));
    assert_eq!(f.stored_failed_nodes(), json!([2, 0]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_down_that_leaves_keys_short_of_quorum_is_refused_and_nothing_is_written() {
    let f = Fixture::new(kvcluster(&[1], "Quorum")).await;
    let out = f
        .kvctl(&["fail", "2", "--cluster", "demo", "--no-wait"])
        .await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stderr),
        "kvctl: holding down node(s) [2] would leave some keys with 1 of 3 owners live, but writes at Quorum need 2: \
         hold down fewer nodes, lower the write consistency, or force it\n"
    );
    // --force does not reach beyond the cluster's ordinals.
    for args in [
        &["fail", "3", "--cluster", "demo", "--no-wait"][..],
        &["fail", "3", "--cluster", "demo", "--force", "--no-wait"],
    ] {
        let out = f.kvctl(args).await;
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert_eq!(
            text(&out.stderr),
            "kvctl: node 3 is not a node of KvCluster demo (spec.replicas is 3: ordinals 0..3)\n",
            "{args:?}"
        );
    }
    let seen = f.requests();
    assert!(
        seen.iter().all(|r| r.method == Method::GET),
        "nothing may be written: {seen:?}"
    );
    assert_eq!(f.stored_failed_nodes(), json!([1]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_sets_the_annotation_in_the_patch_and_recovering_the_last_node_removes_it() {
    let f = Fixture::new(kvcluster(&[1], "Quorum")).await;
    let annotation = |f: &Fixture| {
        f.state.lock().expect("state lock").object["metadata"]["annotations"]
            ["kvstore.dev/force-fault-injection"]
            .clone()
    };

    let out = f
        .kvctl(&["fail", "2", "--cluster", "demo", "--force", "--no-wait"])
        .await;
    assert_success(&out);
    assert_eq!(
        text(&out.stdout),
        "KvCluster ns/demo: node 2 added to spec.faultInjection.failedNodes: kv-operator deletes its pod and holds it Failed until recovered\n\
         failedNodes: [1, 2]\n\
         annotation kvstore.dev/force-fault-injection=\"true\" set: kv-operator plans this KvCluster with force and holds nodes down even when some keys are left with fewer live owners than writes need; \
         recovering the last held-down node removes it (or: kubectl annotate kvc demo -n ns kvstore.dev/force-fault-injection-)\n"
    );
    let seen = f.requests();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_get(&seen[0]);
    assert_patch(
        &seen[1],
        json!({"metadata": {"resourceVersion": "100",
                            "annotations": {"kvstore.dev/force-fault-injection": "true"}},
               "spec": {"faultInjection": {"failedNodes": [1, 2]}}}),
    );
    assert_eq!(f.stored_failed_nodes(), json!([1, 2]));
    assert_eq!(annotation(&f), json!("true"));

    // Node 1 recovered, node 2 still held down: the annotation stays.
    let out = f
        .kvctl(&["recover", "1", "--cluster", "demo", "--no-wait"])
        .await;
    assert_success(&out);
    let stdout = text(&out.stdout);
    assert!(
        stdout.ends_with(
            "failedNodes: [2]\n\
             annotation kvstore.dev/force-fault-injection=\"true\" remains until the last held-down node is recovered; \
             remove it now with: kubectl annotate kvc demo -n ns kvstore.dev/force-fault-injection-\n"
        ),
        "{stdout}"
    );
    let seen = f.requests();
    assert_eq!(seen.len(), 4, "{seen:?}");
    assert_merge_patch(&seen[3], "101", json!([2]));
    assert_eq!(annotation(&f), json!("true"));

    // The last one: the annotation goes in the same patch.
    let out = f
        .kvctl(&[
            "recover",
            "2",
            "--cluster",
            "demo",
            "-o",
            "json",
            "--no-wait",
        ])
        .await;
    assert_success(&out);
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON output");
    assert_eq!(
        v,
        json!({"cluster": "demo", "namespace": "ns", "action": "recover", "node": 2,
               "changed": true, "failedNodesBefore": [2], "failedNodes": [],
               "forceAnnotationBefore": "true", "forceAnnotation": null, "attempts": 1})
    );
    let seen = f.requests();
    assert_eq!(seen.len(), 6, "{seen:?}");
    assert_patch(
        &seen[5],
        json!({"metadata": {"resourceVersion": "102",
                            "annotations": {"kvstore.dev/force-fault-injection": null}},
               "spec": {"faultInjection": {"failedNodes": []}}}),
    );
    assert_eq!(f.stored_failed_nodes(), json!([]));
    assert_eq!(
        annotation(&f),
        Value::Null,
        "removed from the stored object"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_prints_the_table_epoch_phase_and_conditions_from_the_status() {
    let f = Fixture::new(kvcluster(&[1], "Quorum")).await;
    let out = f.kvctl(&["nodes", "--cluster", "demo"]).await;
    assert_success(&out);
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines[..2],
        [
            "KvCluster ns/demo  phase Degraded  ready 2/3  failedNodes [1]",
            "cluster ns/demo  epoch 9  placement ConsistentHashing factor 3 over nodes 0,1,2  read Quorum  write Quorum",
        ],
        "{stdout}"
    );
    assert!(lines[2].starts_with("ORDINAL  ADDRESS"), "{stdout}");
    assert!(
        lines[4].starts_with("1  ")
            && lines[4].contains("demo-1.demo-peers.ns.svc:7400")
            && lines[4].contains("Failed"),
        "{stdout}"
    );
    assert!(
        stdout.contains("  Available=True     QuorumAvailable  3 of 3 nodes Ready\n"),
        "{stdout}"
    );
    let seen = f.requests();
    assert_eq!(seen.len(), 1);
    assert_get(&seen[0]);

    let out = f.kvctl(&["nodes", "--cluster", "demo", "-o", "json"]).await;
    assert_success(&out);
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON output");
    assert_eq!(v["epoch"], 9);
    assert_eq!(v["phase"], "Degraded");
    assert_eq!(v["failedNodes"], json!([1]));
    assert_eq!(v["nodes"][1]["state"], "Failed");
    assert_eq!(v["conditions"][0]["type"], "Available");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_context_picks_the_namespace_and_a_missing_kvcluster_is_named() {
    let f = Fixture::new(kvcluster(&[], "Quorum")).await;
    let out = f
        .kvctl(&["nodes", "--cluster", "demo", "--context", "elsewhere"])
        .await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        "kvctl: KvCluster demo not found in namespace other\n"
    );
    let out = f
        .kvctl(&["fail", "1", "--cluster", "nope", "--no-wait"])
        .await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        "kvctl: KvCluster nope not found in namespace ns\n"
    );
    let paths: Vec<String> = f.requests().iter().map(|r| r.path.clone()).collect();
    assert_eq!(
        paths,
        [
            "/apis/kvstore.dev/v1alpha1/namespaces/other/kvclusters/demo",
            "/apis/kvstore.dev/v1alpha1/namespaces/ns/kvclusters/nope",
        ]
    );
    let out = f
        .kvctl(&["nodes", "--cluster", "demo", "--context", "missing"])
        .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).starts_with("kvctl: cannot use the kubeconfig context \"missing\""),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_names_the_rbac_verb_kvctl_needs() {
    let f = Fixture::new(kvcluster(&[], "Quorum")).await;
    f.state.lock().expect("state lock").forbid = Some(Method::PATCH);
    let out = f
        .kvctl(&["fail", "1", "--cluster", "demo", "--no-wait"])
        .await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with(
            "kvctl: forbidden: kvctl needs the RBAC verb \"patch\" on kvclusters.kvstore.dev in namespace ns"
        ),
        "{stderr}"
    );
    f.state.lock().expect("state lock").forbid = Some(Method::GET);
    let out = f.kvctl(&["nodes", "--cluster", "demo"]).await;
    assert!(
        text(&out.stderr).starts_with("kvctl: forbidden: kvctl needs the RBAC verb \"get\""),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(f.stored_failed_nodes(), json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_kubeconfig_kvctl_says_where_it_looked() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = kvctl(
        None,
        dir.path(),
        &["fail", "1", "--cluster", "demo", "--no-wait"],
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with("kvctl: cannot find a Kubernetes configuration (looked for KUBECONFIG, ~/.kube/config and an in-cluster service account)"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_waits_for_the_operator_and_says_in_progress_past_the_bound() {
    // No operator runs here: the status never shows node 1 Failed, so the
    // wait ends at --wait-timeout saying the change is in progress (exit 0:
    // the spec change stands), after reading the resource again.
    let f = Fixture::new(kvcluster(&[], "Quorum")).await;
    let out = f
        .kvctl(&["fail", "1", "--cluster", "demo", "--wait-timeout", "0.6"])
        .await;
    assert_success(&out);
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("failedNodes: [1]\nin progress: node 1 is Up after"),
        "{stdout}"
    );
    let seen = f.requests();
    assert!(seen.len() >= 3, "a GET after the patch: {seen:?}");
    assert_merge_patch(&seen[1], "100", json!([1]));
    assert!(
        seen[2..].iter().all(|r| r.method == Method::GET),
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn help_describes_the_kubernetes_flags() {
    let dir = tempfile::tempdir().expect("temp dir");
    for cmd in ["fail", "recover", "nodes", "restart"] {
        let out = kvctl(None, dir.path(), &[cmd, "--help"]).await;
        assert_success(&out);
        let help = text(&out.stdout);
        for flag in [
            "--cluster <NAME>",
            "-n, --namespace <NAMESPACE>",
            "--context <CONTEXT>",
        ] {
            assert!(help.contains(flag), "{cmd} --help lacks {flag}:\n{help}");
        }
        assert!(help.contains("KvCluster"), "{help}");
    }
    let out = kvctl(None, dir.path(), &["fail", "--help"]).await;
    let help = text(&out.stdout);
    assert!(
        help.contains("kvstore.dev/force-fault-injection"),
        "fail --help names the annotation --force sets:\n{help}"
    );
    // --namespace and --context only mean something with --cluster.
    let out = kvctl(None, dir.path(), &["fail", "1", "-n", "ns"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_sets_the_restarted_at_annotation_and_says_in_progress_past_the_bound() {
    // No operator runs here: status.lastRestart never shows the request.
    let f = Fixture::new(kvcluster(&[], "Quorum")).await;
    let out = f
        .kvctl(&["restart", "--cluster", "demo", "--wait-timeout", "0.6"])
        .await;
    assert_success(&out);
    let seen = f.requests();
    let at = seen[0].body["metadata"]["annotations"]["kvstore.dev/restartedAt"]
        .as_str()
        .expect("the annotation")
        .to_string();
    assert!(
        at.len() >= 20 && at.as_bytes().get(10) == Some(&b'T') && at.ends_with('Z'),
        "now, RFC 3339: {at}"
    );
    assert_patch(
        &seen[0],
        json!({"metadata": {"annotations": {"kvstore.dev/restartedAt": at}}}),
    );
    assert!(
        seen[1..].iter().all(|r| r.method == Method::GET),
        "{seen:?}"
    );
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("restarts its 3 nodes one at a time")
            && stdout.contains("in progress: 0 of 3 nodes restarted after"),
        "{stdout}"
    );

    // Without --cluster there is nothing to restart.
    let out = f.kvctl(&["restart"]).await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("give --cluster NAME"),
        "{}",
        text(&out.stderr)
    );
}

/// A directory holding `kubectl-kv`, a link to the kvctl binary under test
/// (what `kvctl install-plugin` makes).
fn plugin_dir(home: &Path) -> PathBuf {
    let dir = home.join("bin");
    std::fs::create_dir_all(&dir).expect("create bin/");
    let link = dir.join("kubectl-kv");
    if !link.exists() {
        std::os::unix::fs::symlink(common::kvctl_bin(), &link).expect("link kubectl-kv");
    }
    dir
}

/// Runs `program` (the plugin link, or kubectl) with the fixture's
/// kubeconfig and the plugin directory first on PATH.
async fn run_with_plugin(f: &Fixture, program: &Path, args: &[&str]) -> Output {
    let dir = plugin_dir(&f.home);
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![dir];
    dirs.extend(std::env::split_paths(&path));
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .env("HOME", &f.home)
        .env("KUBECONFIG", &f.kubeconfig)
        .env("PATH", std::env::join_paths(dirs).expect("PATH"))
        .env("KV_ENDPOINT", "http://127.0.0.1:9")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("finished within 30 s")
        .expect("runs")
}

/// A request's query parameters, sorted.
fn log_params(r: &Request) -> Vec<String> {
    let mut params: Vec<String> = r
        .query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect();
    params.sort_unstable();
    params
}

async fn plugin(f: &Fixture, args: &[&str]) -> Output {
    let link = plugin_dir(&f.home).join("kubectl-kv");
    run_with_plugin(f, &link, args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_status_names_the_cluster_first_in_the_contexts_namespace_as_a_table_json_or_yaml() {
    let f = Fixture::new(kvcluster(&[1], "Quorum")).await;
    let out = plugin(&f, &["status", "demo"]).await;
    assert_success(&out);
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with("KvCluster ns/demo  phase Degraded  ready 2/3  failedNodes [1]\n"),
        "{stdout}"
    );
    assert!(stdout.contains("\nORDINAL  ADDRESS"), "{stdout}");
    // the same text as kvctl's own spelling
    let own = f.kvctl(&["nodes", "--cluster", "demo"]).await;
    assert_eq!(stdout, text(&own.stdout));

    let out = plugin(&f, &["status", "demo", "-o", "yaml"]).await;
    assert_success(&out);
    let yaml: Value = serde_yaml::from_slice(&out.stdout).expect("YAML output");
    let json_out = plugin(&f, &["nodes", "demo", "-o", "json"]).await;
    assert_success(&json_out);
    let json: Value = serde_json::from_slice(&json_out.stdout).expect("JSON output");
    assert_eq!(yaml, json, "the same document in YAML and JSON");
    assert_eq!(yaml["phase"], "Degraded");
    assert_eq!(yaml["nodes"][1]["state"], "Failed");

    let out = plugin(&f, &["status", "demo", "-n", "other"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        "kvctl: KvCluster demo not found in namespace other\n"
    );
    let paths: Vec<String> = f.requests().iter().map(|r| r.path.clone()).collect();
    assert_eq!(
        paths,
        [
            PATH,
            PATH,
            PATH,
            PATH,
            "/apis/kvstore.dev/v1alpha1/namespaces/other/kvclusters/demo",
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_fail_recover_and_restart_write_what_the_cluster_commands_write() {
    let f = Fixture::new(kvcluster(&[], "One")).await;
    let out = plugin(&f, &["fail", "demo", "1", "--no-wait"]).await;
    assert_success(&out);
    assert!(
        text(&out.stdout).contains("node 1 added to spec.faultInjection.failedNodes"),
        "{}",
        text(&out.stdout)
    );
    let out = plugin(&f, &["recover", "demo", "1", "--no-wait", "-o", "yaml"]).await;
    assert_success(&out);
    let v: Value = serde_yaml::from_slice(&out.stdout).expect("YAML output");
    assert_eq!(
        (&v["action"], &v["failedNodes"]),
        (&json!("recover"), &json!([]))
    );
    let out = plugin(&f, &["restart", "demo", "--no-wait"]).await;
    assert_success(&out);
    let seen = f.requests();
    assert_eq!(seen.len(), 5, "{seen:?}");
    assert_get(&seen[0]);
    assert_merge_patch(&seen[1], "100", json!([1]));
    assert_get(&seen[2]);
    assert_merge_patch(&seen[3], "101", json!([]));
    assert!(
        seen[4].body["metadata"]["annotations"]["kvstore.dev/restartedAt"].is_string(),
        "{:?}",
        seen[4]
    );
    // kvctl's own `fail` has no cluster argument
    let out = f.kvctl(&["fail", "demo", "1"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_logs_reads_the_node_pods_log_through_the_api_with_follow_and_tail() {
    let f = Fixture::new(kvcluster(&[], "Quorum")).await;
    let out = plugin(&f, &["logs", "demo", "1", "--follow", "--tail", "2"]).await;
    assert_success(&out);
    assert_eq!(text(&out.stdout), LOG_TEXT);
    let seen = f.requests();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_get(&seen[0]);
    assert_eq!(
        (&seen[1].method, seen[1].path.as_str()),
        (&Method::GET, LOG_PATH)
    );
    assert_eq!(
        log_params(&seen[1]),
        ["container=kv-node", "follow=true", "tailLines=2"]
    );
    assert_eq!(seen[1].authorization, format!("Bearer {TOKEN}"));

    // kvctl's own spelling, without --follow
    let out = f.kvctl(&["logs", "1", "--cluster", "demo"]).await;
    assert_success(&out);
    assert_eq!(text(&out.stdout), LOG_TEXT);
    assert_eq!(log_params(&f.requests()[3]), ["container=kv-node"]);

    // an ordinal that is not a node, and a node without a pod
    let out = plugin(&f, &["logs", "demo", "3"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("node 3 is not a node of KvCluster demo"),
        "{}",
        text(&out.stderr)
    );
    let out = plugin(&f, &["logs", "demo", "2"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("node 2 of KvCluster demo has no pod demo-2"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(f.requests().len(), 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_plugin_links_kubectl_kv_and_kubectl_runs_it() {
    let f = Fixture::new(kvcluster(&[], "Quorum")).await;
    let dir = f.home.join("plugins");
    std::fs::create_dir_all(&dir).expect("create plugins/");
    let dir_arg = dir.to_str().expect("UTF-8 temp path");
    let out = f.kvctl(&["install-plugin", "--dir", dir_arg]).await;
    assert_success(&out);
    let link = dir.join("kubectl-kv");
    assert_eq!(
        std::fs::read_link(&link).expect("a symlink"),
        common::kvctl_bin().canonicalize().expect("kvctl path")
    );
    assert!(
        text(&out.stdout).starts_with("kubectl kv installed: "),
        "{}",
        text(&out.stdout)
    );
    let out = f
        .kvctl(&["install-plugin", "--dir", dir_arg, "-o", "json"])
        .await;
    assert_success(&out);
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON output");
    assert_eq!(v["changed"], false);
    // the link runs as the plugin
    let out = run_with_plugin(&f, &link, &["status", "demo"]).await;
    assert_success(&out);
    assert!(text(&out.stdout).starts_with("KvCluster ns/demo"));

    // something else named kubectl-kv is kept unless --force
    let other = f.home.join("other");
    std::fs::create_dir_all(&other).expect("create other/");
    std::fs::write(other.join("kubectl-kv"), "#!/bin/sh\n").expect("write");
    let other_arg = other.to_str().expect("UTF-8 temp path");
    let out = f.kvctl(&["install-plugin", "--dir", other_arg]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("give --force"),
        "{}",
        text(&out.stderr)
    );
    let out = f
        .kvctl(&["install-plugin", "--dir", other_arg, "--force"])
        .await;
    assert_success(&out);
    assert!(std::fs::read_link(other.join("kubectl-kv")).is_ok());

    // kubectl itself finds the plugin on PATH and runs it
    let Some(kubectl) = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join("kubectl"))
        .find(|p| p.is_file())
    else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "kubectl is not installed (scripts/install-tools.sh installs it)"
        );
        eprintln!("skipped the kubectl part: kubectl is not on PATH");
        return;
    };
    let out = run_with_plugin(&f, &kubectl, &["kv", "status", "demo", "-o", "json"]).await;
    assert_success(&out);
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON output");
    assert_eq!(v["phase"], "Running");
    let out = run_with_plugin(&f, &kubectl, &["kv", "logs", "demo", "1"]).await;
    assert_success(&out);
    assert_eq!(text(&out.stdout), LOG_TEXT);
}
