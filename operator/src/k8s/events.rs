//! The Events a reconcile publishes: node transitions, hibernation, an
//! invalid annotation.

use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};
use kv_core::NodeState;
use tracing::warn;

use super::crd::{KvCluster, KvClusterStatus};
use super::hibernation::{self, Hibernation};
use super::objects;
use kv_control::planner::Rebalance;

use super::controller::{Context, Decision};
use super::status::{FORCE_CONDITION, force_condition};

/// A Warning Event `InvalidAnnotation` when the force annotation has a value
/// other than `"true"` or `"false"`, once: not again while the status
/// already shows that value as invalid (an annotation edit does not change
/// the generation, so the condition's message is what tells them apart).
pub(super) async fn warn_invalid_annotation(
    ctx: &Context,
    kvc: &KvCluster,
    previous: &KvClusterStatus,
) {
    let Some(c) = force_condition(kvc, kvc.meta().generation).filter(|c| c.status == "False")
    else {
        return;
    };
    let shown = previous
        .conditions
        .iter()
        .any(|p| p.type_ == FORCE_CONDITION && p.reason == c.reason && p.message == c.message);
    if !shown {
        warn!(kvcluster = %kvc.name_any(), message = %c.message, "invalid annotation");
        publish(
            ctx,
            kvc,
            EventType::Warning,
            "InvalidAnnotation",
            "Validate",
            &c.message,
        )
        .await;
    }
}

pub(super) async fn publish(
    ctx: &Context,
    kvc: &KvCluster,
    type_: EventType,
    reason: &str,
    action: &str,
    note: &str,
) {
    let event = Event {
        type_,
        reason: reason.to_string(),
        note: Some(note.chars().take(1000).collect()),
        action: action.to_string(),
        secondary: None,
    };
    // An Event that cannot be written is logged, never a reason to fail a reconcile.
    if let Err(e) = ctx.recorder.publish(&event, &kvc.object_ref(&())).await {
        warn!(kvcluster = %kvc.name_any(), error = %e, reason, "could not publish event");
    }
}

/// An Event when the hibernation state changes from what the last status
/// showed (a deferral's reason is shown once per reason).
pub(super) async fn publish_hibernation(
    ctx: &Context,
    kvc: &KvCluster,
    now: Option<&Hibernation>,
    previous: &KvClusterStatus,
) {
    let Some(h) = now else { return };
    let shown = previous
        .conditions
        .iter()
        .find(|c| c.type_ == hibernation::CONDITION)
        .map(|c| c.reason.as_str());
    if shown == Some(h.reason()) {
        return;
    }
    let (type_, note) = match h {
        Hibernation::Hibernated => (
            EventType::Normal,
            "hibernating: the StatefulSet goes to 0 pods; volumes and topology are kept"
                .to_string(),
        ),
        Hibernation::Deferred(reason) => (EventType::Warning, reason.clone()),
        Hibernation::WakingUp(_) => (
            EventType::Normal,
            "waking up: the pods start again on their volumes".to_string(),
        ),
        Hibernation::Awake => (
            EventType::Normal,
            "awake: every node runs again".to_string(),
        ),
    };
    publish(ctx, kvc, type_, h.reason(), "Hibernation", &note).await;
}

pub(super) async fn publish_transitions(ctx: &Context, kvc: &KvCluster, d: &Decision) {
    for t in &d.transitions {
        let pod = objects::pod_name(kvc, t.ordinal);
        let (type_, reason) = match (t.from, t.to) {
            (Some(_), NodeState::Failed) => (EventType::Warning, "NodeFailed"),
            (Some(NodeState::Failed), NodeState::Recovering) => {
                (EventType::Normal, "NodeRecovering")
            }
            (Some(NodeState::Recovering), NodeState::Up) => (EventType::Normal, "NodeRecovered"),
            _ => continue,
        };
        let note = format!("node {} ({pod}) is now {}", t.ordinal, t.to);
        publish(ctx, kvc, type_, reason, "UpdateTopology", &note).await;
    }
    match d.rebalance {
        Some(step @ (Rebalance::Started | Rebalance::Replaced)) => {
            let note = format!(
                "moving to placement {:?} (epoch {})",
                d.topology.pending.as_ref().map(|p| &p.members),
                d.topology.epoch
            );
            let reason = if step == Rebalance::Started {
                "RebalanceStarted"
            } else {
                "RebalanceRestarted"
            };
            publish(ctx, kvc, EventType::Normal, reason, "UpdateTopology", &note).await;
        }
        Some(Rebalance::Cancelled) => {
            let note = format!(
                "placement change cancelled: back to {:?} (epoch {})",
                d.topology.placement.members, d.topology.epoch
            );
            publish(
                ctx,
                kvc,
                EventType::Normal,
                "RebalanceCancelled",
                "UpdateTopology",
                &note,
            )
            .await;
        }
        Some(Rebalance::Committed) => {
            let note = format!(
                "placement {:?} committed (epoch {})",
                d.topology.placement.members, d.topology.epoch
            );
            publish(
                ctx,
                kvc,
                EventType::Normal,
                "RebalanceCommitted",
                "UpdateTopology",
                &note,
            )
            .await;
        }
        None => {}
    }
}
