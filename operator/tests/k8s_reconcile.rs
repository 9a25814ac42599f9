//! Reconcile scenarios against a mocked API server.
//!
//! Each scenario lists the exact API calls the controller must make, in order,
//! with the answer the API server gives; the mock fails the test on any other
//! call, on a call out of order, and on a call left unmade.

use std::sync::{Arc, Mutex};

use kv_testkit::kube_mock::{self, Call, Seen, call, echo, not_found};
use std::time::Duration;

use http::{Method, StatusCode};
use kube::runtime::controller::Action;
use kv_control::metrics::Metrics;
use kv_core::{NodeState, Topology};
use kv_operator::k8s::controller::NodeReports;
use kv_operator::k8s::crd::{AcceptedSpec, KvClusterStatus};
use kv_operator::k8s::{Context, KvCluster, objects, reconcile};
use serde::Deserialize;
use serde_json::{Value, json};

/// Run `reconcile` against a mock that expects exactly `calls`; return the
/// action and every request seen.
async fn run(kvc: KvCluster, calls: Vec<Call>) -> (Action, Vec<Seen>) {
    run_with(kvc, calls, None).await
}

/// Topologies pushed to the report server: (ordinal, topology), in order.
type Pushes = Arc<Mutex<Vec<(u32, Topology)>>>;

/// Serve node reports on loopback: `GET /<ordinal>/v1/cluster` answers a
/// [`kv_core::NodeReport`] at epoch E with `syncedEpoch` S and
/// `resyncProgress` P from `reports` (E, S, P), but only with the client
/// token of `secret()` ("token"). `PUT /<ordinal>/internal/v1/topology`
/// with the cluster token ("cluster") records the pushed topology; it does
/// not change what the node reports (a node's own install rules are tested
/// in kv-node).
async fn report_server(reports: Vec<(u64, u64, f64)>) -> NodeReports {
    report_server_recording(reports).await.0
}

async fn report_server_recording(reports: Vec<(u64, u64, f64)>) -> (NodeReports, Pushes) {
    report_server_digests(reports, None, vec![], vec![]).await
}

/// [`report_server_recording`], every node reporting `held` as the topology
/// it holds (when given).
async fn report_server_holding(
    reports: Vec<(u64, u64, f64)>,
    held: Option<Topology>,
    catching_up: Vec<u32>,
) -> (NodeReports, Pushes) {
    report_server_digests(reports, held, catching_up, vec![]).await
}

/// [`report_server_holding`], node `i` answering `GET /<i>/v1/digests`
/// with `digests[i]` (a `/v1/digests` body; 404 past the list).
async fn report_server_digests(
    reports: Vec<(u64, u64, f64)>,
    held: Option<Topology>,
    catching_up: Vec<u32>,
    digests: Vec<Value>,
) -> (NodeReports, Pushes) {
    use warp::Filter;
    let digests = warp::get()
        .and(warp::path!(u32 / "v1" / "digests"))
        .and(warp::header::<String>("authorization"))
        .map(
            move |ordinal: u32, auth: String| match digests.get(ordinal as usize) {
                Some(d) if auth == "Bearer token" => {
                    warp::reply::with_status(warp::reply::json(d), warp::http::StatusCode::OK)
                }
                _ => warp::reply::with_status(
                    warp::reply::json(&json!({"error": "no digests here"})),
                    warp::http::StatusCode::NOT_FOUND,
                ),
            },
        );
    let pushes: Pushes = Arc::default();
    let recorded = pushes.clone();
    let report = warp::get()
        .and(warp::path!(u32 / "v1" / "cluster"))
        .and(warp::header::<String>("authorization"))
        .map(move |ordinal: u32, auth: String| {
            let body = match reports.get(ordinal as usize) {
                Some((epoch, synced, progress)) if auth == "Bearer token" => {
                    let mut r = node_report(ordinal, *epoch, *synced, *progress);
                    if let Some(t) = &held {
                        r.topology = t.clone();
                    }
                    r.store_catching_up = catching_up.contains(&ordinal);
                    serde_json::to_value(r).expect("a report serialises")
                }
                _ => json!({"error": "forbidden"}),
            };
            warp::reply::json(&body)
        });
    let push = warp::put()
        .and(warp::path!(u32 / "internal" / "v1" / "topology"))
        .and(warp::header::<String>("authorization"))
        .and(warp::body::bytes())
        .map(move |ordinal: u32, auth: String, body: bytes::Bytes| {
            if auth != "Bearer cluster" {
                return warp::reply::with_status("forbidden", warp::http::StatusCode::FORBIDDEN);
            }
            let t = Topology::from_json(&body).expect("the pushed topology parses");
            recorded.lock().expect("pushes").push((ordinal, t));
            warp::reply::with_status("ok", warp::http::StatusCode::OK)
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(
        warp::serve(report.or(push).or(digests))
            .incoming(listener)
            .run(),
    );
    let links = NodeReports {
        http: reqwest::Client::new(),
        url: Box::new(move |_, ordinal| format!("http://{addr}/{ordinal}/v1/cluster")),
        topology_url: Box::new(move |_, ordinal| {
            format!("http://{addr}/{ordinal}/internal/v1/topology")
        }),
    };
    (links, pushes)
}

/// What node `ordinal` writes on `/v1/cluster`, as far as the controller reads it.
fn node_report(ordinal: u32, epoch: u64, synced: u64, progress: f64) -> kv_core::NodeReport {
    kv_core::NodeReport {
        node_id: ordinal,
        state: None,
        confirmed: true,
        topology: kv_core::Topology {
            cluster_id: "demo".into(),
            epoch,
            read_consistency: kv_core::Consistency::Quorum,
            write_consistency: kv_core::Consistency::Quorum,
            placement: kv_core::PlacementSpec {
                strategy: kv_core::Strategy::Full,
                factor: 1,
                members: vec![],
            },
            pending: None,
            nodes: vec![],
        },
        synced_epoch: synced,
        resync_progress: progress,
        store_catching_up: false,
        clock_skew_ms: 0,
        resync: Default::default(),
        hints_pending: 0,
        uptime_seconds: 0,
        tokens: Default::default(),
        on_gateway_port: false,
    }
}

/// Every call a scenario makes must be one the operator's ClusterRole
/// (deploy/rbac.yaml, what `kubectl apply` installs) allows; a real API
/// server refuses the others with 403 and the reconcile fails.
fn assert_allowed_by_rbac(method: &Method, path: &str) {
    let rbac = include_str!("../../deploy/rbac.yaml");
    // /api/v1/namespaces/ns/R[/name[/sub]] or /apis/G/V/namespaces/ns/R[...]
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", _, rest @ ..] => ("", rest),
        ["apis", g, _, rest @ ..] => (*g, rest),
        _ => panic!("unexpected API path {path}"),
    };
    // Discovery (/apis/G/V) is open to every authenticated user
    // (ClusterRole system:discovery), not granted by rbac.yaml.
    if rest.is_empty() && method == Method::GET {
        return;
    }
    let rest = match rest {
        ["namespaces", _, rest @ ..] => rest,
        rest => rest,
    };
    let (resource, named) = match rest {
        [r] => (r.to_string(), false),
        [r, _] => (r.to_string(), true),
        [r, _, sub] => (format!("{r}/{sub}"), true),
        _ => panic!("unexpected API path {path}"),
    };
    let verb = match (method.as_str(), named) {
        ("GET", true) => "get",
        ("GET", false) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", _) => "delete",
        (m, _) => panic!("unexpected method {m}"),
    };
    let allowed = serde_yaml::Deserializer::from_str(rbac).any(|doc| {
        let doc = Value::deserialize(doc).expect("rbac.yaml parses");
        doc["kind"] == "ClusterRole"
            && doc["rules"].as_array().is_some_and(|rules| {
                rules.iter().any(|r| {
                    let has = |field: &str, want: &str| {
                        r[field]
                            .as_array()
                            .is_some_and(|v| v.iter().any(|x| x == want))
                    };
                    has("apiGroups", group) && has("resources", &resource) && has("verbs", verb)
                })
            })
    });
    assert!(
        allowed,
        "{method} {path} needs verb {verb} on {resource} (group {group:?}), which deploy/rbac.yaml does not grant"
    );
}

async fn run_with(
    kvc: KvCluster,
    calls: Vec<Call>,
    reports: Option<NodeReports>,
) -> (Action, Vec<Seen>) {
    let (result, seen) = run_for_result(kvc, calls, reports).await;
    (result.expect("reconcile succeeded"), seen)
}

/// [`run_with`], returning what the reconcile returned (an error too).
async fn run_for_result(
    kvc: KvCluster,
    calls: Vec<Call>,
    reports: Option<NodeReports>,
) -> (Result<Action, kv_operator::k8s::Error>, Vec<Seen>) {
    run_ctx(kvc, calls, reports, false).await
}

/// [`run_for_result`], with PodMonitors made where they are served.
async fn run_ctx(
    kvc: KvCluster,
    calls: Vec<Call>,
    reports: Option<NodeReports>,
    pod_monitors: bool,
) -> (Result<Action, kv_operator::k8s::Error>, Vec<Seen>) {
    let (client, server) = kube_mock::client(calls, assert_allowed_by_rbac);
    let registry = prometheus::Registry::new();
    let mut ctx = Context::new(client, Metrics::new(&registry).expect("metrics"), reports);
    if pod_monitors {
        ctx = ctx.with_pod_monitors();
    }
    let ctx = Arc::new(ctx);
    let action = tokio::time::timeout(Duration::from_secs(5), reconcile(Arc::new(kvc), ctx))
        .await
        .expect("reconcile finished in time");
    (action, server.finish().await)
}

fn cluster(spec_yaml: &str) -> KvCluster {
    let mut kvc = KvCluster::new("demo", serde_yaml::from_str(spec_yaml).expect("spec"));
    kvc.metadata.namespace = Some("ns".into());
    kvc.metadata.uid = Some("uid-1".into());
    kvc.metadata.generation = Some(2);
    kvc
}

fn topology(kvc: &KvCluster, epoch: u64, states: &[NodeState]) -> Topology {
    Topology {
        cluster_id: "ns/demo".into(),
        epoch,
        read_consistency: kv_core::Consistency::Quorum,
        write_consistency: kv_core::Consistency::Quorum,
        placement: kvc.spec.desired().placement(),
        pending: None,
        nodes: states
            .iter()
            .enumerate()
            .map(|(i, s)| objects::node_info(kvc, i as u32, *s))
            .collect(),
    }
}

fn running_pod(ordinal: u32) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("demo-{ordinal}"), "namespace": "ns",
                     "creationTimestamp": "2026-01-01T00:00:00Z"},
        "status": {
            "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:10Z"}],
            "containerStatuses": [{"name": "kv-node", "ready": true, "started": true, "restartCount": 0,
                                   "image": "kvstore/kv-node", "imageID": "", "state": {"running": {}}}]
        }
    })
}

fn pod_list(items: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items})
}

fn secret() -> Value {
    json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "demo-auth", "namespace": "ns"},
           "data": {"token": "dG9rZW4="}})
}

fn cluster_secret() -> Value {
    json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "demo-cluster-auth", "namespace": "ns"},
           "data": {"cluster-token": "Y2x1c3Rlcg=="}})
}

/// The ConfigMap the operator would have written for `t`: its held list
/// names the ordinals of `kvc`'s failedNodes that `t` shows Failed (an
/// ordinal the operator did not hold down yet is not listed).
fn configmap(kvc: &KvCluster, t: &Topology) -> Value {
    let mut cm = objects::topology_configmap(kvc, t).expect("configmap");
    let held = kv_core::topology::format_held(
        kvc.desired()
            .failed_nodes
            .iter()
            .filter(|&&o| t.state_of(o) == Some(NodeState::Failed)),
    );
    if let Some(data) = cm.data.as_mut() {
        data.insert(objects::HELD_KEY.to_string(), held);
    }
    serde_json::to_value(cm).expect("json")
}

fn status_answer(kvc: KvCluster) -> impl FnOnce(&Value) -> (StatusCode, Value) {
    move |body: &Value| {
        let mut answer = serde_json::to_value(&kvc).expect("kvc");
        answer["status"] = body["status"].clone();
        (StatusCode::OK, answer)
    }
}

const NS: &str = "/api/v1/namespaces/ns";
const APPS: &str = "/apis/apps/v1/namespaces/ns";
const POLICY: &str = "/apis/policy/v1/namespaces/ns";
const NETWORKING: &str = "/apis/networking.k8s.io/v1/namespaces/ns";
const KVC: &str = "/apis/kvstore.dev/v1alpha1/namespaces/ns/kvclusters";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/ns/events";

/// The calls of one reconcile, built from the parts most scenarios share;
/// a scenario adds its own with [`Script::then`].
struct Script(Vec<Call>);

impl Script {
    /// The reads every reconcile starts with: the topology ConfigMap
    /// holding `current`, the StatefulSet (`sts`; absent when `None`), the
    /// pods `pods`, both token Secrets.
    fn observe(
        kvc: &KvCluster,
        current: &Topology,
        sts: Option<Value>,
        pods: Vec<Value>,
    ) -> Script {
        let cm = configmap(kvc, current);
        let pods = pod_list(pods);
        Script(vec![
            call(
                Method::GET,
                &format!("{NS}/configmaps/demo-topology"),
                move |_| (StatusCode::OK, cm),
            ),
            call(
                Method::GET,
                &format!("{APPS}/statefulsets/demo"),
                move |_| match sts {
                    Some(sts) => (StatusCode::OK, sts),
                    None => not_found(),
                },
            ),
            call(Method::GET, &format!("{NS}/pods"), move |_| {
                (StatusCode::OK, pods)
            }),
            call(Method::GET, &format!("{NS}/secrets/demo-auth"), |_| {
                (StatusCode::OK, secret())
            }),
            call(
                Method::GET,
                &format!("{NS}/secrets/demo-cluster-auth"),
                |_| (StatusCode::OK, cluster_secret()),
            ),
        ])
    }

    /// The ConfigMap, both Services, the StatefulSet, the budget and the
    /// NetworkPolicy, applied.
    fn apply_objects(self) -> Script {
        self.then(vec![
            call(Method::PUT, &format!("{NS}/configmaps/demo-topology"), echo),
            call(Method::PATCH, &format!("{NS}/services/demo-peers"), echo),
            call(Method::PATCH, &format!("{NS}/services/demo"), echo),
            call(Method::PATCH, &format!("{APPS}/statefulsets/demo"), echo),
            call(
                Method::PATCH,
                &format!("{POLICY}/poddisruptionbudgets/demo"),
                echo,
            ),
            call(
                Method::PATCH,
                &format!("{NETWORKING}/networkpolicies/demo"),
                echo,
            ),
        ])
    }

    /// The status written, answered as the API server would.
    fn status(self, kvc: &KvCluster) -> Script {
        let patch = call(
            Method::PATCH,
            &format!("{KVC}/demo/status"),
            status_answer(kvc.clone()),
        );
        self.then(vec![patch])
    }

    fn then(mut self, calls: Vec<Call>) -> Script {
        self.0.extend(calls);
        self
    }

    fn calls(self) -> Vec<Call> {
        self.0
    }
}

/// A StatefulSet as the API server answers it (made at a fixed time).
fn live_statefulset() -> Value {
    json!({"apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": "demo", "namespace": "ns", "creationTimestamp": "2026-01-01T00:00:00Z"}})
}

fn topology_in(seen: &Seen) -> Topology {
    let json = seen.body["data"]["topology.json"]
        .as_str()
        .expect("topology.json in the ConfigMap");
    Topology::from_json(json.as_bytes()).expect("valid topology")
}

