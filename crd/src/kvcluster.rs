//! The `KvCluster` custom resource (group `kvstore.dev`, version `v1alpha1`).
//!
//! The Rust types are the source of truth: `kv-operator crd` prints the CRD
//! generated from them, which is checked in as `deploy/crd.yaml`. Whatever the
//! API server can check on its own is in the schema (enums, ranges, defaults,
//! CEL rules such as `factor <= replicas`), so a bad spec is refused at
//! `kubectl apply` time. The few rules a schema cannot express are checked by
//! [`KvClusterSpec::validate`] and reported as a condition.
//!
//! The strategy and consistency fields use kv-core's own types, so that the
//! words a user writes in the spec are exactly those of the topology and the
//! node API.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, ResourceRequirements, Toleration, TopologySpreadConstraint,
};
use k8s_openapi::api::networking::v1::NetworkPolicyPeer;
use kube::{CustomResource, KubeSchema};
use kv_core::{Consistency, Strategy};
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// Largest cluster the schema accepts: [`kv_core::MAX_NODES`] (the
/// `range(max = 128)` attributes below must repeat it as a literal; a test
/// checks they agree). Bounds the cost of the CEL rules over `failedNodes`,
/// and is far beyond what one StatefulSet of kvstore nodes needs.
pub const MAX_REPLICAS: u32 = kv_core::MAX_NODES as u32;

