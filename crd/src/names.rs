//! The names of what a KvCluster owns, its ports, paths and keys: what
//! the operator makes and what kvctl looks up.

use std::collections::BTreeMap;

use kube::ResourceExt;
use kv_core::NodeInfo;

use crate::kvcluster::KvCluster;

/// Client API port of every node (`--listen`), also `/healthz`, `/readyz`, `/metrics`.
pub const CLIENT_PORT: i32 = 7400;
/// Node-to-node API port (`--peer-listen`).
pub const PEER_PORT: i32 = 7401;
/// UID and GID of the kv-node image (`FROM scratch`, user 65532).
pub const NODE_UID: i64 = 65532;
/// Where each node's volume is mounted (`--data-dir`).
pub const DATA_DIR: &str = "/data";
/// Where the topology ConfigMap is mounted; the file is `topology.json`.
pub const TOPOLOGY_DIR: &str = "/etc/kvstore/topology";
/// Where the client token Secret's key `token` is mounted.
pub const SECRET_DIR: &str = "/etc/kvstore/secret";
/// Where the cluster token Secret's key `cluster-token` is mounted.
pub const CLUSTER_SECRET_DIR: &str = "/etc/kvstore/cluster-secret";
/// ConfigMap key of the topology.
pub const TOPOLOGY_KEY: &str = "topology.json";
/// ConfigMap key of the held-down ordinals (`--held-file`): the nodes of
/// `faultInjection.failedNodes`, one a line. A pod that starts while listed
/// waits fenced (kv-node's `held` module): its StatefulSet recreates a
/// deleted pod at once, so deleting it cannot hold a node down alone.
pub const HELD_KEY: &str = "held-down";
/// Secret key of the client bearer token.
pub const TOKEN_KEY: &str = "token";
/// Secret key of the node-to-node bearer token.
pub const CLUSTER_TOKEN_KEY: &str = "cluster-token";
/// `app.kubernetes.io/name` of everything kvstore runs.
pub const APP_NAME: &str = "kvstore";
/// `app.kubernetes.io/managed-by`, and the server-side apply field manager.
pub const MANAGER: &str = "kv-operator";
/// Labels of kv-operator's own pods (deploy/operator.yaml and the chart's
/// `kvstore.operatorSelector`): the NetworkPolicy lets them in.
pub const OPERATOR_POD_LABELS: [(&str, &str); 2] = [
    ("app.kubernetes.io/name", "kv-operator"),
    ("app.kubernetes.io/component", "operator"),
];
/// The label every namespace carries with its own name (Kubernetes ≥ 1.22).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Object names derived from the cluster name.
pub fn statefulset_name(kvc: &KvCluster) -> String {
    kvc.name_any()
}
pub fn peer_service_name(kvc: &KvCluster) -> String {
    format!("{}-peers", kvc.name_any())
}
pub fn client_service_name(kvc: &KvCluster) -> String {
    kvc.name_any()
}
pub fn topology_configmap_name(kvc: &KvCluster) -> String {
    format!("{}-topology", kvc.name_any())
}
/// The Secret of the client token (key `token`): the user's, or the
/// generated one.
pub fn auth_secret_name(kvc: &KvCluster) -> String {
    kvc.spec
        .auth_secret_name
        .clone()
        .unwrap_or_else(|| format!("{}-auth", kvc.name_any()))
}
/// The Secret of the cluster token (key `cluster-token`): the generated
/// `<name>-cluster-auth`, apart from the client's so that a reader of one
/// cannot get the other; a user's `authSecretName` holds both keys.
pub fn cluster_auth_secret_name(kvc: &KvCluster) -> String {
    kvc.spec
        .auth_secret_name
        .clone()
        .unwrap_or_else(|| format!("{}-cluster-auth", kvc.name_any()))
}
pub fn pdb_name(kvc: &KvCluster) -> String {
    kvc.name_any()
}
pub fn network_policy_name(kvc: &KvCluster) -> String {
    kvc.name_any()
}
pub fn pod_name(kvc: &KvCluster, ordinal: u32) -> String {
    format!("{}-{ordinal}", kvc.name_any())
}

/// The stable DNS name of a node's pod through the headless Service. It does
/// not depend on the pod's IP, so a restarted pod keeps its address.
pub fn pod_host(kvc: &KvCluster, ordinal: u32) -> String {
    format!(
        "{}.{}.{}.svc",
        pod_name(kvc, ordinal),
        peer_service_name(kvc),
        namespace(kvc)
    )
}

/// The topology's view of a node: client and peer addresses by DNS name.
pub fn node_info(kvc: &KvCluster, ordinal: u32, state: kv_core::NodeState) -> NodeInfo {
    let host = pod_host(kvc, ordinal);
    NodeInfo {
        ordinal,
        address: format!("{host}:{CLIENT_PORT}"),
        peer_address: format!("{host}:{PEER_PORT}"),
        state,
    }
}

pub fn namespace(kvc: &KvCluster) -> String {
    kvc.namespace().unwrap_or_else(|| "default".to_string())
}

/// Labels that select the node pods of one cluster (immutable in a StatefulSet).
pub fn selector_labels(kvc: &KvCluster) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), APP_NAME.to_string()),
        ("app.kubernetes.io/instance".to_string(), kvc.name_any()),
        (
            "app.kubernetes.io/component".to_string(),
            "node".to_string(),
        ),
    ])
}
