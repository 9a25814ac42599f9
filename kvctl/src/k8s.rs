//! kvctl on Kubernetes: `fail`, `recover` and `nodes` with `--cluster NAME`
//! read or change the `KvCluster` resource instead of talking to a gateway.
//!
//! On Kubernetes the control plane is kv-operator, and what a user asks of it
//! is the KvCluster's spec: holding a node down is an entry in
//! `spec.faultInjection.failedNodes`. So `kvctl fail N --cluster NAME` is a
//! read-modify-write of that list, and `kvctl nodes --cluster NAME` prints
//! the status the operator wrote.
//!
//! `--force` asks kv-operator to carry out a hold-down its planner would
//! refuse (some key left with fewer live owners than W needs). The operator
//! plans a KvCluster with force while its annotation
//! `kvstore.dev/force-fault-injection` is `"true"`, so `fail --force` sets
//! that annotation in the same write that adds the ordinal, and `recover`
//! removes it in the write that leaves no node held down (until then the
//! forced hold-downs may still depend on it).
//!
//! The decisions are pure functions of the resource, tested on their own:
//! the new list and annotation ([`hold_down`], [`release`], [`Change`]),
//! whether a hold-down is refused
//! ([`check_fail`], the planner's own check, exactly as the operator and the
//! local gateway run it), and the renderings. The API calls go through a
//! [`Target`] built on any [`kube::Client`], so tests can hand it a mocked one.
//!
//! A write never loses a concurrent change: the merge patch carries the
//! `metadata.resourceVersion` it was computed from, which the API server
//! takes as a precondition (409 Conflict when the object changed since); on a
//! conflict the resource is read again, the decision made again on what is
//! there now, and the write retried, at most [`MAX_ATTEMPTS`] times.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use kube::config::{Config, KubeConfigOptions};
use kube::{Client, ResourceExt};
use kv_core::{NodeState, Topology};
use kv_operator::k8s::crd::{FORCE_FAULT_INJECTION, KvCluster};
use kv_operator::planner::{self, Observed};
use serde::Serialize;
use serde_json::{Value, json};

use crate::output::{self, NodeRow};

/// Reads and writes of one `fail` or `recover`, when every write meets a
/// concurrent change (409 Conflict).
pub const MAX_ATTEMPTS: usize = 5;

/// The field manager kvctl's writes are recorded under (`managedFields`).
pub const FIELD_MANAGER: &str = "kvctl";

/// The resource, as RBAC rules name it.
const RESOURCE: &str = "kvclusters.kvstore.dev";

/// Why a `--cluster` command did nothing.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error(
        "cannot find a Kubernetes configuration (looked for KUBECONFIG, ~/.kube/config and an in-cluster service account): {0}"
    )]
    NoConfig(String),
    #[error("cannot use the kubeconfig context {context:?}: {detail}")]
    Context { context: String, detail: String },
    #[error("cannot set up a Kubernetes client: {0}")]
    Client(String),
    #[error("KvCluster {name} not found in namespace {namespace}")]
    NotFound { name: String, namespace: String },
    #[error(
        "forbidden: kvctl needs the RBAC verb \"{verb}\" on {RESOURCE} in namespace {namespace} (the API server said: {message})"
    )]
    Forbidden {
        verb: &'static str,
        namespace: String,
        message: String,
    },
    #[error(
        "the Kubernetes API server did not accept kvctl's credentials (401 Unauthorized): check the user of the kubeconfig context, or log in again ({message})"
    )]
    Unauthorized { message: String },
    #[error(
        "node {node} is not a node of KvCluster {name} (spec.replicas is {replicas}: ordinals 0..{replicas})"
    )]
    NoSuchNode {
        node: u32,
        name: String,
        replicas: u32,
    },
    /// The planner's refusal, in its own words (the local gateway's too).
    #[error("{0}")]
    Refused(String),
    #[error(
        "KvCluster {name} in namespace {namespace} changed under each of {attempts} attempts to write it (409 Conflict); nothing was changed, try again"
    )]
    Conflict {
        name: String,
        namespace: String,
        attempts: usize,
    },
    #[error(
        "the Kubernetes API server refused to {verb} KvCluster {name}: {message} ({code} {reason})"
    )]
    Api {
        verb: &'static str,
        name: String,
        code: u16,
        reason: String,
        message: String,
    },
    #[error("cannot {verb} KvCluster {name} through the Kubernetes API{at}: {detail}")]
    Transport {
        verb: &'static str,
        name: String,
        /// " at <url>" when the URL is known.
        at: String,
        detail: String,
    },
    #[error("no answer from the Kubernetes API server at {url} within {secs}s")]
    Timeout { url: String, secs: f64 },
    #[error("KvCluster {0} has no metadata.resourceVersion; cannot write it safely")]
    NoResourceVersion(String),
}

/// One KvCluster, through the API of the client it was built with.
pub struct Target {
    api: Api<KvCluster>,
    name: String,
    namespace: String,
    /// The API server's URL, for messages ("" when not known).
    url: String,
}