/// A kvstore cluster: N nodes of a StatefulSet, replicated by the given
/// strategy and factor, reconciled by kv-operator.
// Every `printcolumn(...)` repeats `type_ = ...`, which clippy mistakes for a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "kvstore.dev",
    version = "v1alpha1",
    kind = "KvCluster",
    namespaced,
    shortname = "kvc",
    category = "kvstore",
    status = "KvClusterStatus",
    derive = "PartialEq",
    doc = "A replicated key-value store cluster managed by kv-operator.",
    // `kubectl scale kvc/demo --replicas=5` rebalances like an edit of spec.replicas.
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.readyReplicas"
    ),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".spec.replicas"),
    printcolumn(
        name = "Factor",
        type_ = "integer",
        json_path = ".spec.replication.factor"
    ),
    printcolumn(
        name = "Strategy",
        type_ = "string",
        json_path = ".spec.replication.strategy"
    ),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new(
    "self.replication.strategy == 'Full' || self.replication.factor <= self.replicas"
).message("replication.factor must not exceed replicas").field_path(".replication.factor"))]
#[x_kube(validation = Rule::new(
    "!has(self.faultInjection) || !has(self.faultInjection.failedNodes) || self.faultInjection.failedNodes.all(o, o < self.replicas)"
).message("every ordinal in faultInjection.failedNodes must be below replicas").field_path(".faultInjection.failedNodes"))]
#[x_kube(validation = Rule::new(
    "!has(self.tls) || has(self.tls.secretName) == (has(self.tls.mode) && self.tls.mode == 'Provided')"
).message("tls.secretName is given exactly when tls.mode is Provided").field_path(".tls.secretName"))]
#[x_kube(validation = Rule::new(
    "has(self.bootstrap) == has(oldSelf.bootstrap) && (!has(self.bootstrap) || self.bootstrap == oldSelf.bootstrap)"
).message("bootstrap is given when the KvCluster is created and cannot change: create another KvCluster").field_path(".bootstrap"))]
#[x_kube(validation = Rule::new(
    "!has(self.bootstrap)\n|| self.bootstrap.fromBackup.destination.startsWith('s3://')\n|| self.bootstrap.fromBackup.destination.startsWith('file:///')"
).message("bootstrap.fromBackup.destination is s3://bucket/prefix or file:///absolute/dir").field_path(".bootstrap.fromBackup.destination"))]
#[serde(rename_all = "camelCase")]
pub struct KvClusterSpec {
    /// Number of kvstore nodes (pods of the StatefulSet, ordinals 0..replicas).
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 1, max = 128))]
    pub replicas: u32,

    /// How keys are spread over the nodes and how many must answer.
    #[serde(default)]
    pub replication: Replication,

    /// The persistent volume of each node (mounted at /data). `size` may
    /// grow: the operator resizes each claim where its storage class allows
    /// expansion (condition `VolumesResized`); it never shrinks. The storage
    /// class cannot change.
    #[serde(default)]
    pub storage: Storage,

    /// Nodes held down on purpose (failure drills).
    #[serde(default, skip_serializing_if = "FaultInjection::is_empty")]
    pub fault_injection: FaultInjection,

    /// kv-node container image.
    #[serde(default = "default_image")]
    #[schemars(length(min = 1))]
    pub image: String,

    /// Pull policy of the kv-node image (Kubernetes' default when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "pull_policy_schema")]
    pub image_pull_policy: Option<ImagePullPolicy>,

    /// CPU and memory of each kv-node container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "open_object")]
    pub resources: Option<ResourceRequirements>,

    /// A Secret (keys `token` and `cluster-token`) that the user manages; each
    /// key is mounted on its own. When absent, the operator generates
    /// `<name>-auth` (`token`) and `<name>-cluster-auth` (`cluster-token`)
    /// once, apart so that a reader of one cannot get the other.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub auth_secret_name: Option<String>,

    /// Pod affinity; when absent, nodes prefer to run on distinct Kubernetes nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "open_object")]
    pub affinity: Option<Affinity>,

    /// Pod tolerations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "open_object_list")]
    pub tolerations: Option<Vec<Toleration>>,

    /// Pod node selector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,

    /// Pod topology spread constraints, as in a pod spec. When absent, the
    /// nodes are spread evenly over zones (`topology.kubernetes.io/zone`,
    /// maxSkew 1) where the scheduler can, so that with factor 3 over three
    /// zones one zone's outage leaves a quorum of every key; `[]` asks for none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "open_object_list")]
    pub topology_spread_constraints: Option<Vec<TopologySpreadConstraint>>,

    /// How long a node may be unreachable before the operator declares it
    /// Failed. Short enough to route around a dead pod quickly, long enough to
    /// ride out a restart.
    #[serde(default = "default_failure_detection_seconds")]
    #[schemars(range(min = 1, max = 3600))]
    pub failure_detection_seconds: u32,

    /// The NetworkPolicy the operator makes for the node pods (on unless
    /// `enabled: false`).
    #[serde(default, skip_serializing_if = "NetworkPolicySettings::is_default")]
    pub network_policy: NetworkPolicySettings,

    /// Stop every pod and keep the volumes (phase `Hibernated`). The
    /// topology is kept as it is, so `false` (or removing it) brings the
    /// same nodes back with their data, without a catch-up. Waits while a
    /// placement change is pending (condition `Hibernated`, reason
    /// `RebalancePending`); other spec changes made meanwhile are carried out
    /// after the wake-up.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hibernation: bool,

    /// Prometheus Operator monitoring of the node pods: a PodMonitor
    /// `<name>` whenever its CRD is installed.
    #[serde(default, skip_serializing_if = "MonitoringSettings::is_default")]
    pub monitoring: MonitoringSettings,

    /// TLS on both ports of every node (`mode: Generated`), or plaintext
    /// (`Disabled`, the default).
    #[serde(default, skip_serializing_if = "TlsSettings::is_off")]
    pub tls: TlsSettings,

    /// Backups on a schedule: a KvBackup made at each time of the cron
    /// expression.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<crate::kvbackup::BackupSchedule>,

    /// How a new cluster starts: from a backup, each node loading the
    /// buckets it keeps before it serves. Given when the KvCluster is
    /// created; it cannot be added, changed or removed afterwards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap: Option<crate::bootstrap::Bootstrap>,
}

/// How the nodes get their certificates.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsSettings {
    /// `Disabled`: plaintext HTTP on both ports. `Generated`: the operator keeps
    /// a cluster CA in the Secret `<name>-ca` (made once, never replaced)
    /// and a certificate for every pod's DNS names in `<name>-tls`, renewed
    /// when less than a third of its validity is left; the nodes serve both
    /// ports over TLS (the peer port mutual TLS) and the operator calls them
    /// over https. `Provided`: the certificate is someone else's (a
    /// cert-manager `Certificate`, which also renews it) in the Secret
    /// `secretName`, with the keys `tls.crt`, `tls.key` and `ca.crt`; it
    /// must name every pod (`<name>-<i>.<name>-peers.<namespace>.svc`, a
    /// wildcard `*.<name>-peers.<namespace>.svc` does) and be good for client
    /// authentication too. The operator checks it (condition `Degraded`,
    /// reason `TlsSecretInvalid`, while it is not) and never writes it.
    #[serde(default)]
    pub mode: TlsMode,
    /// The Secret of the certificate (`mode: Provided` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: Option<String>,
}