#[tokio::test]
async fn a_new_cluster_gets_its_two_secrets_and_owned_objects_applied_and_a_creating_status() {
    let kvc = cluster("{}");
    let (action, seen) = run(
        kvc.clone(),
        vec![
            call(
                Method::GET,
                &format!("{NS}/configmaps/demo-topology"),
                |_| not_found(),
            ),
            call(Method::GET, &format!("{APPS}/statefulsets/demo"), |_| {
                not_found()
            }),
            call(Method::GET, &format!("{NS}/pods"), |_| {
                (StatusCode::OK, pod_list(vec![]))
            }),
            call(Method::GET, &format!("{NS}/secrets/demo-auth"), |_| {
                not_found()
            }),
            call(
                Method::GET,
                &format!("{NS}/secrets/demo-cluster-auth"),
                |_| not_found(),
            ),
            call(Method::POST, &format!("{NS}/secrets"), echo),
            call(Method::POST, &format!("{NS}/secrets"), echo),
            call(Method::POST, &format!("{NS}/configmaps"), echo),
            call(Method::PATCH, &format!("{NS}/services/demo-peers"), echo),
            call(Method::PATCH, &format!("{NS}/services/demo"), echo),
            call(Method::PATCH, &format!("{APPS}/statefulsets/demo"), echo),
            call(
                Method::PATCH,
                &format!("{POLICY}/poddisruptionbudgets/demo"),
                echo,
            ),
            call(
                Method::PATCH,
                &format!("{NETWORKING}/networkpolicies/demo"),
                echo,
            ),
            call(
                Method::PATCH,
                &format!("{KVC}/demo/status"),
                status_answer(kvc.clone()),
            ),
        ],
    )
    .await;
    assert_eq!(action, Action::requeue(Duration::from_secs(5)));

    // Each token in a Secret of its own: a reader of one cannot get the other.
    let (client, cluster) = (&seen[5].body, &seen[6].body);
    assert_eq!(client["metadata"]["name"], "demo-auth");
    assert_eq!(cluster["metadata"]["name"], "demo-cluster-auth");
    let keys = |s: &Value| {
        s["data"]
            .as_object()
            .map(|d| d.keys().cloned().collect::<Vec<_>>())
    };
    assert_eq!(keys(client), Some(vec!["token".to_string()]), "{client}");
    assert_eq!(
        keys(cluster),
        Some(vec!["cluster-token".to_string()]),
        "{cluster}"
    );
    let token = client["data"]["token"].as_str().expect("token");
    let cluster_token = cluster["data"]["cluster-token"]
        .as_str()
        .expect("cluster-token");
    assert!(
        token.len() >= 64 && token != cluster_token,
        "two distinct random tokens"
    );

    assert!(
        seen[7].query.is_empty() || !seen[7].query.contains("force"),
        "the topology ConfigMap is created, not applied over whatever is there: {}",
        seen[7].query
    );
    for applied in &seen[8..=13] {
        assert!(
            applied.query.contains("fieldManager=kv-operator")
                && applied.query.contains("force=true"),
            "server-side apply as kv-operator: {}?{}",
            applied.path,
            applied.query
        );
    }
    let t = topology_in(&seen[7]);
    assert_eq!(t.epoch, 1);
    assert_eq!(
        t.cluster_id, "uid-1",
        "a new cluster is named by its KvCluster's UID"
    );
    assert_eq!(t.placement.members, [0, 1, 2]);
    assert!(t.nodes.iter().all(|n| n.state == NodeState::Up));
    assert_eq!(seen[10].body["spec"]["replicas"], 3);
    assert_eq!(seen[11].body["spec"]["maxUnavailable"], 1);
    assert_eq!(
        seen[12].body,
        serde_json::to_value(objects::network_policy(&kvc, None).expect("on by default"))
            .expect("json"),
        "the NetworkPolicy as built, for an operator of unknown namespace"
    );

    let status = &seen[13].body["status"];
    assert_eq!(status["phase"], "Creating");
    assert_eq!(status["observedGeneration"], 2);
    assert_eq!(status["topologyEpoch"], 1);
    let conditions = status["conditions"].as_array().expect("conditions");
    let types: Vec<&str> = conditions
        .iter()
        .filter_map(|c| c["type"].as_str())
        .collect();
    assert_eq!(types, ["Available", "Degraded", "Progressing"]);
    assert!(conditions.iter().all(|c| c["observedGeneration"] == 2));
    let pods: Vec<&str> = status["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter_map(|n| n["pod"].as_str())
        .collect();
    assert_eq!(
        pods,
        ["demo-0", "demo-1", "demo-2"],
        "pod names before the pods exist"
    );
    assert_eq!(conditions[0]["status"], "False", "no pod is Ready yet");
}

#[tokio::test]
async fn an_ordinal_added_to_failed_nodes_deletes_that_pod_and_raises_the_topology_epoch() {
    let kvc = cluster("{faultInjection: {failedNodes: [1]}}");
    let current = topology(&kvc, 3, &[NodeState::Up, NodeState::Up, NodeState::Up]);
    let (_, seen) = run(
        kvc.clone(),
        Script::observe(&kvc, &current, None, (0..3).map(running_pod).collect())
            .apply_objects()
            .then(vec![
                call(Method::DELETE, &format!("{NS}/pods/demo-1"), |_| {
                    (StatusCode::OK, running_pod(1))
                }),
                call(Method::POST, EVENTS, echo),
                call(Method::POST, EVENTS, echo),
            ])
            .status(&kvc)
            .calls(),
    )
    .await;
    let t = topology_in(&seen[5]);
    assert_eq!(t.epoch, 4, "the epoch is raised");
    assert_eq!(t.state_of(1), Some(NodeState::Failed));
    assert_eq!(t.state_of(0), Some(NodeState::Up));
    assert_eq!(seen[12].body["reason"], "FaultInjected");
    assert_eq!(seen[13].body["reason"], "NodeFailed");
    assert_eq!(seen[13].body["type"], "Warning");
    let status = &seen[14].body["status"];
    assert_eq!(status["phase"], "Degraded");
    assert_eq!(status["topologyEpoch"], 4);
    assert_eq!(status["nodes"][1]["state"], "Failed");
    assert_eq!(status["nodes"][1]["pod"], "demo-1");
}

#[tokio::test]
async fn a_node_already_held_down_is_not_deleted_again() {
    let kvc = cluster("{faultInjection: {failedNodes: [1]}}");
    let current = topology(&kvc, 4, &[NodeState::Up, NodeState::Failed, NodeState::Up]);
    let (_, seen) = run(
        kvc.clone(),
        Script::observe(&kvc, &current, None, (0..3).map(running_pod).collect())
            .apply_objects()
            .status(&kvc)
            .calls(),
    )
    .await;
    assert_eq!(
        topology_in(&seen[5]).epoch,
        4,
        "nothing changed, the epoch stays"
    );
}

fn claim(ordinal: u32, requested: &str, capacity: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
           "metadata": {"name": format!("data-demo-{ordinal}"), "namespace": "ns"},
           "spec": {"storageClassName": "fast", "resources": {"requests": {"storage": requested}}},
           "status": {"phase": "Bound", "capacity": {"storage": capacity}}})
}

/// One reconcile of a settled 3-node cluster whose spec asks for 2Gi while
/// its StatefulSet's claim template says 1Gi; the class `fast` allows
/// expansion or not. Returns what the controller sent.
async fn resize(class_allows: bool) -> Vec<Seen> {
    let kvc = cluster("{storage: {size: 2Gi, storageClassName: fast}}");
    let current = topology(&kvc, 4, &[NodeState::Up, NodeState::Up, NodeState::Up]);
    let cm = configmap(&kvc, &current);
    let mut live = serde_json::to_value(objects::statefulset(
        &cluster("{storage: {storageClassName: fast}}"),
        3,
    ))
    .expect("sts");
    live["metadata"]["resourceVersion"] = "7".into();
    let (_, seen) = run(
        kvc.clone(),
        vec![
            call(
                Method::GET,
                &format!("{NS}/configmaps/demo-topology"),
                move |_| (StatusCode::OK, cm),
            ),
            call(Method::GET, &format!("{APPS}/statefulsets/demo"), move |_| {
                (StatusCode::OK, live)
            }),
            call(Method::GET, &format!("{NS}/pods"), |_| {
                (StatusCode::OK, pod_list((0..3).map(running_pod).collect()))
            }),
            call(Method::GET, &format!("{NS}/secrets/demo-auth"), |_| {
                (StatusCode::OK, secret())
            }),
            call(
                Method::GET,
                &format!("{NS}/secrets/demo-cluster-auth"),
                |_| (StatusCode::OK, cluster_secret()),
            ),
            call(Method::PUT, &format!("{NS}/configmaps/demo-topology"), echo),
            call(Method::PATCH, &format!("{NS}/services/demo-peers"), echo),
            call(Method::PATCH, &format!("{NS}/services/demo"), echo),
            call(Method::PATCH, &format!("{APPS}/statefulsets/demo"), echo),
            call(Method::GET, &format!("{NS}/persistentvolumeclaims"), |_| {
                (
                    StatusCode::OK,
                    json!({"apiVersion": "v1", "kind": "PersistentVolumeClaimList", "metadata": {},
                           "items": [claim(0, "1Gi", "1Gi"), claim(1, "1Gi", "1Gi"), claim(2, "2Gi", "1Gi")]}),
                )
            }),
            call(
                Method::GET,
                "/apis/storage.k8s.io/v1/storageclasses/fast",
                move |_| {
                    (
                        StatusCode::OK,
                        json!({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
                               "metadata": {"name": "fast"}, "provisioner": "example.com/fast",
                               "allowVolumeExpansion": class_allows}),
                    )
                },
            ),
        ]
        .into_iter()
        .chain((0..2).filter(|_| class_allows).map(|o| {
            call(
                Method::PATCH,
                &format!("{NS}/persistentvolumeclaims/data-demo-{o}"),
                echo,
            )
        }))
        .chain([
            call(
                Method::PATCH,
                &format!("{POLICY}/poddisruptionbudgets/demo"),
                echo,
            ),
            call(
                Method::PATCH,
                &format!("{NETWORKING}/networkpolicies/demo"),
                echo,
            ),
            call(
                Method::PATCH,
                &format!("{KVC}/demo/status"),
                status_answer(kvc.clone()),
            ),
        ])
        .collect(),
    )
    .await;
    let sts = seen
        .iter()
        .find(|s| s.path.ends_with("/statefulsets/demo") && !s.body.is_null())
        .expect("the StatefulSet was applied");
    assert_eq!(
        sts.body["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"],
        "1Gi",
        "the claim template keeps its size: the API server refuses a change to it"
    );
    seen
}

fn volumes_condition(seen: &[Seen]) -> Value {
    let status = &seen.last().expect("calls").body["status"];
    status["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == "VolumesResized"))
        .cloned()
        .expect("a VolumesResized condition")
}

#[tokio::test]
async fn a_larger_size_resizes_each_claim_below_it_and_waits_for_the_capacity() {
    let seen = resize(true).await;
    let patched: Vec<(&str, &Value)> = seen
        .iter()
        .filter(|s| s.path.contains("/persistentvolumeclaims/"))
        .map(|s| {
            (
                s.path.as_str(),
                &s.body["spec"]["resources"]["requests"]["storage"],
            )
        })
        .collect();
    assert_eq!(
        patched,
        [
            (
                "/api/v1/namespaces/ns/persistentvolumeclaims/data-demo-0",
                &json!("2Gi")
            ),
            (
                "/api/v1/namespaces/ns/persistentvolumeclaims/data-demo-1",
                &json!("2Gi")
            ),
        ],
        "data-demo-2 already asks for 2Gi"
    );
    let c = volumes_condition(&seen);
    assert_eq!(
        (&c["status"], &c["reason"]),
        (&json!("False"), &json!("Resizing"))
    );
    assert!(
        c["message"]
            .as_str()
            .is_some_and(|m| m.contains("data-demo-2 has 1Gi")),
        "{c}"
    );
}

#[tokio::test]
async fn a_class_that_does_not_allow_expansion_changes_no_claim_and_says_so() {
    let seen = resize(false).await;
    assert!(
        !seen
            .iter()
            .any(|s| s.path.contains("/persistentvolumeclaims/")),
        "no claim patched"
    );
    let c = volumes_condition(&seen);
    assert_eq!(
        (&c["status"], &c["reason"]),
        (&json!("False"), &json!("ExpansionNotSupported"))
    );
    assert!(
        c["message"]
            .as_str()
            .is_some_and(|m| m.contains("storage class fast does not allow volume expansion")),
        "{c}"
    );
}

/// One reconcile of a settled 3-node cluster with PodMonitors on: the
/// discovery answer (`served`) decides whether the cluster's PodMonitor is
/// applied (or, with `spec`'s podMonitor false, deleted).
async fn with_monitoring(spec: &str, served: bool, monitor_call: Option<Method>) -> Vec<Seen> {
    let kvc = cluster(spec);
    let current = topology(&kvc, 4, &[NodeState::Up, NodeState::Up, NodeState::Up]);
    let cm = configmap(&kvc, &current);
    let mut calls = vec![
        call(
            Method::GET,
            &format!("{NS}/configmaps/demo-topology"),
            move |_| (StatusCode::OK, cm),
        ),
        call(Method::GET, &format!("{APPS}/statefulsets/demo"), |_| {
            not_found()
        }),
        call(Method::GET, &format!("{NS}/pods"), |_| {
            (StatusCode::OK, pod_list((0..3).map(running_pod).collect()))
        }),
        call(Method::GET, &format!("{NS}/secrets/demo-auth"), |_| {
            (StatusCode::OK, secret())
        }),
        call(
            Method::GET,
            &format!("{NS}/secrets/demo-cluster-auth"),
            |_| (StatusCode::OK, cluster_secret()),
        ),
        call(Method::PUT, &format!("{NS}/configmaps/demo-topology"), echo),
        call(Method::PATCH, &format!("{NS}/services/demo-peers"), echo),
        call(Method::PATCH, &format!("{NS}/services/demo"), echo),
        call(Method::PATCH, &format!("{APPS}/statefulsets/demo"), echo),
        call(
            Method::PATCH,
            &format!("{POLICY}/poddisruptionbudgets/demo"),
            echo,
        ),
        call(
            Method::PATCH,
            &format!("{NETWORKING}/networkpolicies/demo"),
            echo,
        ),
        call(Method::GET, "/apis/monitoring.coreos.com/v1", move |_| {
            if served {
                (
                    StatusCode::OK,
                    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "monitoring.coreos.com/v1",
                           "resources": [{"name": "podmonitors", "singularName": "podmonitor", "namespaced": true,
                                          "kind": "PodMonitor", "verbs": ["create", "delete", "get", "list", "patch"]}]}),
                )
            } else {
                not_found()
            }
        }),
    ];
    if let Some(method) = monitor_call {
        calls.push(call(
            method,
            "/apis/monitoring.coreos.com/v1/namespaces/ns/podmonitors/demo",
            echo,
        ));
    }
    calls.push(call(
        Method::PATCH,
        &format!("{KVC}/demo/status"),
        status_answer(kvc.clone()),
    ));
    let (result, seen) = run_ctx(kvc, calls, None, true).await;
    result.expect("reconcile succeeded");
    seen
}