/// What `fail` or `recover` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Outcome {
    pub cluster: String,
    pub namespace: String,
    /// `fail` or `recover`.
    pub action: &'static str,
    pub node: u32,
    /// Whether failedNodes was written (false: it already said so).
    pub changed: bool,
    /// failedNodes as read before the write that took effect.
    pub failed_nodes_before: Vec<u32>,
    /// failedNodes as the API server stored it.
    pub failed_nodes: Vec<u32>,
    /// The `kvstore.dev/force-fault-injection` annotation as read before
    /// the write that took effect (`None`: absent).
    pub force_annotation_before: Option<String>,
    /// The annotation as the API server stored it.
    pub force_annotation: Option<String>,
    /// Reads of the resource it took (more than 1 after a 409 Conflict).
    pub attempts: usize,
}

impl Target {
    /// The KvCluster `name` in `namespace`, through `client`.
    pub fn new(client: Client, namespace: &str, name: &str) -> Target {
        Target {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            namespace: namespace.to_string(),
            url: String::new(),
        }
    }

    /// Finds the kubeconfig as kubectl does (`--context` picks a context of
    /// it); the namespace defaults to the context's, else "default".
    pub async fn connect(
        context: Option<&str>,
        namespace: Option<&str>,
        name: &str,
        timeout: Duration,
    ) -> Result<Target, KubeError> {
        let mut config = match context {
            None => Config::infer()
                .await
                .map_err(|e| KubeError::NoConfig(error_chain(&e)))?,
            Some(c) => {
                let options = KubeConfigOptions {
                    context: Some(c.to_string()),
                    ..KubeConfigOptions::default()
                };
                Config::from_kubeconfig(&options)
                    .await
                    .map_err(|e| KubeError::Context {
                        context: c.to_string(),
                        detail: error_chain(&e),
                    })?
            }
        };
        config.connect_timeout = Some(timeout);
        config.read_timeout = Some(timeout);
        let namespace = match namespace {
            Some(ns) => ns.to_string(),
            None if config.default_namespace.is_empty() => "default".to_string(),
            None => config.default_namespace.clone(),
        };
        let url = config.cluster_url.to_string();
        let client = Client::try_from(config).map_err(|e| KubeError::Client(error_chain(&e)))?;
        let mut target = Target::new(client, &namespace, name);
        target.url = url;
        Ok(target)
    }

    /// Bounds `what` (a call on this target) by `timeout`.
    pub async fn within<T>(
        &self,
        timeout: Duration,
        what: impl std::future::Future<Output = Result<T, KubeError>>,
    ) -> Result<T, KubeError> {
        match tokio::time::timeout(timeout, what).await {
            Ok(r) => r,
            Err(_) => Err(KubeError::Timeout {
                url: if self.url.is_empty() {
                    "(unknown)".into()
                } else {
                    self.url.clone()
                },
                secs: timeout.as_secs_f64(),
            }),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The KvCluster as stored, status included.
    pub async fn get(&self) -> Result<KvCluster, KubeError> {
        self.api
            .get(&self.name)
            .await
            .map_err(|e| self.error("get", e))
    }

    /// Hold node `node` down: add it to spec.faultInjection.failedNodes;
    /// with `force`, also set the force annotation (see [`fail_change`]).
    pub async fn fail(&self, node: u32, force: bool) -> Result<Outcome, KubeError> {
        self.update("fail", node, |kvc| fail_change(kvc, node, force))
            .await
    }

    /// Release node `node`: remove it from spec.faultInjection.failedNodes,
    /// and the force annotation with the last one (see [`recover_change`]).
    pub async fn recover(&self, node: u32) -> Result<Outcome, KubeError> {
        self.update("recover", node, |kvc| recover_change(kvc, node))
            .await
    }

    /// Read, decide on what was read, write with that read's resourceVersion
    /// as precondition; on 409 Conflict start over.
    async fn update(
        &self,
        action: &'static str,
        node: u32,
        decide: impl Fn(&KvCluster) -> Result<Change, KubeError>,
    ) -> Result<Outcome, KubeError> {
        for attempt in 1..=MAX_ATTEMPTS {
            let kvc = self.get().await?;
            let before = kvc.spec.fault_injection.failed_nodes.clone();
            let annotation_before = force_annotation(&kvc);
            let change = decide(&kvc)?;
            let mut outcome = Outcome {
                cluster: self.name.clone(),
                namespace: self.namespace.clone(),
                action,
                node,
                changed: false,
                failed_nodes_before: before.clone(),
                failed_nodes: before.clone(),
                force_annotation_before: annotation_before.clone(),
                force_annotation: annotation_before,
                attempts: attempt,
            };
            if change.failed_nodes == before && change.force == ForceEdit::Keep {
                return Ok(outcome);
            }
            let rv = kvc
                .resource_version()
                .ok_or_else(|| KubeError::NoResourceVersion(self.name.clone()))?;
            let params = PatchParams {
                field_manager: Some(FIELD_MANAGER.to_string()),
                ..PatchParams::default()
            };
            let patch = fault_injection_patch(&rv, &change);
            match self
                .api
                .patch(&self.name, &params, &Patch::Merge(&patch))
                .await
            {
                Ok(stored) => {
                    outcome.changed = true;
                    outcome.force_annotation = force_annotation(&stored);
                    outcome.failed_nodes = stored.spec.fault_injection.failed_nodes;
                    return Ok(outcome);
                }
                Err(kube::Error::Api(s)) if s.code == 409 => continue,
                Err(e) => return Err(self.error("patch", e)),
            }
        }
        Err(KubeError::Conflict {
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            attempts: MAX_ATTEMPTS,
        })
    }

    fn error(&self, verb: &'static str, e: kube::Error) -> KubeError {
        match e {
            kube::Error::Api(s) if s.code == 404 => KubeError::NotFound {
                name: self.name.clone(),
                namespace: self.namespace.clone(),
            },
            kube::Error::Api(s) if s.code == 401 => KubeError::Unauthorized { message: s.message },
            kube::Error::Api(s) if s.code == 403 => KubeError::Forbidden {
                verb,
                namespace: self.namespace.clone(),
                message: s.message,
            },
            kube::Error::Api(s) => KubeError::Api {
                verb,
                name: self.name.clone(),
                code: s.code,
                reason: s.reason,
                message: s.message,
            },
            other => KubeError::Transport {
                verb,
                name: self.name.clone(),
                at: if self.url.is_empty() {
                    String::new()
                } else {
                    format!(" at {}", self.url)
                },
                detail: error_chain(&other),
            },
        }
    }
}

/// An error and its sources on one line (kube's errors nest the cause).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !s.contains(&text) {
            let _ = write!(s, ": {text}");
        }
        cause = c.source();
    }
    s
}