impl TlsSettings {
    pub fn is_off(&self) -> bool {
        self.mode == TlsMode::Disabled
    }
}

/// See [`TlsSettings::mode`]. Not `Off`: YAML 1.1 parsers, the API
/// server's among them, read an unquoted `Off` as the boolean false, and the
/// real API server refused the CRD whose default was `Off`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum TlsMode {
    #[default]
    Disabled,
    Generated,
    Provided,
}

/// The PodMonitor of the node pods' `/metrics` (client port), made when the
/// Prometheus Operator's CRDs are installed: every series it scrapes carries
/// `namespace`, `pod` and `kvcluster` labels.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MonitoringSettings {
    /// Make the PodMonitor `<name>`; `false` deletes the one the operator made.
    #[serde(default = "default_true")]
    pub pod_monitor: bool,
    /// Labels of the PodMonitor, e.g. the one a Prometheus selects monitors
    /// by (`release: kube-prometheus-stack`). The operator's own labels win.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Scrape interval, e.g. `30s`; the Prometheus's own when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h))+$"))]
    pub interval: Option<String>,
}

impl Default for MonitoringSettings {
    fn default() -> Self {
        MonitoringSettings {
            pod_monitor: true,
            labels: BTreeMap::new(),
            interval: None,
        }
    }
}

impl MonitoringSettings {
    fn is_default(&self) -> bool {
        *self == MonitoringSettings::default()
    }
}

/// Who may reach the node pods. The peer port (7401) is open only to the
/// cluster's own node pods and to kv-operator's pods (which push
/// topologies there); the client port (7400, also `/metrics`) to the
/// sources below and to kv-operator (which reads node reports there).
/// A policy only fences where the cluster's network plugin enforces it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicySettings {
    /// Make the NetworkPolicy `<name>`; `false` deletes the one the operator made.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Sources allowed on the client port, as NetworkPolicy `from` entries
    /// (`podSelector`, `namespaceSelector`, `ipBlock`). Empty: any source.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "open_object_list")]
    pub client_from: Vec<NetworkPolicyPeer>,
    /// Namespace of the Prometheus that scrapes `/metrics` on the client
    /// port: allowed there too when `clientFrom` restricts it. A
    /// NetworkPolicy cannot tell paths apart, so it reaches the whole
    /// client port (the API still wants the client token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub monitoring_namespace: Option<String>,
}

impl Default for NetworkPolicySettings {
    fn default() -> Self {
        NetworkPolicySettings {
            enabled: true,
            client_from: Vec::new(),
            monitoring_namespace: None,
        }
    }
}

impl NetworkPolicySettings {
    pub fn is_default(&self) -> bool {
        *self == NetworkPolicySettings::default()
    }
}

/// Replication settings; the defaults are SPEC §2's.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Replication {
    /// `Full` (every node holds every key) or `ConsistentHashing` (each key on `factor` nodes).
    #[serde(default = "default_strategy")]
    #[schemars(schema_with = "strategy_schema")]
    pub strategy: Strategy,
    /// Owners of every key with `ConsistentHashing`; ignored by `Full`.
    #[serde(default = "default_factor")]
    #[schemars(range(min = 1, max = 128))]
    pub factor: u32,
    /// Default write consistency (W).
    #[serde(default = "default_consistency")]
    #[schemars(schema_with = "consistency_schema")]
    pub write_consistency: Consistency,
    /// Default read consistency (R).
    #[serde(default = "default_consistency")]
    #[schemars(schema_with = "consistency_schema")]
    pub read_consistency: Consistency,
}