#[tokio::test]
async fn a_pod_monitor_per_cluster_is_applied_where_the_prometheus_operator_is_installed() {
    let seen = with_monitoring(
        "{monitoring: {labels: {release: prom}, interval: 15s}}",
        true,
        Some(Method::PATCH),
    )
    .await;
    let pm = &seen[seen.len() - 2];
    assert!(
        pm.query.contains("fieldManager=kv-operator"),
        "{}",
        pm.query
    );
    assert_eq!(pm.body["kind"], "PodMonitor");
    assert_eq!(pm.body["metadata"]["labels"]["release"], "prom");
    assert_eq!(
        pm.body["metadata"]["ownerReferences"][0]["kind"],
        "KvCluster"
    );
    assert_eq!(
        pm.body["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"],
        "demo"
    );
    let endpoint = &pm.body["spec"]["podMetricsEndpoints"][0];
    assert_eq!(endpoint["port"], "client");
    assert_eq!(endpoint["path"], "/metrics");
    assert_eq!(endpoint["interval"], "15s");
    assert_eq!(endpoint["relabelings"][0]["targetLabel"], "kvcluster");
    assert!(
        endpoint.get("scheme").is_none(),
        "plaintext without spec.tls"
    );
}

#[tokio::test]
async fn no_pod_monitor_is_made_without_the_prometheus_operator_and_one_turned_off_is_deleted() {
    let seen = with_monitoring("{}", false, None).await;
    assert!(!seen.iter().any(|s| s.path.contains("podmonitors")));
    with_monitoring(
        "{monitoring: {podMonitor: false}}",
        true,
        Some(Method::DELETE),
    )
    .await;
}

#[tokio::test]
async fn a_cluster_whose_one_secret_held_both_tokens_gets_its_cluster_token_in_a_secret_of_its_own()
{
    // `demo-auth` as operators before the split made it: both keys. Its
    // running nodes know only that cluster token, so it is kept.
    let kvc = cluster("{}");
    let current = topology(&kvc, 4, &[NodeState::Up, NodeState::Up, NodeState::Up]);
    let cm = configmap(&kvc, &current);
    let both = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "demo-auth", "namespace": "ns"},
                      "data": {"token": "dG9rZW4=", "cluster-token": "Y2x1c3Rlcg=="}});
    let (_, seen) = run(
        kvc.clone(),
        vec![
            call(
                Method::GET,
                &format!("{NS}/configmaps/demo-topology"),
                move |_| (StatusCode::OK, cm),
            ),
            call(Method::GET, &format!("{APPS}/statefulsets/demo"), |_| {
                not_found()
            }),
            call(Method::GET, &format!("{NS}/pods"), |_| {
                (StatusCode::OK, pod_list((0..3).map(running_pod).collect()))
            }),
            call(Method::GET, &format!("{NS}/secrets/demo-auth"), move |_| {
                (StatusCode::OK, both)
            }),
            call(
                Method::GET,
                &format!("{NS}/secrets/demo-cluster-auth"),
                |_| not_found(),
            ),
            call(Method::POST, &format!("{NS}/secrets"), echo),
            call(Method::PUT, &format!("{NS}/configmaps/demo-topology"), echo),
            call(Method::PATCH, &format!("{NS}/services/demo-peers"), echo),
            call(Method::PATCH, &format!("{NS}/services/demo"), echo),
            call(Method::PATCH, &format!("{APPS}/statefulsets/demo"), echo),
            call(
                Method::PATCH,
                &format!("{POLICY}/poddisruptionbudgets/demo"),
                echo,
            ),
            call(
                Method::PATCH,
                &format!("{NETWORKING}/networkpolicies/demo"),
                echo,
            ),
            call(
                Method::PATCH,
                &format!("{KVC}/demo/status"),
                status_answer(kvc.clone()),
            ),
        ],
    )
    .await;
    let created = &seen[5].body;
    assert_eq!(created["metadata"]["name"], "demo-cluster-auth");
    assert_eq!(
        created["data"],
        json!({"cluster-token": "Y2x1c3Rlcg=="}),
        "the cluster token the nodes hold, and nothing else"
    );
    // The pods mount each token from its own Secret, one key each.
    let volumes = &seen[9].body["spec"]["template"]["spec"]["volumes"];
    let secret_of = |name: &str| {
        volumes
            .as_array()
            .and_then(|v| v.iter().find(|v| v["name"] == name))
            .map(|v| {
                (
                    v["secret"]["secretName"].clone(),
                    v["secret"]["items"].clone(),
                )
            })
    };
    assert_eq!(
        secret_of("secret"),
        Some((
            json!("demo-auth"),
            json!([{"key": "token", "path": "token"}])
        ))
    );
    assert_eq!(
        secret_of("cluster-secret"),
        Some((
            json!("demo-cluster-auth"),
            json!([{"key": "cluster-token", "path": "cluster-token"}])
        ))
    );
}

#[tokio::test]
async fn an_invalid_spec_gets_a_condition_and_an_event_and_nothing_is_applied() {
    // replicas 2 with factor 3: the schema refuses this, but a CRD installed
    // without the schema would let it through.
    let kvc = cluster("{replicas: 2, replication: {factor: 3}}");
    let (action, seen) = run(
        kvc.clone(),
        vec![
            call(Method::POST, EVENTS, echo),
            call(
                Method::PATCH,
                &format!("{KVC}/demo/status"),
                status_answer(kvc.clone()),
            ),
        ],
    )
    .await;
    assert_eq!(action, Action::await_change(), "no hot-loop retry");
    assert_eq!(seen[0].body["reason"], "InvalidSpec");
    let status = &seen[1].body["status"];
    assert_eq!(status["phase"], "Failed");
    assert_eq!(status["observedGeneration"], 2);
    let progressing = &status["conditions"][0];
    assert_eq!(progressing["type"], "Progressing");
    assert_eq!(progressing["status"], "False");
    assert_eq!(progressing["reason"], "InvalidSpec");
    assert!(
        progressing["message"]
            .as_str()
            .is_some_and(|m| m.contains("exceeds replicas"))
    );
}

/// The status is applied over the KvCluster version it was computed from; a
/// write that lost to a newer one (409) is a conflict, retried at once from
/// the new object, not a failure that backs off (issue 17 item 2).
#[tokio::test]
async fn the_status_is_applied_over_the_version_read_and_a_409_is_a_conflict() {
    let mut kvc = cluster("{replicas: 2, replication: {factor: 3}}");
    kvc.metadata.resource_version = Some("41".into());
    let (result, seen) = run_for_result(
        kvc.clone(),
        vec![
            call(Method::POST, EVENTS, echo),
            call(Method::PATCH, &format!("{KVC}/demo/status"), |_| {
                (
                    StatusCode::CONFLICT,
                    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                           "message": "the object has been modified", "reason": "Conflict", "code": 409}),
                )
            }),
        ],
        None,
    )
    .await;
    assert_eq!(
        seen[1].body["metadata"]["resourceVersion"], "41",
        "the apply carries the version read as its precondition"
    );
    assert_eq!(seen[1].body["status"]["phase"], "Failed");
    let err = result.expect_err("the write was refused");
    assert!(err.is_conflict(), "{err}");
    assert_eq!(err.metric_label(), "conflict");
}

#[tokio::test]
async fn scaling_up_starts_the_new_pods_first_and_rebalances_once_they_answer() {
    let kvc = cluster("{replicas: 5}");
    let three = cluster("{replicas: 3}");
    let current = topology(&three, 7, &[NodeState::Up, NodeState::Up, NodeState::Up]);
    // Pods 3 and 4 do not exist yet: an owner that is not there would fail
    // the pending quorum of every write to its keys.
    let reports = report_server(vec![(7, 7, 1.0); 3]).await;
    let (_, seen) = run_with(
        kvc.clone(),
        reconcile_calls(&kvc, &current, 3, false),
        Some(reports),
    )
    .await;
    assert_eq!(topology_in(&seen[5]), current, "no placement change yet");
    assert_eq!(seen[8].body["spec"]["replicas"], 5);
    assert_eq!(seen[11].body["status"]["phase"], "Rebalancing");

    // Both answer (as non-members): the rebalance starts.
    let reports = report_server(vec![(7, 7, 1.0); 5]).await;
    let (_, seen) = run_with(
        kvc.clone(),
        reconcile_calls(&kvc, &current, 5, true),
        Some(reports),
    )
    .await;
    let t = topology_in(&seen[5]);
    assert_eq!(t.epoch, 8);
    assert_eq!(
        t.placement.members,
        [0, 1, 2],
        "reads stay on the old owners"
    );
    assert_eq!(t.pending.map(|p| p.members), Some(vec![0, 1, 2, 3, 4]));
    assert_eq!(t.nodes[3].state, NodeState::Joining);
    assert_eq!(seen[8].body["spec"]["replicas"], 5);
    assert_eq!(seen[11].body["reason"], "RebalanceStarted");
    assert_eq!(seen[12].body["status"]["phase"], "Rebalancing");
}

#[tokio::test]
async fn factor_one_removes_the_disruption_budget_and_warns_with_a_degraded_condition() {
    let kvc = cluster("{replicas: 1, replication: {factor: 1}}");
    let (_, seen) = run(
        kvc.clone(),
        vec![
            call(
                Method::GET,
                &format!("{NS}/configmaps/demo-topology"),
                |_| not_found(),
            ),
            call(Method::GET, &format!("{APPS}/statefulsets/demo"), |_| {
                not_found()
            }),
            call(Method::GET, &format!("{NS}/pods"), |_| {
                (StatusCode::OK, pod_list(vec![running_pod(0)]))
            }),
            call(Method::GET, &format!("{NS}/secrets/demo-auth"), |_| {
                (StatusCode::OK, secret())
            }),
            call(
                Method::GET,
                &format!("{NS}/secrets/demo-cluster-auth"),
                |_| (StatusCode::OK, cluster_secret()),
            ),
            call(Method::POST, &format!("{NS}/configmaps"), echo),
            call(Method::PATCH, &format!("{NS}/services/demo-peers"), echo),
            call(Method::PATCH, &format!("{NS}/services/demo"), echo),
            call(Method::PATCH, &format!("{APPS}/statefulsets/demo"), echo),
            call(
                Method::DELETE,
                &format!("{POLICY}/poddisruptionbudgets/demo"),
                |_| not_found(),
            ),
            call(
                Method::PATCH,
                &format!("{NETWORKING}/networkpolicies/demo"),
                echo,
            ),
            call(
                Method::PATCH,
                &format!("{KVC}/demo/status"),
                status_answer(kvc.clone()),
            ),
        ],
    )
    .await;
    let conditions = seen[11].body["status"]["conditions"]
        .as_array()
        .expect("conditions")
        .clone();
    let degraded = conditions
        .iter()
        .find(|c| c["type"] == "Degraded")
        .expect("Degraded");
    assert_eq!(degraded["status"], "True");
    assert_eq!(degraded["reason"], "NoDisruptionBudget");
    let available = conditions
        .iter()
        .find(|c| c["type"] == "Available")
        .expect("Available");
    assert_eq!(available["status"], "True", "its only node is Up and Ready");
}

#[tokio::test]
async fn network_policy_enabled_false_deletes_the_policy_the_operator_made() {
    let kvc = cluster("{networkPolicy: {enabled: false}}");
    let (_, seen) = run(
        kvc.clone(),
        vec![
            call(
                Method::GET,
                &format!("{NS}/configmaps/demo-topology"),
                |_| not_found(),
            ),
            call(Method::GET, &format!("{APPS}/statefulsets/demo"), |_| {
                not_found()
            }),
            call(Method::GET, &format!("{NS}/pods"), |_| {
                (StatusCode::OK, pod_list(vec![]))
            }),
            call(Method::GET, &format!("{NS}/secrets/demo-auth"), |_| {
                (StatusCode::OK, secret())
            }),
            call(Method::GET, &format!("{NS}/secrets/demo-cluster-auth"), |_| {
                (StatusCode::OK, cluster_secret())
            }),
            call(Method::POST, &format!("{NS}/configmaps"), echo),
            call(Method::PATCH, &format!("{NS}/services/demo-peers"), echo),
            call(Method::PATCH, &format!("{NS}/services/demo"), echo),
            call(Method::PATCH, &format!("{APPS}/statefulsets/demo"), echo),
            call(
                Method::PATCH,
                &format!("{POLICY}/poddisruptionbudgets/demo"),
                echo,
            ),
            call(
                Method::DELETE,
                &format!("{NETWORKING}/networkpolicies/demo"),
                |_| {
                    (
                        StatusCode::OK,
                        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}),
                    )
                },
            ),
            write_status(&kvc),
        ],
    )
    .await;
    assert_eq!(seen[10].path, format!("{NETWORKING}/networkpolicies/demo"));
}

#[tokio::test]
async fn a_disabled_network_policy_already_gone_is_not_an_error() {
    let kvc = cluster("{networkPolicy: {enabled: false}}");
    let current = topology(&kvc, 1, &[NodeState::Up, NodeState::Up, NodeState::Up]);
    let mut calls = reconcile_calls(&kvc, &current, 3, false);
    let np = calls
        .iter()
        .position(|c| c.path.ends_with("/networkpolicies/demo"))
        .expect("the NetworkPolicy call");
    calls[np] = call(
        Method::DELETE,
        &format!("{NETWORKING}/networkpolicies/demo"),
        |_| not_found(),
    );
    run(kvc, calls).await;
}

#[tokio::test]
async fn an_ordinal_removed_from_failed_nodes_whose_pod_is_back_starts_recovering() {
    let kvc = cluster("{}");
    let current = topology(&kvc, 4, &[NodeState::Up, NodeState::Failed, NodeState::Up]);
    let (_, seen) = run(
        kvc.clone(),
        Script::observe(&kvc, &current, None, (0..3).map(running_pod).collect())
            .apply_objects()
            .then(vec![call(Method::POST, EVENTS, echo)])
            .status(&kvc)
            .calls(),
    )
    .await;
    let t = topology_in(&seen[5]);
    assert_eq!(t.epoch, 5);
    assert_eq!(
        t.state_of(1),
        Some(NodeState::Recovering),
        "not Up before its catch-up is reported done"
    );
    assert_eq!(seen[11].body["reason"], "NodeRecovering");
    let status = &seen[12].body["status"];
    assert_eq!(status["nodes"][1]["state"], "Recovering");
    let progressing = status["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Progressing"))
        .expect("Progressing");
    assert_eq!(progressing["reason"], "CatchingUp");
}

#[tokio::test]
async fn a_recovering_node_whose_report_shows_its_catch_up_done_becomes_up() {
    let kvc = cluster("{}");
    let current = topology(
        &kvc,
        5,
        &[NodeState::Up, NodeState::Recovering, NodeState::Up],
    );
    let cm = configmap(&kvc, &current);
    let reports = report_server(vec![(5, 5, 1.0), (5, 5, 1.0), (5, 5, 1.0)]).await;
    let (action, seen) = run_with(
        kvc.clone(),
        vec![
            call(
                Method::GET,
                &format!("{NS}/configmaps/demo-topology"),
                move |_| (StatusCode::OK, cm),
            ),
            call(Method::GET, &format!("{APPS}/statefulsets/demo"), |_| {
                not_found()
            }),
            call(Method::GET, &format!("{NS}/pods"), |_| {
                (StatusCode::OK, pod_list((0..3).map(running_pod).collect()))
            }),
            call(Method::GET, &format!("{NS}/secrets/demo-auth"), |_| {
                (StatusCode::OK, secret())
            }),
            call(
                Method::GET,
                &format!("{NS}/secrets/demo-cluster-auth"),
                |_| (StatusCode::OK, cluster_secret()),
            ),
            call(Method::PUT, &format!("{NS}/configmaps/demo-topology"), echo),
            call(Method::PATCH, &format!("{NS}/services/demo-peers"), echo),
            call(Method::PATCH, &format!("{NS}/services/demo"), echo),
            call(Method::PATCH, &format!("{APPS}/statefulsets/demo"), echo),
            call(
                Method::PATCH,
                &format!("{POLICY}/poddisruptionbudgets/demo"),
                echo,
            ),
            call(
                Method::PATCH,
                &format!("{NETWORKING}/networkpolicies/demo"),
                echo,
            ),
            call(Method::POST, EVENTS, echo),
            call(
                Method::PATCH,
                &format!("{KVC}/demo/status"),
                status_answer(kvc.clone()),
            ),
        ],
        Some(reports),
    )
    .await;
    let t = topology_in(&seen[5]);
    assert_eq!(t.epoch, 6);
    assert_eq!(t.state_of(1), Some(NodeState::Up));
    assert_eq!(seen[11].body["reason"], "NodeRecovered");
    assert_eq!(seen[12].body["status"]["phase"], "Running");
    assert_eq!(
        action,
        Action::requeue(Duration::from_secs(5)),
        "a topology was just pushed: the controller looks soon whether every node has it"
    );
    let reports = report_server(vec![(6, 6, 1.0); 3]).await;
    let (action, _) = run_with(
        kvc.clone(),
        reconcile_calls(&kvc, &t, 3, false),
        Some(reports),
    )
    .await;
    assert_eq!(
        action,
        Action::requeue(Duration::from_secs(60)),
        "a settled cluster is looked at less often"
    );
}