/// What a write does to the `kvstore.dev/force-fault-injection` annotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForceEdit {
    /// Leave it as it is (absent, or whatever value it has).
    Keep,
    /// Set it to `"true"`: kv-operator plans the cluster with force.
    Set,
    /// Remove it: kv-operator plans the cluster without force.
    Remove,
}

/// What one `fail` or `recover` makes of the KvCluster it read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The whole new spec.faultInjection.failedNodes.
    pub failed_nodes: Vec<u32>,
    pub force: ForceEdit,
}

/// The force annotation's value, if the resource has it.
pub fn force_annotation(kvc: &KvCluster) -> Option<String> {
    kvc.annotations().get(FORCE_FAULT_INJECTION).cloned()
}

/// `fail N [--force]`: N added to failedNodes once the planner's check
/// passes ([`check_fail`]); with `force`, the annotation set to `"true"` in
/// the same write unless it already is. With `force`, a node already held
/// down still gets the annotation: that is how a hold-down the operator
/// refused (condition Refused) is pushed through.
pub fn fail_change(kvc: &KvCluster, node: u32, force: bool) -> Result<Change, KubeError> {
    check_fail(kvc, node, force)?;
    let already = force_annotation(kvc).as_deref() == Some("true");
    Ok(Change {
        failed_nodes: hold_down(&kvc.spec.fault_injection.failed_nodes, node),
        force: if force && !already {
            ForceEdit::Set
        } else {
            ForceEdit::Keep
        },
    })
}

/// `recover N`: N removed from failedNodes. When no node is left held down,
/// the force annotation (any value) goes in the same write: it has nothing
/// left to force, and kept it would silently waive the W check for the next
/// hold-down, whoever adds it (`kubectl edit`, a GitOps sync). While other
/// nodes are still held down it stays, since their hold-downs may depend on
/// it (a topology rebuilt from scratch is checked again).
pub fn recover_change(kvc: &KvCluster, node: u32) -> Result<Change, KubeError> {
    let current = &kvc.spec.fault_injection.failed_nodes;
    if node >= kvc.spec.replicas && !current.contains(&node) {
        return Err(no_such_node(kvc, node));
    }
    let failed_nodes = release(current, node);
    let force = if failed_nodes.is_empty() && force_annotation(kvc).is_some() {
        ForceEdit::Remove
    } else {
        ForceEdit::Keep
    };
    Ok(Change {
        failed_nodes,
        force,
    })
}

/// The merge patch of `fail` and `recover`: the resourceVersion it was
/// computed from, which the API server checks, the whole new list, and the
/// force annotation when it changes (`null` removes it, RFC 7386).
pub fn fault_injection_patch(resource_version: &str, change: &Change) -> Value {
    let mut metadata = json!({"resourceVersion": resource_version});
    match change.force {
        ForceEdit::Keep => {}
        ForceEdit::Set => metadata["annotations"] = json!({FORCE_FAULT_INJECTION: "true"}),
        ForceEdit::Remove => metadata["annotations"] = json!({FORCE_FAULT_INJECTION: null}),
    }
    json!({
        "metadata": metadata,
        "spec": {"faultInjection": {"failedNodes": change.failed_nodes}},
    })
}