impl Default for Replication {
    fn default() -> Self {
        Replication {
            strategy: default_strategy(),
            factor: default_factor(),
            write_consistency: default_consistency(),
            read_consistency: default_consistency(),
        }
    }
}

/// The persistent volume claim of each node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    // two lines: the CRD's YAML keeps within yamllint's 160 columns
    "has(self.storageClassName) == has(oldSelf.storageClassName)\n&& (!has(self.storageClassName) || self.storageClassName == oldSelf.storageClassName)"
).message("storage.storageClassName is immutable: a claim cannot move to another class"))]
pub struct Storage {
    /// Requested size of each node's volume (a Kubernetes quantity, e.g.
    /// `1Gi`). A larger size resizes the claims (see `VolumesResized`).
    #[serde(default = "default_storage_size")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"))]
    pub size: String,
    /// Storage class of the claims; the cluster's default class when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// What becomes of the nodes' volume claims when the KvCluster is
    /// deleted or scaled down (the StatefulSet's policy of the same name).
    /// Both default to `Retain`: a volume holds the only copy of data
    /// until the cluster has re-replicated it, so deleting is opted into.
    #[serde(default)]
    pub persistent_volume_claim_retention_policy: PvcRetentionPolicy,
}

impl Default for Storage {
    fn default() -> Self {
        Storage {
            size: default_storage_size(),
            storage_class_name: None,
            persistent_volume_claim_retention_policy: PvcRetentionPolicy::default(),
        }
    }
}

/// The StatefulSet PVC retention policy of the nodes' volume claims.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PvcRetentionPolicy {
    /// When the KvCluster (and so its StatefulSet) is deleted.
    #[serde(default)]
    pub when_deleted: RetentionAction,
    /// When a scale-down removes a node: a retained claim is reused by a
    /// later scale-up (the node then rebuilds a store older than the
    /// tombstone grace from its co-owners, SPEC §3).
    #[serde(default)]
    pub when_scaled: RetentionAction,
}

/// Keep or delete a volume claim.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RetentionAction {
    #[default]
    Retain,
    Delete,
}

impl RetentionAction {
    pub fn as_str(self) -> &'static str {
        match self {
            RetentionAction::Retain => "Retain",
            RetentionAction::Delete => "Delete",
        }
    }
}

/// Failure drills: ordinals listed here are deleted and held down (Failed,
/// fenced) until removed from the list, then catch up and become Up again.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FaultInjection {
    /// Ordinals of the nodes to hold down.
    #[serde(default)]
    #[schemars(schema_with = "ordinal_set_schema")]
    pub failed_nodes: Vec<u32>,
}

impl FaultInjection {
    pub fn is_empty(&self) -> bool {
        self.failed_nodes.is_empty()
    }
}

/// The image pull policy of the kv-node container.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ImagePullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl ImagePullPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            ImagePullPolicy::Always => "Always",
            ImagePullPolicy::IfNotPresent => "IfNotPresent",
            ImagePullPolicy::Never => "Never",
        }
    }
}

/// What the operator last saw and decided. Always written with the
/// generation it was computed from (`observedGeneration`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KvClusterStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Nodes whose pod is Ready, i.e. Up with a current topology.
    #[serde(default)]
    pub ready_replicas: u32,
    /// Epoch of the topology in the ConfigMap.
    #[serde(default)]
    pub topology_epoch: u64,
    #[serde(default)]
    pub nodes: Vec<NodeStatus>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The spec the operator carries out: the last one the planner accepted.
    /// While a later edit is refused (condition `SpecRefused`) the operator
    /// keeps reconciling this one, and a restarted operator finds it here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepted_spec: Option<AcceptedSpec>,
    /// The last rolling restart asked for with the annotation
    /// `kvstore.dev/restartedAt`: its progress, and once every node was
    /// restarted, when it finished (the same annotation value then restarts
    /// nothing again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_restart: Option<RestartStatus>,
    /// A cluster started from a backup (`spec.bootstrap`): Restoring until
    /// every node has loaded its buckets and been Up, then Restored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap: Option<crate::bootstrap::BootstrapStatus>,
    /// The last verification asked for with the annotation
    /// `kvstore.dev/verifyRequestedAt` (`kvctl verify --cluster`): every
    /// bucket's owners compared by digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_verify: Option<crate::verify::VerifyStatus>,
}