#[tokio::test]
async fn a_node_still_catching_up_stays_recovering_with_its_progress_in_the_status() {
    let kvc = cluster("{}");
    let current = topology(
        &kvc,
        5,
        &[NodeState::Up, NodeState::Recovering, NodeState::Up],
    );
    let cm = configmap(&kvc, &current);
    let reports = report_server(vec![(5, 5, 1.0), (5, 4, 0.25), (5, 5, 1.0)]).await;
    let (_, seen) = run_with(
        kvc.clone(),
        vec![
            call(
                Method::GET,
                &format!("{NS}/configmaps/demo-topology"),
                move |_| (StatusCode::OK, cm),
            ),
            call(Method::GET, &format!("{APPS}/statefulsets/demo"), |_| {
                not_found()
            }),
            call(Method::GET, &format!("{NS}/pods"), |_| {
                (StatusCode::OK, pod_list((0..3).map(running_pod).collect()))
            }),
            call(Method::GET, &format!("{NS}/secrets/demo-auth"), |_| {
                (StatusCode::OK, secret())
            }),
            call(
                Method::GET,
                &format!("{NS}/secrets/demo-cluster-auth"),
                |_| (StatusCode::OK, cluster_secret()),
            ),
            call(Method::PUT, &format!("{NS}/configmaps/demo-topology"), echo),
            call(Method::PATCH, &format!("{NS}/services/demo-peers"), echo),
            call(Method::PATCH, &format!("{NS}/services/demo"), echo),
            call(Method::PATCH, &format!("{APPS}/statefulsets/demo"), echo),
            call(
                Method::PATCH,
                &format!("{POLICY}/poddisruptionbudgets/demo"),
                echo,
            ),
            call(
                Method::PATCH,
                &format!("{NETWORKING}/networkpolicies/demo"),
                echo,
            ),
            call(
                Method::PATCH,
                &format!("{KVC}/demo/status"),
                status_answer(kvc.clone()),
            ),
        ],
        Some(reports),
    )
    .await;
    assert_eq!(topology_in(&seen[5]).epoch, 5, "nothing changed");
    let node = &seen[11].body["status"]["nodes"][1];
    assert_eq!(node["state"], "Recovering");
    assert_eq!(node["resyncProgress"], 0.25);
}

fn reconcile_calls(kvc: &KvCluster, current: &Topology, pods: u32, event: bool) -> Vec<Call> {
    let script =
        Script::observe(kvc, current, None, (0..pods).map(running_pod).collect()).apply_objects();
    let script = if event {
        script.then(vec![call(Method::POST, EVENTS, echo)])
    } else {
        script
    };
    script.status(kvc).calls()
}

#[tokio::test]
async fn scaling_down_commits_and_pushes_the_topology_but_keeps_the_leaving_pods_until_every_node_has_it()
 {
    let kvc = cluster("{replicas: 3}");
    let five = cluster("{replicas: 5}");
    let mut current = topology(
        &five,
        9,
        &[
            NodeState::Up,
            NodeState::Up,
            NodeState::Up,
            NodeState::Leaving,
            NodeState::Leaving,
        ],
    );
    current.pending = Some(kvc.spec.desired().placement());
    let (reports, pushes) = report_server_recording(vec![(9, 9, 1.0); 5]).await;
    let (action, seen) = run_with(
        kvc.clone(),
        reconcile_calls(&kvc, &current, 5, true),
        Some(reports),
    )
    .await;
    let t = topology_in(&seen[5]);
    assert_eq!(t.epoch, 10);
    assert_eq!(t.pending, None);
    assert_eq!(t.placement.members, [0, 1, 2]);
    assert_eq!(t.nodes.len(), 3);
    // Every running pod, the leaving ones too, was told the new topology
    // right away, with the cluster token (the ConfigMap reaches running
    // pods only at the kubelet's next sync).
    let pushed = pushes.lock().expect("pushes").clone();
    let mut told: Vec<u32> = pushed.iter().map(|(o, _)| *o).collect();
    told.sort_unstable();
    assert_eq!(told, [0, 1, 2, 3, 4]);
    assert!(pushed.iter().all(|(_, p)| *p == t));
    // No node has reported epoch 10 yet: the StatefulSet keeps all five pods,
    // and the controller looks again soon.
    assert_eq!(seen[8].body["spec"]["replicas"], 5);
    assert_eq!(seen[11].body["reason"], "RebalanceCommitted");
    assert_eq!(action, Action::requeue(Duration::from_secs(5)));
}

#[tokio::test]
async fn the_leaving_pods_go_once_every_remaining_node_reports_the_committed_topology() {
    let kvc = cluster("{replicas: 3}");
    let committed = topology(&kvc, 10, &[NodeState::Up; 3]);
    // Nodes 0 and 2 have epoch 10; node 1 still answers with 9.
    let (reports, pushes) = report_server_recording(vec![
        (10, 10, 1.0),
        (9, 9, 1.0),
        (10, 10, 1.0),
        (9, 9, 1.0),
        (9, 9, 1.0),
    ])
    .await;
    let (_, seen) = run_with(
        kvc.clone(),
        reconcile_calls(&kvc, &committed, 5, false),
        Some(reports),
    )
    .await;
    assert_eq!(seen[8].body["spec"]["replicas"], 5, "node 1 is behind");
    let pushed = pushes.lock().expect("pushes").clone();
    assert!(
        pushed.iter().any(|(o, t)| *o == 1 && t.epoch == 10),
        "the node behind is pushed to again: {pushed:?}"
    );

    let (reports, _) = report_server_recording(vec![
        (10, 10, 1.0),
        (10, 10, 1.0),
        (10, 10, 1.0),
        (9, 9, 1.0),
        (9, 9, 1.0),
    ])
    .await;
    let (_, seen) = run_with(
        kvc.clone(),
        reconcile_calls(&kvc, &committed, 5, false),
        Some(reports),
    )
    .await;
    assert_eq!(
        seen[8].body["spec"]["replicas"], 3,
        "every remaining node has the topology without 3 and 4"
    );
}

#[tokio::test]
async fn an_api_error_is_counted_by_kind_and_retried_with_growing_backoff() {
    let etcd_down = || {
        call(
            Method::GET,
            &format!("{NS}/configmaps/demo-topology"),
            |_| kube_mock::status(500, "InternalError", "etcd is down"),
        )
    };
    let (client, server) = kube_mock::client(vec![etcd_down(), etcd_down()], |_, _| {});
    let registry = prometheus::Registry::new();
    let metrics = Metrics::new(&registry).expect("metrics");
    let ctx = Arc::new(Context::new(client, metrics.clone(), None));
    let kvc = Arc::new(cluster("{}"));
    let mut delays = Vec::new();
    for _ in 0..2 {
        let err = reconcile(kvc.clone(), ctx.clone())
            .await
            .expect_err("the API failed");
        assert_eq!(err.metric_label(), "kube");
        delays.push(kv_operator::k8s::error_policy(
            kvc.clone(),
            &err,
            ctx.clone(),
        ));
    }
    // The mock ends when the last client is gone.
    drop(ctx);
    server.finish().await;
    assert_eq!(
        delays,
        [
            Action::requeue(Duration::from_secs(5)),
            Action::requeue(Duration::from_secs(10))
        ]
    );
    assert_eq!(metrics.reconciles.with_label_values(&["kube"]).get(), 2);
    assert_eq!(metrics.reconciles.with_label_values(&["ok"]).get(), 0);
}

#[tokio::test]
async fn a_lost_topology_is_rewritten_above_the_epoch_the_nodes_already_hold() {
    let kvc = cluster("{}");
    let reports = report_server(vec![(40, 40, 1.0), (41, 41, 1.0), (40, 40, 1.0)]).await;
    let (_, seen) = run_with(
        kvc.clone(),
        vec![
            call(
                Method::GET,
                &format!("{NS}/configmaps/demo-topology"),
                |_| not_found(),
            ),
            call(Method::GET, &format!("{APPS}/statefulsets/demo"), |_| {
                not_found()
            }),
            call(Method::GET, &format!("{NS}/pods"), |_| {
                (StatusCode::OK, pod_list((0..3).map(running_pod).collect()))
            }),
            call(Method::GET, &format!("{NS}/secrets/demo-auth"), |_| {
                (StatusCode::OK, secret())
            }),
            call(
                Method::GET,
                &format!("{NS}/secrets/demo-cluster-auth"),
                |_| (StatusCode::OK, cluster_secret()),
            ),
            call(Method::POST, &format!("{NS}/configmaps"), echo),
            call(Method::PATCH, &format!("{NS}/services/demo-peers"), echo),
            call(Method::PATCH, &format!("{NS}/services/demo"), echo),
            call(Method::PATCH, &format!("{APPS}/statefulsets/demo"), echo),
            call(
                Method::PATCH,
                &format!("{POLICY}/poddisruptionbudgets/demo"),
                echo,
            ),
            call(
                Method::PATCH,
                &format!("{NETWORKING}/networkpolicies/demo"),
                echo,
            ),
            call(
                Method::PATCH,
                &format!("{KVC}/demo/status"),
                status_answer(kvc.clone()),
            ),
        ],
        Some(reports),
    )
    .await;
    let t = topology_in(&seen[5]);
    assert_eq!(
        t.epoch, 42,
        "above every node's epoch, so the nodes accept it"
    );
    assert_eq!(
        t.cluster_id, "uid-1",
        "no node holds a valid topology to carry on from: the cluster is named by its UID"
    );
}

#[tokio::test]
async fn a_configmap_deleted_mid_rebalance_is_rebuilt_from_the_topology_the_nodes_hold() {
    // 3 -> 5 was pending at epoch 9 when the ConfigMap was deleted; nodes 3
    // and 4 have not streamed their data in yet.
    let kvc = cluster("{replicas: 5}");
    let three = cluster("{replicas: 3}");
    let mut held = topology(
        &kvc,
        9,
        &[
            NodeState::Up,
            NodeState::Up,
            NodeState::Up,
            NodeState::Joining,
            NodeState::Joining,
        ],
    );
    held.placement = three.spec.desired().placement();
    held.pending = Some(kvc.spec.desired().placement());
    held.cluster_id = "ns/demo".into();
    assert_eq!(held.validate(), Ok(()));
    let (reports, _) = report_server_holding(
        vec![
            (9, 9, 1.0),
            (9, 9, 1.0),
            (9, 9, 1.0),
            (9, 0, 0.5),
            (9, 0, 0.5),
        ],
        Some(held.clone()),
        vec![],
    )
    .await;
    let mut calls = reconcile_calls(&kvc, &held, 5, false);
    calls[0] = call(
        Method::GET,
        &format!("{NS}/configmaps/demo-topology"),
        |_| not_found(),
    );
    calls[5] = call(Method::POST, &format!("{NS}/configmaps"), echo);
    calls.insert(5, call(Method::POST, EVENTS, echo));
    let (_, seen) = run_with(kvc.clone(), calls, Some(reports)).await;
    assert_eq!(seen[5].body["reason"], "TopologyAdopted");
    let t = topology_in(&seen[6]);
    assert_eq!(
        t, held,
        "carried on unchanged: the joiners are not Up, nothing is committed"
    );
}

#[tokio::test]
async fn a_node_on_an_empty_volume_is_shown_recovering_until_its_store_has_caught_up() {
    let kvc = cluster("{}");
    let current = topology(&kvc, 6, &[NodeState::Up; 3]);
    // Node 2's volume came back empty: its store reports catching up.
    let (reports, _) = report_server_holding(vec![(6, 6, 1.0); 3], None, vec![2]).await;
    let (_, seen) = run_with(
        kvc.clone(),
        reconcile_calls(&kvc, &current, 3, false),
        Some(reports),
    )
    .await;
    let status = &seen[11].body["status"];
    assert_eq!(status["nodes"][2]["state"], "Recovering", "{status}");
    assert_eq!(status["nodes"][0]["state"], "Up");
    assert_eq!(status["phase"], "Degraded");
}

#[tokio::test]
async fn a_topology_write_over_a_configmap_changed_since_it_was_read_conflicts_and_applies_nothing_more()
 {
    // Two operator replicas across a leader change: the other one wrote the
    // ConfigMap after this one read it (at resourceVersion 41). This one's
    // write carries 41 as its precondition, the API server answers 409, and
    // nothing planned from the stale read is applied; the reconcile fails and
    // is retried from what the other one wrote.
    let kvc = cluster("{replicas: 4}");
    let three = cluster("{replicas: 3}");
    let current = topology(&three, 7, &[NodeState::Up; 3]);
    let mut cm = configmap(&kvc, &current);
    cm["metadata"]["resourceVersion"] = json!("41");
    let (reports, pushes) = report_server_recording(vec![(7, 7, 1.0); 4]).await;
    let mut calls = reconcile_calls(&kvc, &current, 4, false);
    calls.truncate(6);
    calls[0] = call(
        Method::GET,
        &format!("{NS}/configmaps/demo-topology"),
        move |_| (StatusCode::OK, cm),
    );
    calls[5] = call(
        Method::PUT,
        &format!("{NS}/configmaps/demo-topology"),
        |_| {
            (
                StatusCode::CONFLICT,
                json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                       "message": "Operation cannot be fulfilled on configmaps \"demo-topology\": the object has been modified",
                       "reason": "Conflict", "code": 409}),
            )
        },
    );
    let (result, seen) = run_for_result(kvc.clone(), calls, Some(reports)).await;
    assert!(result.is_err(), "the reconcile fails on the conflict");
    assert_eq!(seen.len(), 6, "nothing after the refused write");
    assert_eq!(seen[5].body["metadata"]["resourceVersion"], "41");
    assert_eq!(
        topology_in(&seen[5]).epoch,
        8,
        "it would have started the rebalance"
    );
    assert!(
        pushes.lock().expect("pushes").is_empty(),
        "a topology that was not stored is pushed to no node"
    );
}

#[tokio::test]
async fn holding_down_so_many_nodes_that_writes_fail_is_refused_and_nothing_is_applied() {
    // Quorum of 3 owners needs 2: holding down 0 and 2 leaves 1.
    let kvc = cluster("{faultInjection: {failedNodes: [0, 2]}}");
    let current = topology(&kvc, 4, &[NodeState::Up, NodeState::Up, NodeState::Up]);
    let (action, seen) = run(
        kvc.clone(),
        Script::observe(&kvc, &current, None, (0..3).map(running_pod).collect())
            .then(vec![call(Method::POST, EVENTS, echo)])
            .status(&kvc)
            .calls(),
    )
    .await;
    assert_eq!(action, Action::requeue(Duration::from_secs(60)));
    assert_eq!(seen[5].body["reason"], "SpecRefused");
    assert_eq!(seen[5].body["type"], "Warning");
    let status = &seen[6].body["status"];
    assert_eq!(status["phase"], "Failed");
    let progressing = status["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Progressing"))
        .expect("Progressing");
    assert_eq!(progressing["reason"], "SpecRefused");
    assert!(
        progressing["message"]
            .as_str()
            .is_some_and(|m| m.contains("writes at Quorum need 2")),
        "{progressing}"
    );
    // With no accepted spec to fall back on (a first reconcile), nothing is applied.
    let refused = condition(status, "SpecRefused").expect("SpecRefused");
    assert_eq!(
        (&refused["status"], &refused["reason"]),
        (&json!("True"), &json!("PlannerRefused"))
    );
    assert!(
        refused["message"]
            .as_str()
            .is_some_and(|m| m.ends_with("(no accepted spec to carry out meanwhile)")),
        "{refused}"
    );
}