/// failedNodes with `node` added (at the end, the others untouched).
pub fn hold_down(current: &[u32], node: u32) -> Vec<u32> {
    let mut next = current.to_vec();
    if !next.contains(&node) {
        next.push(node);
    }
    next
}

/// failedNodes without `node`.
pub fn release(current: &[u32], node: u32) -> Vec<u32> {
    current.iter().copied().filter(|&o| o != node).collect()
}

fn no_such_node(kvc: &KvCluster, node: u32) -> KubeError {
    KubeError::NoSuchNode {
        node,
        name: kvc.name_any(),
        replicas: kvc.spec.replicas,
    }
}

/// Whether holding `node` down is refused: an ordinal outside the cluster
/// (even with `force`), or whatever the planner refuses for the spec with
/// `node` added and the given `force`, planned against the topology the
/// status shows. That is the operator's own check and the one the local
/// gateway runs: without force, a hold-down that would leave some key with
/// fewer than W live owners is refused. An ordinal already held down is not
/// checked again.
pub fn check_fail(kvc: &KvCluster, node: u32, force: bool) -> Result<(), KubeError> {
    if node >= kvc.spec.replicas {
        return Err(no_such_node(kvc, node));
    }
    if kvc.spec.fault_injection.failed_nodes.contains(&node) {
        return Ok(());
    }
    let mut desired = kvc.spec.desired();
    desired.failed_nodes.insert(node);
    let observed = observed_from_status(kvc);
    let config = kvc.planner_config();
    let Some(refusal) = planner::plan(&desired, &observed, &config).refusal else {
        return Ok(());
    };
    if !force {
        return Err(KubeError::Refused(refusal.reason));
    }
    desired.force = true;
    match planner::plan(&desired, &observed, &config).refusal {
        None => Ok(()),
        Some(r) => Err(KubeError::Refused(r.reason)),
    }
}

/// What the planner would observe, as far as the status shows it: the
/// topology (its epoch and node states; the placement of the spec), no node
/// reports. Enough for the planner's checks of a request, which depend only
/// on the spec, the placement and which nodes are Failed.
pub fn observed_from_status(kvc: &KvCluster) -> Observed {
    let topology = status_topology(kvc);
    Observed {
        cluster_id: cluster_id(kvc),
        epoch_floor: topology.epoch,
        topology: Some(topology).filter(|t| t.validate().is_ok()),
        now_ms: 0,
        nodes: BTreeMap::new(),
    }
}

fn cluster_id(kvc: &KvCluster) -> String {
    format!(
        "{}/{}",
        kvc.namespace().unwrap_or_else(|| "default".into()),
        kvc.name_any()
    )
}

/// The topology as the status shows it: epoch and node states from the
/// status, placement and consistency levels from the spec (the status does
/// not carry the committed placement; they differ only while Rebalancing).
pub fn status_topology(kvc: &KvCluster) -> Topology {
    let status = kvc.status.clone().unwrap_or_default();
    let mut nodes: Vec<_> = status
        .nodes
        .iter()
        .map(|n| kvc.node_info(n.ordinal, n.state))
        .collect();
    nodes.sort_by_key(|n| n.ordinal);
    nodes.dedup_by_key(|n| n.ordinal);
    let r = &kvc.spec.replication;
    Topology {
        cluster_id: cluster_id(kvc),
        epoch: status.topology_epoch,
        read_consistency: r.read_consistency,
        write_consistency: r.write_consistency,
        placement: kvc.spec.desired().placement(),
        pending: None,
        nodes,
    }
}

/// The rows of `kvctl nodes`, from the status: the operator's view of each
/// node. A Failed node shows as unreachable, as it does locally.
pub fn node_rows(kvc: &KvCluster) -> Vec<NodeRow> {
    let mut rows: Vec<NodeRow> = kvc
        .status
        .as_ref()
        .map(|s| s.nodes.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|n| NodeRow {
            ordinal: n.ordinal,
            address: kvc.node_info(n.ordinal, n.state).address,
            state: n.state,
            reachable: n.state != NodeState::Failed,
            resync_progress: n.resync_progress,
            synced_epoch: None,
            hints_pending: None,
            error: None,
        })
        .collect();
    rows.sort_by_key(|r| r.ordinal);
    rows
}

fn ordinals(list: &[u32]) -> String {
    let items: Vec<String> = list.iter().map(u32::to_string).collect();
    format!("[{}]", items.join(", "))
}