/// The annotation that asks kv-operator for a rolling restart: any new
/// value (by convention the time of the request, RFC 3339, as `kvctl
/// restart --cluster` writes it) restarts every node once, one at a time.
pub const RESTARTED_AT: &str = "kvstore.dev/restartedAt";

/// A rolling restart: one pod deleted at a time, the next only once the
/// node is back Up, Ready and caught up (it reports the topology's epoch as
/// its synced epoch, and is not rebuilding its store) and every other node
/// is too.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestartStatus {
    /// The value of `kvstore.dev/restartedAt` this restart carries out.
    pub requested_at: String,
    /// Nodes restarted and back Up and caught up, in order.
    #[serde(default)]
    pub restarted: Vec<u32>,
    /// The node being restarted now (its pod deleted), until it is back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restarting: Option<RestartingNode>,
    /// What the restart waits for before it deletes the next pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_for: Option<String>,
    /// When every node had been restarted (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
}

/// The node a rolling restart deleted the pod of.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestartingNode {
    pub ordinal: u32,
    /// The UID of the deleted pod: the node is back on a pod with another UID.
    #[serde(default)]
    pub pod_uid: String,
}

/// The part of a spec the planner decides on (`replicas`, `replication`,
/// `faultInjection`, and the force annotation), as last accepted. The other
/// fields (image, resources, scheduling, hibernation) are never refused by
/// the planner and always come from the current spec.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AcceptedSpec {
    /// The generation whose spec this is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
    /// `spec.replicas` of that generation.
    pub replicas: u32,
    /// `spec.replication` of that generation.
    pub replication: Replication,
    /// `spec.faultInjection` of that generation.
    #[serde(default, skip_serializing_if = "FaultInjection::is_empty")]
    pub fault_injection: FaultInjection,
    /// Planned with force: the annotation kvstore.dev/force-fault-injection was "true".
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force: bool,
}

impl AcceptedSpec {
    /// What `kvc` asks of the planner now, at its current generation.
    pub fn of(kvc: &KvCluster) -> AcceptedSpec {
        AcceptedSpec {
            generation: kvc.metadata.generation,
            replicas: kvc.spec.replicas,
            replication: kvc.spec.replication.clone(),
            fault_injection: kvc.spec.fault_injection.clone(),
            force: kvc.force_fault_injection() == Ok(true),
        }
    }

    /// What this asks of the planner.
    pub fn desired(&self) -> kv_control::planner::Desired {
        let spec = KvClusterSpec {
            replicas: self.replicas,
            replication: self.replication.clone(),
            fault_injection: self.fault_injection.clone(),
            ..KvClusterSpec::default()
        };
        kv_control::planner::Desired {
            force: self.force,
            ..spec.desired()
        }
    }

    /// `kvc` with its planner fields replaced by these: the cluster the
    /// operator builds objects for while a later spec is refused.
    pub fn applied_to(&self, kvc: &KvCluster) -> KvCluster {
        let mut out = kvc.clone();
        out.spec.replicas = self.replicas;
        out.spec.replication = self.replication.clone();
        out.spec.fault_injection = self.fault_injection.clone();
        out
    }
}

impl Default for KvClusterSpec {
    /// The spec of `{}`: every field at its default.
    fn default() -> Self {
        KvClusterSpec {
            replicas: default_replicas(),
            replication: Replication::default(),
            storage: Storage::default(),
            fault_injection: FaultInjection::default(),
            image: default_image(),
            image_pull_policy: None,
            resources: None,
            auth_secret_name: None,
            affinity: None,
            tolerations: None,
            node_selector: None,
            topology_spread_constraints: None,
            failure_detection_seconds: default_failure_detection_seconds(),
            network_policy: NetworkPolicySettings::default(),
            monitoring: MonitoringSettings::default(),
            hibernation: false,
            tls: TlsSettings::default(),
            backup: None,
            bootstrap: None,
        }
    }
}

pub use kv_control::phase::Phase;