/// Node 1 held down (Failed at epoch 4) and node 2 added to failedNodes:
/// one live owner of three is left, and writes at Quorum need two.
fn second_hold_down(annotation: Option<&str>) -> (KvCluster, Topology) {
    let mut kvc = cluster("{faultInjection: {failedNodes: [1, 2]}}");
    if let Some(v) = annotation {
        kvc.metadata.annotations = Some(
            [(
                kv_operator::k8s::crd::FORCE_FAULT_INJECTION.to_string(),
                v.to_string(),
            )]
            .into(),
        );
    }
    let current = topology(&kvc, 4, &[NodeState::Up, NodeState::Failed, NodeState::Up]);
    (kvc, current)
}

fn observe_then(kvc: &KvCluster, current: &Topology, rest: Vec<Call>) -> Vec<Call> {
    Script::observe(kvc, current, None, vec![running_pod(0), running_pod(2)])
        .then(rest)
        .calls()
}

fn condition<'a>(status: &'a Value, type_: &str) -> Option<&'a Value> {
    status["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_))
}

#[tokio::test]
async fn the_force_annotation_gets_a_hold_down_applied_that_is_refused_without_it() {
    // Without the annotation: refused, nothing applied.
    let (kvc, current) = second_hold_down(None);
    let (_, seen) = run(
        kvc.clone(),
        observe_then(
            &kvc,
            &current,
            vec![
                call(Method::POST, EVENTS, echo),
                call(
                    Method::PATCH,
                    &format!("{KVC}/demo/status"),
                    status_answer(kvc.clone()),
                ),
            ],
        ),
    )
    .await;
    assert_eq!(seen[5].body["reason"], "SpecRefused");
    let status = &seen[6].body["status"];
    assert_eq!(status["phase"], "Failed");
    assert_eq!(condition(status, "ForceFaultInjection"), None);

    // With kvstore.dev/force-fault-injection: "true": the same spec is
    // planned with force and carried out.
    let (kvc, current) = second_hold_down(Some("true"));
    let (_, seen) = run(
        kvc.clone(),
        observe_then(
            &kvc,
            &current,
            vec![
                call(Method::PUT, &format!("{NS}/configmaps/demo-topology"), echo),
                call(Method::PATCH, &format!("{NS}/services/demo-peers"), echo),
                call(Method::PATCH, &format!("{NS}/services/demo"), echo),
                call(Method::PATCH, &format!("{APPS}/statefulsets/demo"), echo),
                call(
                    Method::PATCH,
                    &format!("{POLICY}/poddisruptionbudgets/demo"),
                    echo,
                ),
                call(
                    Method::PATCH,
                    &format!("{NETWORKING}/networkpolicies/demo"),
                    echo,
                ),
                call(Method::DELETE, &format!("{NS}/pods/demo-2"), |_| {
                    (StatusCode::OK, running_pod(2))
                }),
                call(Method::POST, EVENTS, echo),
                call(Method::POST, EVENTS, echo),
                call(
                    Method::PATCH,
                    &format!("{KVC}/demo/status"),
                    status_answer(kvc.clone()),
                ),
            ],
        ),
    )
    .await;
    let t = topology_in(&seen[5]);
    assert_eq!(t.epoch, 5);
    assert_eq!(t.state_of(0), Some(NodeState::Up));
    assert_eq!(t.state_of(1), Some(NodeState::Failed));
    assert_eq!(t.state_of(2), Some(NodeState::Failed));
    assert_eq!(seen[12].body["reason"], "FaultInjected");
    assert_eq!(
        seen[12].body["note"],
        "node 2 (demo-2) deleted and held Failed until removed from faultInjection.failedNodes \
         (planned with force: kvstore.dev/force-fault-injection is \"true\")"
    );
    assert_eq!(seen[13].body["reason"], "NodeFailed");
    let status = &seen[14].body["status"];
    assert_eq!(status["phase"], "Degraded");
    assert_eq!(status["nodes"][2]["state"], "Failed");
    let available = condition(status, "Available").expect("Available");
    assert_eq!(
        (&available["status"], &available["reason"]),
        (&json!("False"), &json!("QuorumLost")),
        "writes at Quorum fail while forced: {available}"
    );
    let forced = condition(status, "ForceFaultInjection").expect("ForceFaultInjection");
    assert_eq!(
        (
            &forced["status"],
            &forced["reason"],
            &forced["observedGeneration"]
        ),
        (&json!("True"), &json!("Annotated"), &json!(2))
    );
}

#[tokio::test]
async fn an_invalid_force_annotation_is_planned_without_force_and_reported_once() {
    let (mut kvc, current) = second_hold_down(Some("yes"));
    let mut calls = vec![call(Method::POST, EVENTS, echo)];
    calls.extend(observe_then(
        &kvc,
        &current,
        vec![
            call(Method::POST, EVENTS, echo),
            call(
                Method::PATCH,
                &format!("{KVC}/demo/status"),
                status_answer(kvc.clone()),
            ),
        ],
    ));
    let (_, seen) = run(kvc.clone(), calls).await;
    // The Warning comes before the cluster is read, then the refusal.
    assert_eq!(seen[0].body["reason"], "InvalidAnnotation");
    assert_eq!(seen[0].body["type"], "Warning");
    assert_eq!(
        seen[0].body["note"],
        "kvstore.dev/force-fault-injection is \"yes\"; only \"true\" or \"false\" are understood, \
         so the cluster is planned without force"
    );
    assert_eq!(seen[6].body["reason"], "SpecRefused");
    let status = &seen[7].body["status"];
    assert_eq!(status["phase"], "Failed");
    let forced = condition(status, "ForceFaultInjection").expect("ForceFaultInjection");
    assert_eq!(
        (&forced["status"], &forced["reason"]),
        (&json!("False"), &json!("InvalidAnnotation"))
    );
    let progressing = condition(status, "Progressing").expect("Progressing");
    assert!(
        progressing["message"]
            .as_str()
            .is_some_and(|m| m.contains("holding down node(s) [2]")
                && m.ends_with(
                    "is \"yes\", not \"true\" or \"false\", so it was planned without force"
                )),
        "{progressing}"
    );

    // The next reconcile sees its own status: no second InvalidAnnotation,
    // and no second SpecRefused Event for the same generation.
    kvc.status = Some(serde_json::from_value(status.clone()).expect("status"));
    let (_, seen) = run(
        kvc.clone(),
        observe_then(
            &kvc,
            &current,
            vec![call(
                Method::PATCH,
                &format!("{KVC}/demo/status"),
                status_answer(kvc.clone()),
            )],
        ),
    )
    .await;
    assert_eq!(seen[5].body["status"]["phase"], "Failed");
}

#[tokio::test]
async fn a_node_whose_pod_is_gone_longer_than_failure_detection_is_failed() {
    let kvc = cluster("{}");
    let current = topology(&kvc, 4, &[NodeState::Up, NodeState::Up, NodeState::Up]);
    let cm = configmap(&kvc, &current);
    let sts = json!({"apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": "demo", "namespace": "ns", "creationTimestamp": "2026-01-01T00:00:00Z"}});
    let (_, seen) = run(
        kvc.clone(),
        vec![
            call(
                Method::GET,
                &format!("{NS}/configmaps/demo-topology"),
                move |_| (StatusCode::OK, cm),
            ),
            call(
                Method::GET,
                &format!("{APPS}/statefulsets/demo"),
                move |_| (StatusCode::OK, sts),
            ),
            call(Method::GET, &format!("{NS}/pods"), |_| {
                (
                    StatusCode::OK,
                    pod_list(vec![running_pod(0), running_pod(2)]),
                )
            }),
            call(Method::GET, &format!("{NS}/secrets/demo-auth"), |_| {
                (StatusCode::OK, secret())
            }),
            call(
                Method::GET,
                &format!("{NS}/secrets/demo-cluster-auth"),
                |_| (StatusCode::OK, cluster_secret()),
            ),
            call(Method::PUT, &format!("{NS}/configmaps/demo-topology"), echo),
            call(Method::PATCH, &format!("{NS}/services/demo-peers"), echo),
            call(Method::PATCH, &format!("{NS}/services/demo"), echo),
            call(Method::PATCH, &format!("{APPS}/statefulsets/demo"), echo),
            call(
                Method::PATCH,
                &format!("{POLICY}/poddisruptionbudgets/demo"),
                echo,
            ),
            call(
                Method::PATCH,
                &format!("{NETWORKING}/networkpolicies/demo"),
                echo,
            ),
            call(Method::POST, EVENTS, echo),
            call(
                Method::PATCH,
                &format!("{KVC}/demo/status"),
                status_answer(kvc.clone()),
            ),
        ],
    )
    .await;
    let t = topology_in(&seen[5]);
    assert_eq!(t.epoch, 5);
    assert_eq!(t.state_of(1), Some(NodeState::Failed));
    assert_eq!(seen[8].body["spec"]["replicas"], 3, "the pod comes back");
    assert_eq!(seen[11].body["reason"], "NodeFailed");
}

/// `secs` seconds before now, RFC 3339.
fn ago(secs: i64) -> String {
    let now = k8s_openapi::jiff::Timestamp::now();
    k8s_openapi::jiff::Timestamp::from_second(now.as_second() - secs)
        .expect("time")
        .to_string()
}

/// The status a previous reconcile wrote: `phase`, each node's state (and,
/// for those listed in `unreachable`, since when it is unreachable), and the
/// spec of `accepted_yaml` accepted at generation 1.
fn earlier_status(
    phase: &str,
    states: &[NodeState],
    unreachable: &[(u32, String)],
    accepted_yaml: &str,
) -> KvClusterStatus {
    let accepted = AcceptedSpec::of(&KvCluster {
        metadata: kube::api::ObjectMeta {
            generation: Some(1),
            ..Default::default()
        },
        ..cluster(accepted_yaml)
    });
    let nodes: Vec<Value> = states
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let mut n = json!({"ordinal": i, "pod": format!("demo-{i}"), "state": s.to_string()});
            if let Some((_, t)) = unreachable.iter().find(|(o, _)| *o as usize == i) {
                n["unreachableSince"] = json!(t);
            }
            n
        })
        .collect();
    serde_json::from_value(json!({
        "phase": phase, "observedGeneration": 1, "topologyEpoch": 4,
        "nodes": nodes, "conditions": [], "acceptedSpec": accepted,
    }))
    .expect("status")
}

/// The calls of a reconcile that reads `current` from the ConfigMap, an old
/// StatefulSet (created 2026-01-01) and the pods of `running`, then makes `rest`.
fn observe_running(
    kvc: &KvCluster,
    current: &Topology,
    running: &[u32],
    rest: Vec<Call>,
) -> Vec<Call> {
    let pods = running.iter().map(|&o| running_pod(o)).collect();
    Script::observe(kvc, current, Some(live_statefulset()), pods)
        .then(rest)
        .calls()
}

/// The ConfigMap, both Services, the StatefulSet, the budget and the NetworkPolicy.
fn apply_objects() -> Vec<Call> {
    Script(Vec::new()).apply_objects().calls()
}

fn then(mut calls: Vec<Call>, rest: Vec<Call>) -> Vec<Call> {
    calls.extend(rest);
    calls
}

fn write_status(kvc: &KvCluster) -> Call {
    call(
        Method::PATCH,
        &format!("{KVC}/demo/status"),
        status_answer(kvc.clone()),
    )
}

fn with_status(kvc: &KvCluster, status: &Value) -> KvCluster {
    let mut kvc = kvc.clone();
    kvc.status = Some(serde_json::from_value(status.clone()).expect("status"));
    kvc
}

#[tokio::test]
async fn a_pod_missing_for_less_than_failure_detection_leaves_its_node_up_and_fails_it_after() {
    // The StatefulSet is old: counting from its creation would fail node 1 at once.
    let kvc = cluster("{failureDetectionSeconds: 10}");
    let up3 = [NodeState::Up, NodeState::Up, NodeState::Up];
    let current = topology(&kvc, 4, &up3);
    let before = k8s_openapi::jiff::Timestamp::now();

    // Pod 1 is gone; the last status saw every node reachable.
    let kvc = with_status(
        &kvc,
        &serde_json::to_value(earlier_status("Running", &up3, &[], "{}")).expect("json"),
    );
    let (_, seen) = run(
        kvc.clone(),
        observe_running(
            &kvc,
            &current,
            &[0, 2],
            then(apply_objects(), vec![write_status(&kvc)]),
        ),
    )
    .await;
    assert_eq!(topology_in(&seen[5]).epoch, 4, "nothing changes yet");
    assert_eq!(topology_in(&seen[5]).state_of(1), Some(NodeState::Up));
    let status = seen[11].body["status"].clone();
    assert_eq!(status["phase"], "Running");
    let since: k8s_openapi::jiff::Timestamp = status["nodes"][1]["unreachableSince"]
        .as_str()
        .expect("node 1 unreachable since")
        .parse()
        .expect("RFC 3339");
    assert!(
        since >= before - k8s_openapi::jiff::SignedDuration::from_secs(1),
        "{since} counts from now"
    );
    assert_eq!(status["nodes"][0].get("unreachableSince"), None);

    // A later reconcile (here also a new Context, as after an operator
    // restart) counts from the time in the status, not from now again.
    let kvc = with_status(&kvc, &status);
    let (_, seen) = run(
        kvc.clone(),
        observe_running(
            &kvc,
            &current,
            &[0, 2],
            then(apply_objects(), vec![write_status(&kvc)]),
        ),
    )
    .await;
    assert_eq!(topology_in(&seen[5]).state_of(1), Some(NodeState::Up));
    assert_eq!(
        seen[11].body["status"]["nodes"][1]["unreachableSince"],
        status["nodes"][1]["unreachableSince"]
    );

    // Once that is failureDetectionSeconds ago, the node is Failed.
    let mut status = status;
    status["nodes"][1]["unreachableSince"] = json!(ago(11));
    let kvc = with_status(&kvc, &status);
    let (_, seen) = run(
        kvc.clone(),
        observe_running(
            &kvc,
            &current,
            &[0, 2],
            then(
                apply_objects(),
                vec![call(Method::POST, EVENTS, echo), write_status(&kvc)],
            ),
        ),
    )
    .await;
    let t = topology_in(&seen[5]);
    assert_eq!((t.epoch, t.state_of(1)), (5, Some(NodeState::Failed)));
    assert_eq!(seen[11].body["reason"], "NodeFailed");
    let after = &seen[12].body["status"];
    assert_eq!(after["phase"], "Degraded");
    assert_eq!(
        after["nodes"][1]["unreachableSince"],
        status["nodes"][1]["unreachableSince"]
    );
}