/// `kvctl nodes --cluster NAME`: the local table, with the KvCluster's
/// phase, held-down nodes and conditions.
pub fn render_nodes(kvc: &KvCluster) -> String {
    let status = kvc.status.clone().unwrap_or_default();
    let mut out = String::new();
    let phase = status.phase.map_or("(none yet)", |p| p.as_str());
    let _ = writeln!(
        out,
        "KvCluster {}  phase {phase}  ready {}/{}  failedNodes {}",
        cluster_id(kvc),
        status.ready_replicas,
        kvc.spec.replicas,
        ordinals(&kvc.spec.fault_injection.failed_nodes)
    );
    if let Some(note) = staleness(kvc) {
        let _ = writeln!(out, "{note}");
    }
    out.push_str(&output::render_nodes(
        &status_topology(kvc),
        &node_rows(kvc),
    ));
    if status.nodes.is_empty() {
        out.push_str("(the status lists no nodes yet)\n");
    }
    if !status.conditions.is_empty() {
        let cells: Vec<Vec<String>> = status
            .conditions
            .iter()
            .map(|c| {
                vec![
                    format!("  {}={}", c.type_, c.status),
                    c.reason.clone(),
                    c.message.clone(),
                ]
            })
            .collect();
        out.push_str("conditions:\n");
        out.push_str(&output::table(&cells));
    }
    out
}

/// A note when the status predates the spec (the operator has not
/// reconciled the last change yet).
fn staleness(kvc: &KvCluster) -> Option<String> {
    let generation = kvc.metadata.generation?;
    let observed = kvc.status.as_ref().and_then(|s| s.observed_generation);
    match observed {
        Some(o) if o >= generation => None,
        Some(o) => Some(format!(
            "the status is from generation {o}, the spec is at generation {generation}: kv-operator has not reconciled the last change yet"
        )),
        None => Some(format!(
            "kv-operator has not written a status for generation {generation} yet"
        )),
    }
}

/// `kvctl nodes --cluster NAME -o json`: the local command's keys, plus the
/// KvCluster's phase, held-down nodes and conditions.
pub fn nodes_json(kvc: &KvCluster) -> Value {
    let status = kvc.status.clone().unwrap_or_default();
    let mut out = crate::output::nodes_json(&status_topology(kvc), &node_rows(kvc));
    let extra = json!({
        "kvcluster": kvc.name_any(),
        "namespace": kvc.namespace(),
        "phase": status.phase,
        "replicas": kvc.spec.replicas,
        "readyReplicas": status.ready_replicas,
        "failedNodes": kvc.spec.fault_injection.failed_nodes,
        "generation": kvc.metadata.generation,
        "observedGeneration": status.observed_generation,
        "conditions": status.conditions,
    });
    if let (Some(fields), Value::Object(extra)) = (out.as_object_mut(), extra) {
        fields.extend(extra);
    }
    out
}