/// One node as the operator sees it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    pub ordinal: u32,
    pub pod: String,
    #[schemars(schema_with = "node_state_schema")]
    pub state: kv_core::NodeState,
    /// Catch-up progress (0..1) while Joining or Recovering.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync_progress: Option<f64>,
    /// Since when the node is unreachable (neither running nor reporting),
    /// RFC 3339; absent while it is reachable. The operator's first
    /// observation that found it unreachable (it reconciles on every pod
    /// change, so that is when the pod changed), kept across reconciles and
    /// operator restarts: the node is Failed once it is older than
    /// `spec.failureDetectionSeconds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unreachable_since: Option<String>,
    /// The tokens the node holds, as it last reported them: fingerprints
    /// (first 8 hex digits of SHA-256), never the tokens, each list in its
    /// token file's order (the first is the one it sends). `kvctl
    /// rotate-token --cluster` waits on these; absent while the node does
    /// not report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<TokenFingerprints>,
}

/// See [`NodeStatus::tokens`].
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenFingerprints {
    /// The client port's tokens.
    #[serde(default)]
    pub client: Vec<String>,
    /// The peer port's tokens.
    #[serde(default)]
    pub cluster: Vec<String>,
}

impl From<kv_core::report::TokenFingerprints> for TokenFingerprints {
    fn from(t: kv_core::report::TokenFingerprints) -> Self {
        TokenFingerprints {
            client: t.client,
            cluster: t.cluster,
        }
    }
}

/// A standard Kubernetes condition (`Available`, `Progressing`, `Degraded`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// RFC 3339 time of the last change of `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    pub reason: String,
    #[serde(default)]
    pub message: String,
}

fn default_replicas() -> u32 {
    3
}
fn default_strategy() -> Strategy {
    Strategy::ConsistentHashing
}
fn default_factor() -> u32 {
    3
}
fn default_consistency() -> Consistency {
    Consistency::Quorum
}
fn default_storage_size() -> String {
    "1Gi".to_string()
}
fn default_failure_detection_seconds() -> u32 {
    10
}
fn default_true() -> bool {
    true
}

/// The kv-node image of the same release as this operator.
pub fn default_image() -> String {
    format!("kvstore/kv-node:{}", env!("CARGO_PKG_VERSION"))
}

fn strategy_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"type": "string", "enum": ["Full", "ConsistentHashing"]})
}

fn consistency_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"type": "string", "enum": ["One", "Quorum", "All"]})
}

/// `Option<enum>` would list `null` among the values, which the API server refuses.
fn pull_policy_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"type": "string", "enum": ["Always", "IfNotPresent", "Never"]})
}

/// A set of ordinals: Kubernetes refuses duplicates itself (`listType: set`).
fn ordinal_set_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "maxItems": MAX_REPLICAS,
        "items": {"type": "integer", "minimum": 0, "maximum": MAX_REPLICAS - 1},
        "x-kubernetes-list-type": "set"
    })
}

fn node_state_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"type": "string", "enum": ["Joining", "Up", "Failed", "Recovering", "Leaving"]})
}

/// Core Kubernetes types (resources, affinity) are passed through to the pod
/// template as they are; the API server validates them there. Keeping their
/// full schemas out of the CRD keeps it small and independent of the
/// Kubernetes minor version.
fn open_object(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"type": "object", "x-kubernetes-preserve-unknown-fields": true})
}

fn open_object_list(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}
    })
}

