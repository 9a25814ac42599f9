//! The pure decisions of `fail` and `recover`: the new failedNodes list and
//! force annotation, the merge patch, and the planner's check of a hold-down
//! on what the status shows.

use std::collections::BTreeMap;

use kube::ResourceExt;
use kv_control::planner::{self, Observed};
use kv_core::Topology;
use kv_crd::kvcluster::{FORCE_FAULT_INJECTION, KvCluster};
use serde_json::{Value, json};

use super::KubeError;

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

pub(super) fn cluster_id(kvc: &KvCluster) -> String {
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