/// `kvctl fail|recover N --cluster NAME`: what changed and the resulting list.
pub fn render_outcome(o: &Outcome) -> String {
    let who = format!("KvCluster {}/{}", o.namespace, o.cluster);
    let list = ordinals(&o.failed_nodes);
    let what = match (o.action, o.changed) {
        ("fail", true) => format!(
            "node {} added to spec.faultInjection.failedNodes: kv-operator deletes its pod and holds it Failed until recovered",
            o.node
        ),
        ("fail", false) => format!(
            "node {} is already held down (in spec.faultInjection.failedNodes); nothing changed",
            o.node
        ),
        (_, true) => format!(
            "node {} removed from spec.faultInjection.failedNodes: it restarts, catches up (Recovering), then is Up",
            o.node
        ),
        (_, false) => format!(
            "node {} is not held down (not in spec.faultInjection.failedNodes); nothing changed",
            o.node
        ),
    };
    let mut out = format!("{who}: {what}\nfailedNodes: {list}\n");
    let removal = format!(
        "kubectl annotate kvc {} -n {} {FORCE_FAULT_INJECTION}-",
        o.cluster, o.namespace
    );
    match (&o.force_annotation_before, &o.force_annotation) {
        (before, Some(v)) if before != &o.force_annotation => {
            let _ = writeln!(
                out,
                "annotation {FORCE_FAULT_INJECTION}={v:?} set: kv-operator plans this KvCluster with force and holds nodes down even when some keys are left with fewer live owners than writes need; recovering the last held-down node removes it (or: {removal})"
            );
        }
        (Some(_), None) => {
            let _ = writeln!(
                out,
                "annotation {FORCE_FAULT_INJECTION} removed: no node is held down, kv-operator plans without force again"
            );
        }
        (_, Some(v)) => {
            let _ = writeln!(
                out,
                "annotation {FORCE_FAULT_INJECTION}={v:?} remains until the last held-down node is recovered; remove it now with: {removal}"
            );
        }
        (None, None) => {}
    }
    if o.attempts > 1 {
        let _ = writeln!(
            out,
            "(the resource changed while kvctl wrote it; read it again and retried {} time(s))",
            o.attempts - 1
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use kv_operator::k8s::crd::{Condition, KvClusterStatus, NodeStatus, Phase};

    fn cluster(spec_yaml: &str, states: &[NodeState]) -> KvCluster {
        let mut kvc = KvCluster::new("demo", serde_yaml::from_str(spec_yaml).expect("spec"));
        kvc.metadata.namespace = Some("ns".into());
        kvc.metadata.generation = Some(3);
        kvc.status = Some(KvClusterStatus {
            phase: Some(Phase::Running),
            observed_generation: Some(3),
            ready_replicas: states.iter().filter(|s| **s == NodeState::Up).count() as u32,
            topology_epoch: 7,
            nodes: states
                .iter()
                .enumerate()
                .map(|(i, s)| NodeStatus {
                    ordinal: i as u32,
                    pod: format!("demo-{i}"),
                    state: *s,
                    resync_progress: None,
                    unreachable_since: None,
                })
                .collect(),
            conditions: vec![],
            accepted_spec: None,
        });
        kvc
    }

    const UP3: [NodeState; 3] = [NodeState::Up, NodeState::Up, NodeState::Up];

    #[test]
    fn hold_down_appends_once_and_release_removes_every_copy() {
        assert_eq!(hold_down(&[], 1), vec![1]);
        assert_eq!(hold_down(&[2], 0), vec![2, 0]);
        assert_eq!(hold_down(&[2, 0], 0), vec![2, 0]);
        assert_eq!(release(&[2, 0], 2), vec![0]);
        assert_eq!(release(&[0], 2), vec![0]);
        assert_eq!(release(&[1, 1], 1), Vec::<u32>::new());
    }

    fn change(failed_nodes: &[u32], force: ForceEdit) -> Change {
        Change {
            failed_nodes: failed_nodes.to_vec(),
            force,
        }
    }

    fn annotate(kvc: &mut KvCluster, value: &str) {
        kvc.metadata.annotations =
            Some([(FORCE_FAULT_INJECTION.to_string(), value.to_string())].into());
    }

    #[test]
    fn the_patch_carries_the_resource_version_it_was_computed_from() {
        assert_eq!(
            fault_injection_patch("41", &change(&[1, 2], ForceEdit::Keep)),
            json!({"metadata": {"resourceVersion": "41"},
                   "spec": {"faultInjection": {"failedNodes": [1, 2]}}})
        );
        assert_eq!(
            fault_injection_patch("9", &change(&[], ForceEdit::Keep))["spec"]["faultInjection"]["failedNodes"],
            json!([])
        );
    }

    #[test]
    fn the_patch_sets_or_removes_the_force_annotation_next_to_the_list() {
        assert_eq!(
            fault_injection_patch("41", &change(&[1, 2], ForceEdit::Set)),
            json!({"metadata": {"resourceVersion": "41",
                                "annotations": {"kvstore.dev/force-fault-injection": "true"}},
                   "spec": {"faultInjection": {"failedNodes": [1, 2]}}})
        );
        assert_eq!(
            fault_injection_patch("42", &change(&[], ForceEdit::Remove)),
            json!({"metadata": {"resourceVersion": "42",
                                "annotations": {"kvstore.dev/force-fault-injection": null}},
                   "spec": {"faultInjection": {"failedNodes": []}}})
        );
    }

    #[test]
    fn fail_with_force_sets_the_annotation_once_and_without_force_leaves_it() {
        let mut kvc = cluster(
            "{replicas: 3, faultInjection: {failedNodes: [1]}}",
            &[NodeState::Up, NodeState::Failed, NodeState::Up],
        );
        assert_eq!(
            fail_change(&kvc, 2, true).expect("forced"),
            change(&[1, 2], ForceEdit::Set)
        );
        // A node already held down (perhaps refused by the operator) gets the
        // annotation with the same list.
        assert_eq!(
            fail_change(&kvc, 1, true).expect("forced"),
            change(&[1], ForceEdit::Set)
        );
        assert_eq!(
            fail_change(&kvc, 1, false).expect("already held down"),
            change(&[1], ForceEdit::Keep)
        );
        annotate(&mut kvc, "true");
        assert_eq!(
            fail_change(&kvc, 2, true).expect("forced"),
            change(&[1, 2], ForceEdit::Keep)
        );
        annotate(&mut kvc, "yes");
        assert_eq!(
            fail_change(&kvc, 2, true).expect("forced"),
            change(&[1, 2], ForceEdit::Set),
            "an invalid value is replaced by \"true\""
        );
    }

    #[test]
    fn recover_removes_the_annotation_only_with_the_last_held_down_node() {
        let mut kvc = cluster(
            "{replicas: 3, faultInjection: {failedNodes: [0, 2]}}",
            &[NodeState::Failed, NodeState::Up, NodeState::Failed],
        );
        assert_eq!(
            recover_change(&kvc, 0).expect("recover"),
            change(&[2], ForceEdit::Keep)
        );
        assert_eq!(
            recover_change(&kvc, 2).expect("recover"),
            change(&[0], ForceEdit::Keep)
        );
        annotate(&mut kvc, "true");
        assert_eq!(
            recover_change(&kvc, 0).expect("recover"),
            change(&[2], ForceEdit::Keep),
            "node 2 may still need the force"
        );
        kvc.spec.fault_injection.failed_nodes = vec![2];
        assert_eq!(
            recover_change(&kvc, 2).expect("recover"),
            change(&[], ForceEdit::Remove)
        );
        kvc.spec.fault_injection.failed_nodes = vec![];
        annotate(&mut kvc, "false");
        assert_eq!(
            recover_change(&kvc, 1).expect("recover"),
            change(&[], ForceEdit::Remove),
            "no node held down: the annotation has nothing left to say"
        );
    }

    #[test]
    fn an_ordinal_outside_the_cluster_is_refused_with_the_replica_count() {
        let kvc = cluster("{replicas: 3}", &UP3);
        let e = check_fail(&kvc, 3, true).unwrap_err();
        assert!(
            matches!(
                e,
                KubeError::NoSuchNode {
                    node: 3,
                    replicas: 3,
                    ..
                }
            ),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "node 3 is not a node of KvCluster demo (spec.replicas is 3: ordinals 0..3)"
        );
    }

    #[test]
    fn one_node_of_three_at_quorum_may_be_held_down() {
        let kvc = cluster("{replicas: 3}", &UP3);
        assert!(check_fail(&kvc, 1, false).is_ok());
    }

    #[test]
    fn a_second_node_of_three_at_quorum_is_refused_like_the_local_gateway_refuses_it() {
        let mut kvc = cluster(
            "{replicas: 3, faultInjection: {failedNodes: [1]}}",
            &[NodeState::Up, NodeState::Failed, NodeState::Up],
        );
        let e = check_fail(&kvc, 2, false).unwrap_err();
        let KubeError::Refused(reason) = &e else {
            panic!("expected the planner's refusal, got {e:?}");
        };
        assert!(
            reason.starts_with("holding down node(s) [2] would leave some keys with 1 of 3 owners live, but writes at Quorum need 2"),
            "{reason}"
        );
        // With --force the planner accepts it (and kv-operator will, once
        // the annotation is set).
        assert!(check_fail(&kvc, 2, true).is_ok());
        // Writes at One keep going with one live owner: accepted.
        kvc.spec.replication.write_consistency = kv_core::Consistency::One;
        assert!(check_fail(&kvc, 2, false).is_ok());
    }

    #[test]
    fn a_node_already_failed_in_the_status_counts_as_down() {
        // Node 0 crashed (Failed in the status, not held down): holding down
        // a second node of three leaves some keys one live owner.
        let kvc = cluster(
            "{replicas: 3}",
            &[NodeState::Failed, NodeState::Up, NodeState::Up],
        );
        assert!(matches!(
            check_fail(&kvc, 1, false),
            Err(KubeError::Refused(_))
        ));
    }

    #[test]
    fn a_node_already_held_down_is_not_checked_again() {
        let kvc = cluster(
            "{replicas: 3, faultInjection: {failedNodes: [0, 1]}}",
            &[NodeState::Failed, NodeState::Failed, NodeState::Up],
        );
        assert!(check_fail(&kvc, 1, false).is_ok());
    }

    #[test]
    fn a_cluster_without_status_is_checked_against_the_spec_alone() {
        let mut kvc = cluster("{replicas: 3, faultInjection: {failedNodes: [0]}}", &[]);
        kvc.status = None;
        assert!(matches!(
            check_fail(&kvc, 1, false),
            Err(KubeError::Refused(_))
        ));
        assert!(check_fail(&kvc, 0, false).is_ok());
    }

    #[test]
    fn consistent_hashing_factor_two_at_one_tolerates_a_node_per_replica_set() {
        let kvc = cluster(
            "{replicas: 5, replication: {factor: 2, writeConsistency: One}}",
            &[NodeState::Up; 5],
        );
        assert!(check_fail(&kvc, 4, false).is_ok());
        let kvc = cluster(
            "{replicas: 5, replication: {factor: 2, writeConsistency: Quorum}}",
            &[NodeState::Up; 5],
        );
        assert!(matches!(
            check_fail(&kvc, 4, false),
            Err(KubeError::Refused(_))
        ));
    }

    #[test]
    fn nodes_render_the_local_table_with_phase_and_conditions() {
        let mut kvc = cluster(
            "{replicas: 3, replication: {strategy: Full}, faultInjection: {failedNodes: [1]}}",
            &[NodeState::Up, NodeState::Failed, NodeState::Recovering],
        );
        let status = kvc.status.as_mut().expect("status");
        status.phase = Some(Phase::Degraded);
        status.nodes[2].resync_progress = Some(0.425);
        status.conditions = vec![Condition {
            type_: "Available".into(),
            status: "True".into(),
            observed_generation: Some(3),
            last_transition_time: None,
            reason: "QuorumAvailable".into(),
            message: "1 of 3 nodes Ready".into(),
        }];
        let text = render_nodes(&kvc);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[..2],
            [
                "KvCluster ns/demo  phase Degraded  ready 1/3  failedNodes [1]",
                "cluster ns/demo  epoch 7  placement Full over nodes 0,1,2  read Quorum  write Quorum",
            ],
            "{text}"
        );
        assert!(lines[2].starts_with("ORDINAL  ADDRESS"), "{text}");
        assert!(
            lines[3].starts_with("0")
                && lines[3].contains("demo-0.demo-peers.ns.svc:7400")
                && lines[3].contains("Up"),
            "{text}"
        );
        assert!(
            lines[4].contains("Failed") && lines[4].contains("unreachable"),
            "{text}"
        );
        assert!(
            lines[5].contains("Recovering") && lines[5].contains("42%"),
            "{text}"
        );
        assert_eq!(lines[6], "conditions:");
        assert_eq!(
            lines[7],
            "  Available=True  QuorumAvailable  1 of 3 nodes Ready"
        );
    }

    #[test]
    fn nodes_say_when_the_status_is_behind_the_spec() {
        let mut kvc = cluster("{replicas: 3}", &UP3);
        kvc.metadata.generation = Some(4);
        assert!(
            render_nodes(&kvc)
                .contains("the status is from generation 3, the spec is at generation 4")
        );
        kvc.status = None;
        let text = render_nodes(&kvc);
        assert!(text.contains("phase (none yet)"), "{text}");
        assert!(text.contains("the status lists no nodes yet"), "{text}");
    }

    #[test]
    fn nodes_json_has_the_local_keys_and_the_kvcluster_summary() {
        let kvc = cluster("{replicas: 3, faultInjection: {failedNodes: [2]}}", &UP3);
        let v = nodes_json(&kvc);
        for key in [
            "clusterId",
            "epoch",
            "placement",
            "pending",
            "readConsistency",
            "writeConsistency",
            "nodes",
        ] {
            assert!(v.get(key).is_some(), "no {key} in {v}");
        }
        assert_eq!(v["epoch"], 7);
        assert_eq!(v["phase"], "Running");
        assert_eq!(v["failedNodes"], json!([2]));
        assert_eq!(v["nodes"][1]["state"], "Up");
        assert_eq!(v["nodes"][1]["address"], "demo-1.demo-peers.ns.svc:7400");
        assert_eq!(v["placement"]["strategy"], "ConsistentHashing");
    }

    #[test]
    fn outcomes_say_what_changed_and_the_resulting_list() {
        let mut o = Outcome {
            cluster: "demo".into(),
            namespace: "ns".into(),
            action: "fail",
            node: 1,
            changed: true,
            failed_nodes_before: vec![],
            failed_nodes: vec![1],
            force_annotation_before: None,
            force_annotation: None,
            attempts: 1,
        };
        assert_eq!(
            render_outcome(&o),
            "KvCluster ns/demo: node 1 added to spec.faultInjection.failedNodes: kv-operator deletes its pod and holds it Failed until recovered\nfailedNodes: [1]\n"
        );
        o.changed = false;
        assert!(render_outcome(&o).contains("node 1 is already held down"));
        o.action = "recover";
        o.failed_nodes = vec![];
        assert!(render_outcome(&o).contains("node 1 is not held down"));
        assert!(render_outcome(&o).ends_with("failedNodes: []\n"));
        o.changed = true;
        o.attempts = 3;
        let text = render_outcome(&o);
        assert!(
            text.contains("node 1 removed from spec.faultInjection.failedNodes"),
            "{text}"
        );
        assert!(text.contains("retried 2 time(s)"), "{text}");
    }

    #[test]
    fn outcomes_say_what_became_of_the_force_annotation_and_how_to_remove_it() {
        let mut o = Outcome {
            cluster: "demo".into(),
            namespace: "ns".into(),
            action: "fail",
            node: 2,
            changed: true,
            failed_nodes_before: vec![1],
            failed_nodes: vec![1, 2],
            force_annotation_before: None,
            force_annotation: Some("true".into()),
            attempts: 1,
        };
        let lines = |o: &Outcome| {
            render_outcome(o)
                .lines()
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            lines(&o)[2],
            "annotation kvstore.dev/force-fault-injection=\"true\" set: kv-operator plans this KvCluster with force and holds nodes down even when some keys are left with fewer live owners than writes need; recovering the last held-down node removes it (or: kubectl annotate kvc demo -n ns kvstore.dev/force-fault-injection-)"
        );
        o.action = "recover";
        o.failed_nodes_before = vec![1, 2];
        o.failed_nodes = vec![1];
        o.force_annotation_before = Some("true".into());
        assert_eq!(
            lines(&o)[2],
            "annotation kvstore.dev/force-fault-injection=\"true\" remains until the last held-down node is recovered; remove it now with: kubectl annotate kvc demo -n ns kvstore.dev/force-fault-injection-"
        );
        o.failed_nodes_before = vec![1];
        o.failed_nodes = vec![];
        o.force_annotation = None;
        assert_eq!(
            lines(&o)[2],
            "annotation kvstore.dev/force-fault-injection removed: no node is held down, kv-operator plans without force again"
        );
        o.force_annotation_before = None;
        assert_eq!(lines(&o).len(), 2, "no annotation, no line");
    }
}