impl KvClusterSpec {
    /// Rules the schema cannot express (or that a CRD installed without the
    /// schema would not enforce). A violation becomes a condition; nothing is applied.
    pub fn validate(&self) -> Result<(), String> {
        if self.replicas == 0 || self.replicas > MAX_REPLICAS {
            return Err(format!(
                "replicas must be 1..={MAX_REPLICAS}, got {}",
                self.replicas
            ));
        }
        let r = &self.replication;
        if r.factor == 0 {
            return Err("replication.factor must be at least 1".into());
        }
        if r.strategy == Strategy::ConsistentHashing && r.factor > self.replicas {
            return Err(format!(
                "replication.factor {} exceeds replicas {}",
                r.factor, self.replicas
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for &o in &self.fault_injection.failed_nodes {
            if o >= self.replicas {
                return Err(format!(
                    "faultInjection.failedNodes names ordinal {o}, but replicas is {}",
                    self.replicas
                ));
            }
            if !seen.insert(o) {
                return Err(format!("faultInjection.failedNodes repeats ordinal {o}"));
            }
        }
        if self.image.trim().is_empty() {
            return Err("image must not be empty".into());
        }
        if !is_quantity(&self.storage.size) {
            return Err(format!(
                "storage.size {:?} is not a Kubernetes quantity",
                self.storage.size
            ));
        }
        Ok(())
    }

    /// What this spec asks of the planner, never forced (see
    /// [`KvCluster::desired`] for the annotation that forces it).
    pub fn desired(&self) -> kv_control::planner::Desired {
        kv_control::planner::Desired {
            replicas: self.replicas,
            strategy: self.replication.strategy,
            factor: self.replication.factor,
            read_consistency: self.replication.read_consistency,
            write_consistency: self.replication.write_consistency,
            failed_nodes: self.fault_injection.failed_nodes.iter().copied().collect(),
            force: false,
            hibernate: self.hibernation,
        }
    }

    /// Nodes that serve every key: all of them with `Full`, else the factor.
    pub fn effective_factor(&self) -> u32 {
        match self.replication.strategy {
            Strategy::Full => self.replicas,
            Strategy::ConsistentHashing => self.replication.factor.min(self.replicas),
        }
    }
}

/// The annotation that lets kv-operator carry out a hold-down the planner
/// would refuse (some key left with fewer live owners than W needs): with
/// the value `"true"` the cluster is planned with [`Desired::force`].
/// `kvctl fail N --cluster NAME --force` sets it; it is an annotation, not a
/// spec field, because it overrides a safety check for a drill rather than
/// describing the cluster.
///
/// [`Desired::force`]: kv_control::planner::Desired::force
pub const FORCE_FAULT_INJECTION: &str = "kvstore.dev/force-fault-injection";

impl KvCluster {
    /// The [`FORCE_FAULT_INJECTION`] annotation: `Ok(true)` for `"true"`,
    /// `Ok(false)` for `"false"` or no annotation, and `Err(value)` for any
    /// other value, which is planned as `false` and reported as invalid.
    pub fn force_fault_injection(&self) -> Result<bool, String> {
        let value = self
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(FORCE_FAULT_INJECTION));
        match value.map(String::as_str) {
            None | Some("false") => Ok(false),
            Some("true") => Ok(true),
            Some(other) => Err(other.to_string()),
        }
    }

    /// What this cluster asks of the planner: its spec, forced when the
    /// [`FORCE_FAULT_INJECTION`] annotation is `"true"`.
    pub fn desired(&self) -> kv_control::planner::Desired {
        kv_control::planner::Desired {
            force: self.force_fault_injection() == Ok(true),
            ..self.spec.desired()
        }
    }

    /// The planner's settings for this cluster: its failure detection time,
    /// and node addresses from the pods' stable DNS names.
    pub fn planner_config(&self) -> kv_control::planner::PlannerConfig {
        let named = self.clone();
        kv_control::planner::PlannerConfig::new(move |o| {
            let n = named.node_info(o, kv_core::NodeState::Up);
            (n.address, n.peer_address)
        })
        .with_failure_detection_ms(
            u64::from(self.spec.failure_detection_seconds).saturating_mul(1000),
        )
    }

    /// The topology's view of node `ordinal`: client and peer addresses by
    /// the pod's DNS name.
    pub fn node_info(&self, ordinal: u32, state: kv_core::NodeState) -> kv_core::NodeInfo {
        crate::names::node_info(self, ordinal, state)
    }
}

fn is_quantity(s: &str) -> bool {
    let digits_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(digits_end);
    num.parse::<f64>().is_ok()
        && !num.starts_with('.')
        // Rust parses "1." as a number; the schema's pattern wants digits after a dot.
        && !num.ends_with('.')
        && matches!(
            suffix,
            "" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei" | "k" | "M" | "G" | "T" | "P" | "E"
        )
}

/// The CRD as YAML, exactly as checked in at `deploy/crd.yaml`.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    use kube::CustomResourceExt;
    serde_yaml::to_string(&KvCluster::crd())
}

/// A new request's value: now, RFC 3339 (what `kvctl restart --cluster`
/// writes; any value the status has not finished works).
pub fn request_now() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> KvClusterSpec {
        serde_yaml::from_str(yaml).expect("test spec parses")
    }