#[tokio::test]
async fn a_refused_spec_keeps_the_last_accepted_one_reconciled_with_a_spec_refused_condition() {
    // Holding down 0 and 2 leaves one live owner of three; Quorum needs two.
    let kvc = cluster("{faultInjection: {failedNodes: [0, 2]}}");
    let up3 = [NodeState::Up, NodeState::Up, NodeState::Up];
    let current = topology(&kvc, 4, &up3);
    // Meanwhile pod 1 was deleted a minute ago and has not come back.
    let kvc = with_status(
        &kvc,
        &serde_json::to_value(earlier_status("Running", &up3, &[(1, ago(60))], "{}"))
            .expect("json"),
    );
    let (action, seen) = run(
        kvc.clone(),
        observe_running(
            &kvc,
            &current,
            &[0, 2],
            then(
                then(vec![call(Method::POST, EVENTS, echo)], apply_objects()),
                vec![call(Method::POST, EVENTS, echo), write_status(&kvc)],
            ),
        ),
    )
    .await;
    assert_eq!(seen[5].body["reason"], "SpecRefused");
    assert_eq!(seen[5].body["type"], "Warning");
    // The accepted spec (no hold-down) is still carried out: node 1 is
    // detected Failed, 0 and 2 are not held down, the pod is asked back.
    let t = topology_in(&seen[6]);
    assert_eq!(t.epoch, 5);
    assert_eq!(t.state_of(0), Some(NodeState::Up));
    assert_eq!(t.state_of(1), Some(NodeState::Failed));
    assert_eq!(t.state_of(2), Some(NodeState::Up));
    assert_eq!(seen[9].body["spec"]["replicas"], 3);
    assert_eq!(seen[12].body["reason"], "NodeFailed");
    let status = seen[13].body["status"].clone();
    assert_eq!(status["phase"], "Degraded", "not Failed: the cluster runs");
    assert_eq!(status["observedGeneration"], 2);
    assert_eq!(status["acceptedSpec"]["generation"], 1);
    let refused = condition(&status, "SpecRefused").expect("SpecRefused");
    assert_eq!(
        (
            &refused["status"],
            &refused["reason"],
            &refused["observedGeneration"]
        ),
        (&json!("True"), &json!("PlannerRefused"), &json!(2))
    );
    let message = refused["message"].as_str().expect("message");
    assert!(
        message.starts_with(
            "holding down node(s) [0, 2] would leave some keys with 1 of 3 owners live"
        ) && message.ends_with("(still carrying out the spec of generation 1)"),
        "{message}"
    );
    assert_eq!(
        action,
        Action::requeue(Duration::from_secs(5)),
        "looks again soon"
    );

    // The next reconcile carries on without a second Event, although the
    // planner's message now counts node 1 as down too.
    let kvc = with_status(&kvc, &status);
    let current = topology_in(&seen[6]);
    let (_, seen) = run(
        kvc.clone(),
        observe_running(
            &kvc,
            &current,
            &[0, 2],
            then(apply_objects(), vec![write_status(&kvc)]),
        ),
    )
    .await;
    let status = &seen[11].body["status"];
    assert_eq!(status["phase"], "Degraded");
    let refused = condition(status, "SpecRefused").expect("still refused");
    assert!(
        refused["message"]
            .as_str()
            .is_some_and(|m| m.contains("0 of 3 owners live")),
        "{refused}"
    );
}

#[tokio::test]
async fn a_hold_down_refused_while_another_node_is_down_is_carried_out_once_that_node_is_back() {
    // Node 1 is Failed; holding down 2 as well would leave one owner of three.
    let kvc = cluster("{faultInjection: {failedNodes: [2]}}");
    let current = topology(&kvc, 4, &[NodeState::Up, NodeState::Failed, NodeState::Up]);
    let kvc = with_status(
        &kvc,
        &serde_json::to_value(earlier_status(
            "Degraded",
            &[NodeState::Up, NodeState::Failed, NodeState::Up],
            &[(1, ago(600))],
            "{}",
        ))
        .expect("json"),
    );
    // Pod 1 is back: under the accepted spec node 1 starts recovering.
    let (_, seen) = run(
        kvc.clone(),
        observe_running(
            &kvc,
            &current,
            &[0, 1, 2],
            then(
                then(vec![call(Method::POST, EVENTS, echo)], apply_objects()),
                vec![call(Method::POST, EVENTS, echo), write_status(&kvc)],
            ),
        ),
    )
    .await;
    assert_eq!(seen[5].body["reason"], "SpecRefused");
    let t = topology_in(&seen[6]);
    assert_eq!(
        (t.epoch, t.state_of(1), t.state_of(2)),
        (5, Some(NodeState::Recovering), Some(NodeState::Up))
    );
    assert_eq!(seen[12].body["reason"], "NodeRecovering");
    let status = seen[13].body["status"].clone();
    assert_eq!(
        condition(&status, "SpecRefused").expect("refused")["status"],
        "True"
    );
    assert_eq!(
        status["nodes"][1].get("unreachableSince"),
        None,
        "reachable again"
    );

    // With node 1 no longer Failed the hold-down of 2 is acceptable: it is
    // carried out, the condition goes, and generation 2 is the accepted one.
    let kvc = with_status(&kvc, &status);
    let (_, seen) = run(
        kvc.clone(),
        observe_running(
            &kvc,
            &t,
            &[0, 1, 2],
            then(
                apply_objects(),
                vec![
                    call(Method::DELETE, &format!("{NS}/pods/demo-2"), |_| {
                        (StatusCode::OK, running_pod(2))
                    }),
                    call(Method::POST, EVENTS, echo),
                    call(Method::POST, EVENTS, echo),
                    write_status(&kvc),
                ],
            ),
        ),
    )
    .await;
    let t = topology_in(&seen[5]);
    assert_eq!((t.epoch, t.state_of(2)), (6, Some(NodeState::Failed)));
    assert_eq!(seen[12].body["reason"], "FaultInjected");
    assert_eq!(seen[13].body["reason"], "NodeFailed");
    let status = &seen[14].body["status"];
    assert_eq!(condition(status, "SpecRefused"), None);
    assert_eq!(status["acceptedSpec"]["generation"], 2);
    assert_eq!(
        status["acceptedSpec"]["faultInjection"]["failedNodes"],
        json!([2])
    );
}

/// A running pod of node `ordinal` with the UID `uid`.
fn pod_with_uid(ordinal: u32, uid: &str) -> Value {
    let mut pod = running_pod(ordinal);
    pod["metadata"]["uid"] = json!(uid);
    pod
}

/// The calls of a reconcile that reads `current`, an old StatefulSet and
/// `pods`, then makes `rest`.
fn observe_pods(
    kvc: &KvCluster,
    current: &Topology,
    pods: Vec<Value>,
    rest: Vec<Call>,
) -> Vec<Call> {
    Script::observe(kvc, current, Some(live_statefulset()), pods)
        .then(rest)
        .calls()
}

fn event_reasons(seen: &[Seen]) -> Vec<String> {
    seen.iter()
        .filter(|s| s.path == EVENTS)
        .filter_map(|s| s.body["reason"].as_str().map(str::to_string))
        .collect()
}

fn status_written(seen: &[Seen]) -> Value {
    seen.iter()
        .rev()
        .find(|s| s.path == format!("{KVC}/demo/status"))
        .map(|s| s.body["status"].clone())
        .expect("a status write")
}

fn statefulset_replicas(seen: &[Seen]) -> Value {
    seen.iter()
        .rev()
        .find(|s| s.path == format!("{APPS}/statefulsets/demo"))
        .map(|s| s.body["spec"]["replicas"].clone())
        .expect("the StatefulSet applied")
}

#[tokio::test]
async fn hibernation_scales_the_statefulset_to_zero_and_keeps_the_topology_with_no_node_failed() {
    let up3 = [NodeState::Up; 3];
    let kvc = cluster("{hibernation: true}");
    let current = topology(&kvc, 4, &up3);
    // The pods went long ago (the StatefulSet is old); the last status saw
    // pod 1 unreachable a minute ago.
    let kvc = with_status(
        &kvc,
        &serde_json::to_value(earlier_status("Running", &up3, &[(1, ago(60))], "{}"))
            .expect("json"),
    );
    let (action, seen) = run(
        kvc.clone(),
        observe_pods(
            &kvc,
            &current,
            vec![],
            then(
                apply_objects(),
                vec![call(Method::POST, EVENTS, echo), write_status(&kvc)],
            ),
        ),
    )
    .await;
    let t = topology_in(&seen[5]);
    assert_eq!(t, current, "the ConfigMap keeps the same topology");
    assert_eq!(statefulset_replicas(&seen), 0);
    assert_eq!(event_reasons(&seen), ["Hibernated"]);
    let status = status_written(&seen);
    assert_eq!(status["phase"], "Hibernated");
    assert_eq!(status["topologyEpoch"], 4);
    let h = condition(&status, "Hibernated").expect("condition");
    assert_eq!(
        (h["status"].as_str(), h["reason"].as_str()),
        (Some("True"), Some("Hibernated"))
    );
    assert_eq!(
        condition(&status, "Available").expect("Available")["reason"],
        "Hibernated"
    );
    for n in status["nodes"].as_array().expect("nodes") {
        assert_eq!(n["state"], "Up", "{n}");
        assert_eq!(n.get("unreachableSince"), None, "stopped on request: {n}");
    }
    assert_eq!(action, Action::requeue(Duration::from_secs(60)));

    // Hibernated already: no second Event.
    let kvc = with_status(&kvc, &status);
    let (_, seen) = run(
        kvc.clone(),
        observe_pods(
            &kvc,
            &current,
            vec![],
            then(apply_objects(), vec![write_status(&kvc)]),
        ),
    )
    .await;
    assert_eq!(status_written(&seen)["phase"], "Hibernated");
}

#[tokio::test]
async fn hibernation_waits_while_a_rebalance_is_pending_and_says_so_once() {
    let kvc = cluster("{replicas: 5, hibernation: true}");
    let three = cluster("{replicas: 3}");
    let mut current = topology(
        &kvc,
        9,
        &[
            NodeState::Up,
            NodeState::Up,
            NodeState::Up,
            NodeState::Joining,
            NodeState::Joining,
        ],
    );
    current.placement = three.spec.desired().placement();
    current.pending = Some(kvc.spec.desired().placement());
    // Nobody has streamed at epoch 9 yet: the rebalance stays pending.
    let (reports, _) = report_server_recording(vec![(9, 8, 0.5); 5]).await;
    let (_, seen) = run_with(
        kvc.clone(),
        observe_pods(
            &kvc,
            &current,
            (0..5).map(running_pod).collect(),
            then(
                apply_objects(),
                vec![call(Method::POST, EVENTS, echo), write_status(&kvc)],
            ),
        ),
        Some(reports),
    )
    .await;
    assert_eq!(statefulset_replicas(&seen), 5, "every pod keeps running");
    let warning = seen.iter().find(|s| s.path == EVENTS).expect("an Event");
    assert_eq!(warning.body["reason"], "RebalancePending");
    assert_eq!(warning.body["type"], "Warning");
    let status = status_written(&seen);
    assert_eq!(status["phase"], "Rebalancing");
    let h = condition(&status, "Hibernated").expect("condition");
    assert_eq!(
        (h["status"].as_str(), h["reason"].as_str()),
        (Some("False"), Some("RebalancePending"))
    );
    assert!(
        h["message"]
            .as_str()
            .is_some_and(|m| m.contains("pending placement change")),
        "{h}"
    );

    // Shown already: the next reconcile does not warn again.
    let kvc = with_status(&kvc, &status);
    let (reports, _) = report_server_recording(vec![(9, 8, 0.5); 5]).await;
    let (_, seen) = run_with(
        kvc.clone(),
        observe_pods(
            &kvc,
            &current,
            (0..5).map(running_pod).collect(),
            then(apply_objects(), vec![write_status(&kvc)]),
        ),
        Some(reports),
    )
    .await;
    assert_eq!(event_reasons(&seen), Vec::<String>::new());
}

#[tokio::test]
async fn waking_up_restores_the_statefulset_and_fails_no_node_whose_pod_is_not_back_yet() {
    let up3 = [NodeState::Up; 3];
    let asleep = cluster("{hibernation: true}");
    let current = topology(&asleep, 4, &up3);
    // What the hibernating reconcile wrote, an hour ago.
    let mut hibernated = earlier_status("Hibernated", &up3, &[], "{}");
    hibernated.conditions = vec![
        serde_json::from_value(json!({
            "type": "Hibernated", "status": "True", "reason": "Hibernated",
            "message": "", "lastTransitionTime": ago(3600), "observedGeneration": 1
        }))
        .expect("condition"),
    ];
    let kvc = cluster("{failureDetectionSeconds: 10}");
    let kvc = with_status(&kvc, &serde_json::to_value(&hibernated).expect("json"));
    let (_, seen) = run(
        kvc.clone(),
        observe_pods(
            &kvc,
            &current,
            vec![],
            then(
                apply_objects(),
                vec![call(Method::POST, EVENTS, echo), write_status(&kvc)],
            ),
        ),
    )
    .await;
    let t = topology_in(&seen[5]);
    assert_eq!(t, current, "no epoch, no Failed node: nothing to catch up");
    assert_eq!(statefulset_replicas(&seen), 3, "the same size as before");
    assert_eq!(event_reasons(&seen), ["WakingUp"]);
    let status = status_written(&seen);
    let h = condition(&status, "Hibernated").expect("condition");
    assert_eq!(h["reason"], "WakingUp");
    // No pod exists yet: not Running, no node Up (the real control plane
    // once showed Running with every node Up one second after waking).
    assert_eq!(status["phase"], "WakingUp");
    for n in status["nodes"].as_array().expect("nodes") {
        assert_eq!(n.get("unreachableSince"), None, "{n}");
        assert_eq!(n["state"], "Recovering", "{n}");
    }

    // Still waking a while later (past failureDetectionSeconds), pods 0
    // and 1 back: node 2 is not failed.
    let mut later = status.clone();
    if let Some(c) = later["conditions"]
        .as_array_mut()
        .and_then(|cs| cs.iter_mut().find(|c| c["type"] == "Hibernated"))
    {
        c["lastTransitionTime"] = json!(ago(120));
    }
    // Even a node the status shows unreachable for long (an operator that
    // counted it) is spared while the cluster wakes up.
    later["nodes"][2]["unreachableSince"] = json!(ago(120));
    let kvc = with_status(&kvc, &later);
    let (_, seen) = run(
        kvc.clone(),
        observe_pods(
            &kvc,
            &current,
            vec![running_pod(0), running_pod(1)],
            then(apply_objects(), vec![write_status(&kvc)]),
        ),
    )
    .await;
    assert_eq!(topology_in(&seen[5]), current);
    assert_eq!(event_reasons(&seen), Vec::<String>::new());
    let status = status_written(&seen);
    assert_eq!(status["nodes"][2].get("unreachableSince"), None);
    assert_eq!(status["phase"], "WakingUp");
    let states: Vec<&Value> = status["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| &n["state"])
        .collect();
    assert_eq!(states, ["Up", "Up", "Recovering"]);

    // Every pod back: awake.
    let (_, seen) = run(
        kvc.clone(),
        observe_pods(
            &kvc,
            &current,
            (0..3).map(running_pod).collect(),
            then(
                apply_objects(),
                vec![call(Method::POST, EVENTS, echo), write_status(&kvc)],
            ),
        ),
    )
    .await;
    assert_eq!(event_reasons(&seen), ["Awake"]);
    let status = status_written(&seen);
    assert_eq!(
        condition(&status, "Hibernated").expect("condition")["reason"],
        "Awake"
    );
    assert_eq!(status["phase"], "Running");
}

#[tokio::test]
async fn a_waking_node_whose_pod_is_ready_but_does_not_report_is_not_back() {
    let up3 = [NodeState::Up; 3];
    let current = topology(&cluster("{}"), 4, &up3);
    let mut waking = earlier_status("WakingUp", &up3, &[], "{}");
    waking.conditions = vec![
        serde_json::from_value(json!({
            "type": "Hibernated", "status": "False", "reason": "WakingUp",
            "message": "", "lastTransitionTime": ago(30), "observedGeneration": 1
        }))
        .expect("condition"),
    ];
    let kvc = cluster("{}");
    let kvc = with_status(&kvc, &serde_json::to_value(&waking).expect("json"));
    let pods = || (0..3).map(running_pod).collect();

    // Every pod Ready, node 2 not answering: still waking up.
    let reports = report_server(vec![(4, 4, 1.0), (4, 4, 1.0)]).await;
    let (_, seen) = run_with(
        kvc.clone(),
        observe_pods(
            &kvc,
            &current,
            pods(),
            then(apply_objects(), vec![write_status(&kvc)]),
        ),
        Some(reports),
    )
    .await;
    assert_eq!(event_reasons(&seen), Vec::<String>::new());
    let status = status_written(&seen);
    assert_eq!(status["phase"], "WakingUp");
    assert_eq!(status["nodes"][2]["state"], "Recovering");
    let h = condition(&status, "Hibernated").expect("condition");
    assert!(
        h["message"]
            .as_str()
            .is_some_and(|m| m.contains("nodes {2}")),
        "{h}"
    );

    // Node 2 answers: awake, Running.
    let reports = report_server(vec![(4, 4, 1.0); 3]).await;
    let (_, seen) = run_with(
        kvc.clone(),
        observe_pods(
            &kvc,
            &current,
            pods(),
            then(
                apply_objects(),
                vec![call(Method::POST, EVENTS, echo), write_status(&kvc)],
            ),
        ),
        Some(reports),
    )
    .await;
    assert_eq!(event_reasons(&seen), ["Awake"]);
    let status = status_written(&seen);
    assert_eq!(status["phase"], "Running");
    assert_eq!(status["nodes"][2]["state"], "Up");
}

fn restart_requested(spec: &str, at: &str) -> KvCluster {
    let mut kvc = cluster(spec);
    kvc.metadata.annotations = Some(
        [(
            kv_operator::k8s::crd::RESTARTED_AT.to_string(),
            at.to_string(),
        )]
        .into(),
    );
    kvc
}

#[tokio::test]
async fn a_restart_annotation_restarts_one_pod_at_a_time_each_caught_up_before_the_next() {
    let up3 = [NodeState::Up; 3];
    let kvc = restart_requested("{}", "2026-12-03T10:00:00Z");
    let current = topology(&kvc, 4, &up3);
    let kvc = with_status(
        &kvc,
        &serde_json::to_value(earlier_status("Running", &up3, &[], "{}")).expect("json"),
    );
    let old = || {
        (0..3)
            .map(|o| pod_with_uid(o, &format!("old-{o}")))
            .collect::<Vec<_>>()
    };

    // Every node Up and caught up: pod 0 goes first.
    let (reports, _) = report_server_recording(vec![(4, 4, 1.0); 3]).await;
    let (action, seen) = run_with(
        kvc.clone(),
        observe_pods(
            &kvc,
            &current,
            old(),
            then(
                apply_objects(),
                vec![
                    call(Method::DELETE, &format!("{NS}/pods/demo-0"), echo),
                    call(Method::POST, EVENTS, echo),
                    write_status(&kvc),
                ],
            ),
        ),
        Some(reports),
    )
    .await;
    assert_eq!(event_reasons(&seen), ["RestartingNode"]);
    assert_eq!(action, Action::requeue(Duration::from_secs(5)));
    let status = status_written(&seen);
    assert_eq!(
        status["lastRestart"],
        json!({"requestedAt": "2026-12-03T10:00:00Z", "restarted": [],
               "restarting": {"ordinal": 0, "podUid": "old-0"}})
    );
    assert_eq!(
        condition(&status, "Progressing").expect("Progressing")["reason"],
        "Restarting"
    );

    // Pod 0 is back on a new pod but still catching up (synced epoch 3):
    // nothing else is deleted.
    let kvc = with_status(&kvc, &status);
    let mut pods = old();
    pods[0] = pod_with_uid(0, "new-0");
    let (reports, _) = report_server_recording(vec![(4, 3, 0.5), (4, 4, 1.0), (4, 4, 1.0)]).await;
    let p = pods.clone();
    let (_, seen) = run_with(
        kvc.clone(),
        observe_pods(
            &kvc,
            &current,
            p,
            then(apply_objects(), vec![write_status(&kvc)]),
        ),
        Some(reports),
    )
    .await;
    let waiting = status_written(&seen);
    assert!(
        waiting["lastRestart"]["waitingFor"]
            .as_str()
            .is_some_and(|w| w.contains("node 0")),
        "{waiting}"
    );

    // Caught up: node 1 next.
    let (reports, _) = report_server_recording(vec![(4, 4, 1.0); 3]).await;
    let (_, seen) = run_with(
        kvc.clone(),
        observe_pods(
            &kvc,
            &current,
            pods,
            then(
                apply_objects(),
                vec![
                    call(Method::DELETE, &format!("{NS}/pods/demo-1"), echo),
                    call(Method::POST, EVENTS, echo),
                    write_status(&kvc),
                ],
            ),
        ),
        Some(reports),
    )
    .await;
    let status = status_written(&seen);
    assert_eq!(status["lastRestart"]["restarted"], json!([0]));
    assert_eq!(status["lastRestart"]["restarting"]["ordinal"], 1);
}

#[tokio::test]
async fn a_finished_restart_is_recorded_and_the_same_annotation_does_not_restart_again() {
    let up3 = [NodeState::Up; 3];
    let kvc = restart_requested("{}", "r1");
    let current = topology(&kvc, 4, &up3);
    let mut status =
        serde_json::to_value(earlier_status("Running", &up3, &[], "{}")).expect("json");
    status["lastRestart"] = json!({"requestedAt": "r1", "restarted": [0, 1],
        "restarting": {"ordinal": 2, "podUid": "old-2"}});
    let kvc = with_status(&kvc, &status);
    let new = || {
        (0..3)
            .map(|o| pod_with_uid(o, &format!("new-{o}")))
            .collect::<Vec<_>>()
    };
    let (reports, _) = report_server_recording(vec![(4, 4, 1.0); 3]).await;
    let (action, seen) = run_with(
        kvc.clone(),
        observe_pods(
            &kvc,
            &current,
            new(),
            then(
                apply_objects(),
                vec![call(Method::POST, EVENTS, echo), write_status(&kvc)],
            ),
        ),
        Some(reports),
    )
    .await;
    assert_eq!(event_reasons(&seen), ["RestartFinished"]);
    let done = status_written(&seen);
    assert_eq!(done["lastRestart"]["restarted"], json!([0, 1, 2]));
    assert!(done["lastRestart"]["finishedAt"].is_string(), "{done}");
    assert_eq!(action, Action::requeue(Duration::from_secs(60)));

    // The same value again: no pod is deleted, nothing is announced.
    let kvc = with_status(&kvc, &done);
    let (reports, _) = report_server_recording(vec![(4, 4, 1.0); 3]).await;
    let (_, seen) = run_with(
        kvc.clone(),
        observe_pods(
            &kvc,
            &current,
            new(),
            then(apply_objects(), vec![write_status(&kvc)]),
        ),
        Some(reports),
    )
    .await;
    assert_eq!(status_written(&seen)["lastRestart"], done["lastRestart"]);
}

#[tokio::test]
async fn a_restart_waits_while_the_cluster_is_hibernated() {
    let up3 = [NodeState::Up; 3];
    let kvc = restart_requested("{hibernation: true}", "r1");
    let current = topology(&kvc, 4, &up3);
    let kvc = with_status(
        &kvc,
        &serde_json::to_value(earlier_status("Running", &up3, &[], "{}")).expect("json"),
    );
    let (reports, _) = report_server_recording(vec![(4, 4, 1.0); 3]).await;
    let (_, seen) = run_with(
        kvc.clone(),
        observe_pods(
            &kvc,
            &current,
            (0..3).map(|o| pod_with_uid(o, "u")).collect(),
            then(
                apply_objects(),
                vec![
                    call(Method::POST, EVENTS, echo),
                    call(Method::POST, EVENTS, echo),
                    write_status(&kvc),
                ],
            ),
        ),
        Some(reports),
    )
    .await;
    assert_eq!(event_reasons(&seen), ["Hibernated", "RestartRequested"]);
    let status = status_written(&seen);
    assert!(
        status["lastRestart"]["waitingFor"]
            .as_str()
            .is_some_and(|w| w.contains("wake up")),
        "{status}"
    );
}

/// The first calls of a reconcile of `kvc` with `spec.tls.mode: Generated`
/// and both token Secrets there: the reads, ending with the two TLS Secrets
/// answered by `ca` and `tls` (404 when `None`).
fn tls_observe_calls(kvc: &KvCluster, ca: Option<Value>, tls: Option<Value>) -> Vec<Call> {
    let answer =
        |v: Option<Value>| move |_: &Value| v.map_or_else(not_found, |v| (StatusCode::OK, v));
    let t = topology(kvc, 1, &[NodeState::Up; 3]);
    let cm = configmap(kvc, &t);
    vec![
        call(
            Method::GET,
            &format!("{NS}/configmaps/demo-topology"),
            move |_| (StatusCode::OK, cm),
        ),
        call(Method::GET, &format!("{APPS}/statefulsets/demo"), |_| {
            not_found()
        }),
        call(Method::GET, &format!("{NS}/pods"), |_| {
            (StatusCode::OK, pod_list((0..3).map(running_pod).collect()))
        }),
        call(Method::GET, &format!("{NS}/secrets/demo-auth"), |_| {
            (StatusCode::OK, secret())
        }),
        call(
            Method::GET,
            &format!("{NS}/secrets/demo-cluster-auth"),
            |_| (StatusCode::OK, cluster_secret()),
        ),
        call(Method::GET, &format!("{NS}/secrets/demo-ca"), answer(ca)),
        call(Method::GET, &format!("{NS}/secrets/demo-tls"), answer(tls)),
    ]
}

/// The calls after the TLS Secrets' (`writes`): the ConfigMap, the owned
/// objects and the status.
fn tls_apply_calls(kvc: &KvCluster, mut writes: Vec<Call>) -> Vec<Call> {
    writes.extend([
        call(Method::PUT, &format!("{NS}/configmaps/demo-topology"), echo),
        call(Method::PATCH, &format!("{NS}/services/demo-peers"), echo),
        call(Method::PATCH, &format!("{NS}/services/demo"), echo),
        call(Method::PATCH, &format!("{APPS}/statefulsets/demo"), echo),
        call(
            Method::PATCH,
            &format!("{POLICY}/poddisruptionbudgets/demo"),
            echo,
        ),
        call(
            Method::PATCH,
            &format!("{NETWORKING}/networkpolicies/demo"),
            echo,
        ),
        call(
            Method::PATCH,
            &format!("{KVC}/demo/status"),
            status_answer(kvc.clone()),
        ),
    ]);
    writes
}

fn tls_cluster() -> KvCluster {
    cluster("{tls: {mode: Generated}}")
}

fn as_secret(v: &Value) -> k8s_openapi::api::core::v1::Secret {
    serde_json::from_value(v.clone()).expect("a Secret")
}

fn secret_text(s: &k8s_openapi::api::core::v1::Secret, key: &str) -> String {
    let raw = s
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .unwrap_or_else(|| panic!("{key} in the Secret"));
    String::from_utf8(raw.0.clone()).expect("PEM is text")
}

/// Serves `filter` over TLS on loopback with `cert`/`key` (PEM), asking
/// clients for a certificate of `client_ca` (the peer port's mutual TLS).
async fn serve_tls<F>(
    dir: &std::path::Path,
    cert: &str,
    key: &str,
    client_ca: &str,
    filter: F,
) -> std::net::SocketAddr
where
    F: warp::Filter + Clone + Send + Sync + 'static,
    F::Extract: warp::Reply,
{
    let files = kv_net::tls::ServerFiles {
        cert: dir.join("tls.crt"),
        key: dir.join("tls.key"),
        client_ca: Some(dir.join("ca.crt")),
    };
    std::fs::write(&files.cert, cert).expect("write");
    std::fs::write(&files.key, key).expect("write");
    std::fs::write(dir.join("ca.crt"), client_ca).expect("write");
    let tls = kv_net::tls::ServerTls::load(&files).expect("the generated files load");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::watch::channel(false);
    // Held by the server task: the server runs until the test ends.
    tokio::spawn(async move {
        let _stop = stop;
        kv_net::serve_tls("test", filter, listener, Some(tls), stopped).await
    });
    addr
}

#[tokio::test]
async fn a_tls_cluster_gets_a_ca_and_a_certificate_for_every_pod_name_that_a_mutual_tls_server_accepts()
 {
    let kvc = tls_cluster();
    let writes = vec![
        call(Method::POST, &format!("{NS}/secrets"), echo),
        call(Method::POST, &format!("{NS}/secrets"), echo),
    ];
    let (_, seen) = run(kvc.clone(), {
        let mut calls = tls_observe_calls(&kvc, None, None);
        calls.extend(tls_apply_calls(&kvc, writes));
        calls
    })
    .await;
    let (ca, tls) = (as_secret(&seen[7].body), as_secret(&seen[8].body));
    assert_eq!(ca.metadata.name.as_deref(), Some("demo-ca"));
    assert_eq!(tls.metadata.name.as_deref(), Some("demo-tls"));
    let keys = |s: &k8s_openapi::api::core::v1::Secret| -> Vec<String> {
        s.data.iter().flat_map(|d| d.keys().cloned()).collect()
    };
    assert_eq!(keys(&ca), ["ca.crt", "ca.key"]);
    assert_eq!(
        keys(&tls),
        ["ca.crt", "tls.crt", "tls.key"],
        "no CA key beside the nodes' certificate"
    );
    assert_eq!(secret_text(&tls, "ca.crt"), secret_text(&ca, "ca.crt"));

    // The pods mount demo-tls and serve it; probes use HTTPS.
    let sts = &seen[12].body["spec"]["template"]["spec"];
    let args = sts["containers"][0]["args"].as_array().expect("args");
    for flag in [
        "--tls-cert=/etc/kvstore/tls/tls.crt",
        "--tls-key=/etc/kvstore/tls/tls.key",
        "--tls-cluster-ca=/etc/kvstore/tls/ca.crt",
    ] {
        assert!(
            args.iter().any(|a| a == flag),
            "{flag} missing from {args:?}"
        );
    }
    let volume = sts["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == "tls")
        .expect("a tls volume");
    assert_eq!(volume["secret"]["secretName"], "demo-tls");
    assert_eq!(
        sts["containers"][0]["readinessProbe"]["httpGet"]["scheme"],
        "HTTPS"
    );

    // A server with these files, asking for a cluster certificate as the
    // peer port does, accepts the operator's client (trusting the CA only,
    // presenting the certificate) under every pod's DNS names.
    let dir = tempfile::tempdir().expect("a scratch directory");
    use warp::Filter;
    let hello = warp::any().map(|| "hello");
    let addr = serve_tls(
        dir.path(),
        &secret_text(&tls, "tls.crt"),
        &secret_text(&tls, "tls.key"),
        &secret_text(&ca, "ca.crt"),
        hello,
    )
    .await;
    let config = kv_operator::k8s::tls::client_config(&ca, &tls).expect("the operator's client");
    let mut names = Vec::new();
    for o in 0..3 {
        names.push(format!("demo-{o}.demo-peers.ns.svc"));
        names.push(format!("demo-{o}.demo-peers.ns.svc.cluster.local"));
    }
    names.extend([
        "demo.ns.svc".to_string(),
        "demo.ns.svc.cluster.local".to_string(),
    ]);
    let client_for = |name: &str, config: rustls::ClientConfig| {
        reqwest::Client::builder()
            .tls_backend_preconfigured(config)
            .resolve(name, addr)
            .build()
            .expect("client")
    };
    for name in &names {
        let answer = client_for(name, config.clone())
            .get(format!("https://{name}:{}/", addr.port()))
            .send()
            .await
            .unwrap_or_else(|e| panic!("https to {name}: {e:?}"));
        assert_eq!(answer.text().await.expect("body"), "hello", "{name}");
    }
    // A name of a pod the StatefulSet does not run is not certified, and a
    // client without a certificate of the CA is refused.
    let other = "demo-3.demo-peers.ns.svc";
    assert!(
        client_for(other, config.clone())
            .get(format!("https://{other}:{}/", addr.port()))
            .send()
            .await
            .is_err()
    );
    let anonymous = kv_net::tls::client_config_pem(secret_text(&ca, "ca.crt").as_bytes(), None)
        .expect("a client without a certificate");
    let name = "demo-0.demo-peers.ns.svc";
    assert!(
        client_for(name, anonymous)
            .get(format!("https://{name}:{}/", addr.port()))
            .send()
            .await
            .is_err(),
        "mutual TLS refuses a client without a certificate"
    );
}

#[tokio::test]
async fn a_tls_cluster_whose_secrets_are_there_is_called_over_https_with_its_certificate_and_writes_no_secret()
 {
    use kv_operator::k8s::tls;
    use warp::Filter;
    let kvc = tls_cluster();
    let (ca, ca_secret) = tls::new_ca(&kvc).expect("CA");
    let cert = tls::cert_secret(&kvc, &ca, 3, std::time::SystemTime::now()).expect("certificate");
    // The report server: the same CA, named `localhost` (where the test
    // reaches it), asking for a client certificate of the CA.
    let (server_cert, server_key) = ca
        .issue("server", &["localhost"])
        .expect("server certificate");
    let asked: Arc<Mutex<Vec<u32>>> = Arc::default();
    let recorded = asked.clone();
    let reports = warp::get()
        .and(warp::path!(u32 / "v1" / "cluster"))
        .and(warp::header::<String>("authorization"))
        .map(move |ordinal: u32, auth: String| {
            if auth == "Bearer token" {
                recorded.lock().expect("asked").push(ordinal);
            }
            warp::reply::json(&node_report(ordinal, 1, 1, 1.0))
        });
    let dir = tempfile::tempdir().expect("a scratch directory");
    let addr = serve_tls(
        dir.path(),
        &server_cert,
        &server_key,
        ca.cert_pem(),
        reports,
    )
    .await;
    let links = NodeReports {
        http: reqwest::Client::new(),
        url: Box::new(move |_, o| format!("https://localhost:{}/{o}/v1/cluster", addr.port())),
        topology_url: Box::new(move |_, o| {
            format!("https://localhost:{}/{o}/internal/v1/topology", addr.port())
        }),
    };
    let calls = {
        let mut calls = tls_observe_calls(
            &kvc,
            Some(serde_json::to_value(&ca_secret).expect("json")),
            Some(serde_json::to_value(&cert).expect("json")),
        );
        calls.extend(tls_apply_calls(&kvc, vec![]));
        calls
    };
    run_with(kvc.clone(), calls, Some(links)).await;
    let mut asked = asked.lock().expect("asked").clone();
    asked.sort();
    assert_eq!(
        asked,
        [0, 1, 2],
        "every node's report was asked for over mutual TLS with the client token"
    );
}

#[tokio::test]
async fn a_certificate_with_less_than_a_third_of_its_validity_left_is_replaced_in_place_under_the_same_ca()
 {
    use kv_operator::k8s::tls;
    let kvc = tls_cluster();
    let (ca, ca_secret) = tls::new_ca(&kvc).expect("CA");
    let day = std::time::Duration::from_secs(24 * 3600);
    let issued = std::time::SystemTime::now() - 61 * day;
    let mut old = tls::cert_secret(&kvc, &ca, 3, issued).expect("certificate");
    old.metadata.resource_version = Some("41".into());
    let old_cert = secret_text(&old, "tls.crt");
    let writes = vec![call(Method::PUT, &format!("{NS}/secrets/demo-tls"), echo)];
    let (_, seen) = run(kvc.clone(), {
        let mut calls = tls_observe_calls(
            &kvc,
            Some(serde_json::to_value(&ca_secret).expect("json")),
            Some(serde_json::to_value(&old).expect("json")),
        );
        calls.extend(tls_apply_calls(&kvc, writes));
        calls
    })
    .await;
    let renewed = as_secret(&seen[7].body);
    assert_eq!(
        renewed.metadata.resource_version.as_deref(),
        Some("41"),
        "replaced only over the version read"
    );
    assert_ne!(secret_text(&renewed, "tls.crt"), old_cert);
    assert_eq!(
        secret_text(&renewed, "ca.crt"),
        ca.cert_pem(),
        "the CA is kept"
    );
    assert_eq!(
        tls::reissue_reason(
            Some(&renewed),
            ca.cert_pem(),
            3,
            std::time::SystemTime::now()
        ),
        None
    );
}

fn bootstrap_secret() -> Value {
    json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "demo-bootstrap", "namespace": "ns"},
           "data": {"KV_RESTORE_FROM": "ZmlsZTovLy9i"}})
}