    #[test]
    fn an_empty_spec_gets_the_spec_defaults() {
        let s = spec("{}");
        assert_eq!(s.replicas, 3);
        assert_eq!(s.replication, Replication::default());
        assert_eq!(s.replication.strategy, Strategy::ConsistentHashing);
        assert_eq!(s.replication.factor, 3);
        assert_eq!(s.replication.write_consistency, Consistency::Quorum);
        assert_eq!(s.replication.read_consistency, Consistency::Quorum);
        assert_eq!(s.storage.size, "1Gi");
        assert!(s.fault_injection.is_empty());
        assert_eq!(s.validate(), Ok(()));
    }

    #[test]
    fn a_factor_above_replicas_is_refused_unless_the_strategy_is_full() {
        let s = spec("{replicas: 2, replication: {factor: 3}}");
        assert!(s.validate().unwrap_err().contains("exceeds replicas"));
        let s = spec("{replicas: 2, replication: {strategy: Full, factor: 3}}");
        assert_eq!(s.validate(), Ok(()));
    }

    #[test]
    fn failed_nodes_must_be_distinct_ordinals_in_range() {
        let s = spec("{replicas: 3, faultInjection: {failedNodes: [3]}}");
        assert!(s.validate().unwrap_err().contains("ordinal 3"));
        let s = spec("{replicas: 3, faultInjection: {failedNodes: [1, 1]}}");
        assert!(s.validate().unwrap_err().contains("repeats"));
        let s = spec("{replicas: 3, faultInjection: {failedNodes: [0, 2]}}");
        assert_eq!(s.validate(), Ok(()));
    }

    #[test]
    fn only_the_annotation_value_true_forces_and_other_values_are_invalid() {
        let annotated = |value: Option<&str>| {
            let mut kvc = KvCluster::new("demo", spec("{}"));
            if let Some(v) = value {
                kvc.metadata.annotations =
                    Some([(FORCE_FAULT_INJECTION.to_string(), v.to_string())].into());
            }
            kvc
        };
        assert_eq!(annotated(None).force_fault_injection(), Ok(false));
        assert!(!annotated(None).desired().force);
        assert_eq!(annotated(Some("false")).force_fault_injection(), Ok(false));
        assert_eq!(annotated(Some("true")).force_fault_injection(), Ok(true));
        assert!(annotated(Some("true")).desired().force);
        for invalid in ["True", "yes", "1", ""] {
            let kvc = annotated(Some(invalid));
            assert_eq!(kvc.force_fault_injection(), Err(invalid.to_string()));
            assert!(!kvc.desired().force, "{invalid:?} is planned without force");
        }
        // Everything else comes from the spec.
        let kvc = annotated(Some("true"));
        assert_eq!(
            kvc.desired(),
            kv_control::planner::Desired {
                force: true,
                ..kvc.spec.desired()
            }
        );
    }

    #[test]
    fn storage_sizes_must_be_quantities() {
        for ok in ["1Gi", "500Mi", "10G", "1.5Gi", "1000"] {
            assert!(is_quantity(ok), "{ok}");
        }
        for bad in ["", "Gi", "1 Gi", "1gb", "-1Gi", ".5Gi", "1.", "1.Gi"] {
            assert!(!is_quantity(bad), "{bad}");
        }
    }

    #[test]
    fn the_schema_carries_enums_defaults_and_cel_rules() {
        let yaml = crd_yaml().expect("crd serializes");
        for needle in [
            "- ConsistentHashing",
            "- Quorum",
            "default: 1Gi",
            "self.replication.factor <= self.replicas",
            "failedNodes.all(o, o < self.replicas)",
            "x-kubernetes-validations",
            "shortNames:\n    - kvc",
            "jsonPath: .status.phase",
            "status: {}",
        ] {
            assert!(yaml.contains(needle), "CRD lacks {needle:?}:\n{yaml}");
        }
    }
}