#[tokio::test]
async fn a_cluster_started_from_a_backup_hands_the_source_to_its_nodes_before_any_starts() {
    let kvc = cluster(
        "{bootstrap: {fromBackup: {destination: 's3://backups/demo', s3: {endpoint: 'http://127.0.0.1:9000', credentialsSecret: creds}}}}",
    );
    let (_, seen) = run(
        kvc.clone(),
        vec![
            call(
                Method::GET,
                &format!("{NS}/configmaps/demo-topology"),
                |_| not_found(),
            ),
            call(Method::GET, &format!("{APPS}/statefulsets/demo"), |_| {
                not_found()
            }),
            call(Method::GET, &format!("{NS}/pods"), |_| {
                (StatusCode::OK, pod_list(vec![]))
            }),
            call(Method::GET, &format!("{NS}/secrets/demo-auth"), |_| {
                not_found()
            }),
            call(
                Method::GET,
                &format!("{NS}/secrets/demo-cluster-auth"),
                |_| not_found(),
            ),
            call(Method::GET, &format!("{NS}/secrets/demo-bootstrap"), |_| {
                not_found()
            }),
            call(Method::GET, &format!("{NS}/secrets/creds"), |_| {
                (
                    StatusCode::OK,
                    json!({"apiVersion": "v1", "kind": "Secret",
                           "metadata": {"name": "creds", "namespace": "ns"},
                           // "AKID" and "s3cret"
                           "data": {"accessKeyId": "QUtJRA==", "secretAccessKey": "czNjcmV0"}}),
                )
            }),
            call(Method::POST, &format!("{NS}/secrets"), echo),
            call(Method::POST, &format!("{NS}/secrets"), echo),
            call(Method::POST, &format!("{NS}/secrets"), echo),
            call(Method::POST, &format!("{NS}/configmaps"), echo),
            call(Method::PATCH, &format!("{NS}/services/demo-peers"), echo),
            call(Method::PATCH, &format!("{NS}/services/demo"), echo),
            call(Method::PATCH, &format!("{APPS}/statefulsets/demo"), echo),
            call(
                Method::PATCH,
                &format!("{POLICY}/poddisruptionbudgets/demo"),
                echo,
            ),
            call(
                Method::PATCH,
                &format!("{NETWORKING}/networkpolicies/demo"),
                echo,
            ),
            call(
                Method::PATCH,
                &format!("{KVC}/demo/status"),
                status_answer(kvc.clone()),
            ),
        ],
    )
    .await;
    // The source first, then the tokens; the StatefulSet comes later.
    let source = &seen[7].body;
    assert_eq!(source["metadata"]["name"], "demo-bootstrap");
    assert_eq!(
        source["metadata"]["ownerReferences"][0]["uid"], "uid-1",
        "owned: deleted with the cluster"
    );
    let data = |k: &str| {
        let bytes: k8s_openapi::ByteString = serde_json::from_value(source["data"][k].clone())
            .unwrap_or_else(|e| panic!("{k}: {e}"));
        String::from_utf8(bytes.0).expect("utf8")
    };
    assert_eq!(data("KV_RESTORE_FROM"), "s3://backups/demo");
    assert_eq!(data("KV_RESTORE_S3_ENDPOINT"), "http://127.0.0.1:9000");
    assert_eq!(data("KV_RESTORE_S3_ACCESS_KEY_ID"), "AKID");
    assert_eq!(data("KV_RESTORE_S3_SECRET_ACCESS_KEY"), "s3cret");
    let container = &seen[13].body["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        container["envFrom"],
        json!([{"secretRef": {"name": "demo-bootstrap", "optional": true}}]),
        "read while it exists; a pod started after the restore finds none"
    );
    let status = &seen[16].body["status"];
    assert_eq!(status["bootstrap"]["phase"], "Restoring");
    assert_eq!(status["bootstrap"]["source"], "s3://backups/demo");
}

#[tokio::test]
async fn a_cluster_started_from_a_backup_is_restored_once_every_node_is_up_and_the_source_goes() {
    let mut kvc = cluster("{bootstrap: {fromBackup: {destination: 'file:///backups/demo'}}}");
    let current = topology(&kvc, 1, &[NodeState::Up; 3]);
    kvc.status = Some(KvClusterStatus {
        topology_epoch: 1,
        accepted_spec: Some(AcceptedSpec::of(&kvc)),
        bootstrap: Some(
            serde_json::from_value(json!({"phase": "Restoring", "source": "file:///backups/demo"}))
                .expect("status"),
        ),
        ..KvClusterStatus::default()
    });
    let mut calls = reconcile_calls(&kvc, &current, 3, true);
    calls.insert(
        5,
        call(Method::GET, &format!("{NS}/secrets/demo-bootstrap"), |_| {
            (StatusCode::OK, bootstrap_secret())
        }),
    );
    let (_, seen) = run(kvc.clone(), calls).await;
    let event = &seen[seen.len() - 2].body;
    assert_eq!(event["reason"], "Restored", "{event}");
    let status = &seen[seen.len() - 1].body["status"];
    assert_eq!(status["phase"], "Running");
    assert_eq!(status["bootstrap"]["phase"], "Restored", "{status}");
    assert!(status["bootstrap"]["finishedAt"].is_string());

    // The next reconcile deletes the source: a volume replaced from now on
    // is caught up from the peers, never from the backup.
    kvc.status = Some(serde_json::from_value(status.clone()).expect("status"));
    let mut calls = reconcile_calls(&kvc, &current, 3, false);
    calls.insert(
        5,
        call(
            Method::DELETE,
            &format!("{NS}/secrets/demo-bootstrap"),
            |_| (StatusCode::OK, bootstrap_secret()),
        ),
    );
    let (_, seen) = run(kvc.clone(), calls).await;
    let status = &seen[seen.len() - 1].body["status"];
    assert_eq!(status["bootstrap"]["phase"], "Restored");
}

/// A `/v1/digests` body: bucket 7 holding one record of digest `sum`.
fn digests_of(ordinal: u32, epoch: u64, sum: &str) -> Value {
    json!({"nodeId": ordinal, "epoch": epoch, "buckets": {"7": {"digest": sum, "count": 1}}})
}

#[tokio::test]
async fn a_verification_asked_by_annotation_compares_every_owner_and_is_answered_once() {
    let mut kvc = cluster("{}");
    kvc.metadata.annotations = Some(
        [(
            kv_operator::k8s::verify::VERIFY_REQUESTED_AT.to_string(),
            "t1".to_string(),
        )]
        .into_iter()
        .collect(),
    );
    let current = topology(&kvc, 5, &[NodeState::Up; 3]);
    let differing = vec![
        digests_of(0, 5, "ab"),
        digests_of(1, 5, "ab"),
        digests_of(2, 5, "cd"),
    ];
    let (reports, _) = report_server_digests(vec![(5, 5, 1.0); 3], None, vec![], differing).await;
    let (_, seen) = run_with(
        kvc.clone(),
        reconcile_calls(&kvc, &current, 3, true),
        Some(reports),
    )
    .await;
    let event = &seen[seen.len() - 2].body;
    assert_eq!(event["reason"], "VerifyFailed", "{event}");
    assert_eq!(event["type"], "Warning");
    let v = &seen[seen.len() - 1].body["status"]["lastVerify"];
    assert_eq!(v["requestedAt"], "t1");
    assert_eq!(v["epoch"], 5);
    assert_eq!(
        v["bucketsCompared"], 4096,
        "Full: every bucket on all three"
    );
    assert_eq!(v["divergentBuckets"], 1);
    assert_eq!(v["consistent"], false);
    let shown = v["divergent"][0].as_str().expect("one shown");
    assert!(
        shown.starts_with("bucket 7: node 0 holds 1 records") && shown.contains("node 2"),
        "{shown}"
    );

    // Every owner equal, node 1 not answering: its buckets are not verified.
    kvc.metadata.annotations = Some(
        [(
            kv_operator::k8s::verify::VERIFY_REQUESTED_AT.to_string(),
            "t2".to_string(),
        )]
        .into_iter()
        .collect(),
    );
    kvc.status =
        Some(serde_json::from_value(seen[seen.len() - 1].body["status"].clone()).expect("status"));
    let mut silent = digests_of(1, 5, "ab");
    silent["nodeId"] = 0.into(); // answers as another node
    let equal = vec![digests_of(0, 5, "ab"), silent, digests_of(2, 5, "ab")];
    let (reports, _) = report_server_digests(vec![(5, 5, 1.0); 3], None, vec![], equal).await;
    let (_, seen) = run_with(
        kvc.clone(),
        reconcile_calls(&kvc, &current, 3, true),
        Some(reports),
    )
    .await;
    let v = &seen[seen.len() - 1].body["status"]["lastVerify"];
    assert_eq!(v["requestedAt"], "t2");
    assert_eq!(v["divergentBuckets"], 0);
    assert_eq!(v["notChecked"], json!(["node 1: answered as node 0"]));
    assert_eq!(v["consistent"], false);

    // Answered: the same annotation asks for nothing more (no Event, no calls).
    kvc.status =
        Some(serde_json::from_value(seen[seen.len() - 1].body["status"].clone()).expect("status"));
    let equal = vec![
        digests_of(0, 5, "ab"),
        digests_of(1, 5, "ab"),
        digests_of(2, 5, "ab"),
    ];
    let (reports, _) = report_server_digests(vec![(5, 5, 1.0); 3], None, vec![], equal).await;
    let (_, seen) = run_with(
        kvc.clone(),
        reconcile_calls(&kvc, &current, 3, false),
        Some(reports),
    )
    .await;
    assert_eq!(
        seen[seen.len() - 1].body["status"]["lastVerify"]["requestedAt"],
        "t2"
    );

    // A new request with every node answering the same: Verified.
    kvc.metadata.annotations = Some(
        [(
            kv_operator::k8s::verify::VERIFY_REQUESTED_AT.to_string(),
            "t3".to_string(),
        )]
        .into_iter()
        .collect(),
    );
    let equal = vec![
        digests_of(0, 5, "ab"),
        digests_of(1, 5, "ab"),
        digests_of(2, 5, "ab"),
    ];
    let (reports, _) = report_server_digests(vec![(5, 5, 1.0); 3], None, vec![], equal).await;
    let (_, seen) = run_with(
        kvc.clone(),
        reconcile_calls(&kvc, &current, 3, true),
        Some(reports),
    )
    .await;
    assert_eq!(seen[seen.len() - 2].body["reason"], "Verified");
    let v = &seen[seen.len() - 1].body["status"]["lastVerify"];
    assert_eq!(
        (v["requestedAt"].as_str(), v["consistent"].as_bool()),
        (Some("t3"), Some(true))
    );
}
