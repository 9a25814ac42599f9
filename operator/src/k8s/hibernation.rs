//! Hibernation on Kubernetes (`spec.hibernation`): every pod stopped, the
//! volumes and the topology ConfigMap kept.
//!
//! The planner decides it ([`Desired::hibernate`]): no node of a hibernated
//! cluster is Failed, no epoch is issued and the StatefulSet goes to 0
//! replicas. This module keeps the controller's side: the condition
//! `Hibernated` (True while hibernated; False with reason `RebalancePending`
//! while a placement change holds it back, `WakingUp` while the pods come
//! back, `Awake` after), and the wake-up, during which nodes whose pods are
//! not back yet are not counted as unreachable: they were all stopped at
//! once on request, and failing them would make each catch up from the
//! others when it returns (a catch-up storm for data they still hold). The
//! wake-up ends when every node that is not held down runs again, or after
//! [`WAKE_DEADLINE_SECONDS`]; then failure detection counts as usual.
//!
//! [`Desired::hibernate`]: crate::planner::Desired::hibernate

use std::collections::BTreeMap;

use k8s_openapi::jiff::Timestamp;
use kv_core::NodeState;

use super::crd::{Condition, KvCluster, KvClusterStatus, Phase};
use crate::planner::Observed;

/// The condition's type.
pub const CONDITION: &str = "Hibernated";

/// How long a wake-up may take before nodes whose pods are still not back
/// are counted unreachable (and Failed after `failureDetectionSeconds`).
pub const WAKE_DEADLINE_SECONDS: i64 = 600;

/// Where a cluster is between hibernation and running, as the controller
/// shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hibernation {
    /// Every pod stopped on request.
    Hibernated,
    /// Asked for, but a placement change is pending: the reason.
    Deferred(String),
    /// Asked off, and some nodes are not back yet.
    WakingUp,
    /// Asked off, after a hibernation (or a deferral) the status showed.
    Awake,
}

impl Hibernation {
    pub fn reason(&self) -> &'static str {
        match self {
            Hibernation::Hibernated => "Hibernated",
            Hibernation::Deferred(_) => "RebalancePending",
            Hibernation::WakingUp => "WakingUp",
            Hibernation::Awake => "Awake",
        }
    }

    /// The condition for this state of the cluster at `epoch`.
    pub fn condition(&self, epoch: u64, generation: Option<i64>) -> Condition {
        let message = match self {
            Hibernation::Hibernated => format!(
                "every pod is stopped (spec.hibernation); the volumes and the topology (epoch {epoch}) are kept for the wake-up"
            ),
            Hibernation::Deferred(reason) => reason.clone(),
            Hibernation::WakingUp => format!(
                "the pods are starting on their volumes; nodes not back yet are not failed for up to {WAKE_DEADLINE_SECONDS} s"
            ),
            Hibernation::Awake => "hibernation is off: the nodes run".to_string(),
        };
        Condition {
            type_: CONDITION.to_string(),
            status: if *self == Hibernation::Hibernated {
                "True"
            } else {
                "False"
            }
            .to_string(),
            observed_generation: generation,
            last_transition_time: None,
            reason: self.reason().to_string(),
            message,
        }
    }
}

fn previous_condition(previous: &KvClusterStatus) -> Option<&Condition> {
    previous.conditions.iter().find(|c| c.type_ == CONDITION)
}

/// Is the cluster waking up: hibernation is off and the last status showed
/// it hibernated, or waking up since less than [`WAKE_DEADLINE_SECONDS`]
/// (the condition's transition time is when the wake-up began).
pub fn waking(kvc: &KvCluster, previous: &KvClusterStatus, now: Timestamp) -> bool {
    if kvc.spec.hibernation {
        return false;
    }
    if previous.phase == Some(Phase::Hibernated) {
        return true;
    }
    previous_condition(previous).is_some_and(|c| match c.reason.as_str() {
        "Hibernated" => true,
        "WakingUp" => c
            .last_transition_time
            .as_deref()
            .and_then(|t| t.parse::<Timestamp>().ok())
            .is_none_or(|since| now.as_second() - since.as_second() < WAKE_DEADLINE_SECONDS),
        _ => false,
    })
}

/// Every node of the topology that is not Failed runs or answers again.
pub fn all_back(observed: &Observed) -> bool {
    let Some(t) = &observed.topology else {
        return true;
    };
    t.nodes
        .iter()
        .filter(|n| n.state != NodeState::Failed)
        .all(|n| observed.nodes.get(&n.ordinal).is_some_and(|o| o.alive()))
}

/// While waking up, a node that is not back yet has no down time: the
/// planner keeps it in its state, and the status shows it reachable.
pub fn spare_waking_nodes(observed: &mut Observed, unreachable: &mut BTreeMap<u32, u64>) {
    for (ordinal, obs) in observed.nodes.iter_mut() {
        if !obs.alive() {
            obs.down_since_ms = None;
            unreachable.remove(ordinal);
        }
    }
}

/// The cluster's hibernation state to show, if any: none for a cluster
/// that never asked for it.
pub fn state(
    hibernated: bool,
    deferred: Option<&str>,
    waking: bool,
    all_back: bool,
    previous: &KvClusterStatus,
) -> Option<Hibernation> {
    if hibernated {
        return Some(Hibernation::Hibernated);
    }
    if let Some(reason) = deferred {
        return Some(Hibernation::Deferred(reason.to_string()));
    }
    if waking && !all_back {
        return Some(Hibernation::WakingUp);
    }
    let shown = previous_condition(previous).map(|c| c.reason.as_str());
    match shown {
        Some("Hibernated" | "RebalancePending" | "WakingUp" | "Awake") => Some(Hibernation::Awake),
        _ if waking => Some(Hibernation::Awake),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planner::NodeObservation;

    fn status(reason: &str, since: &str) -> KvClusterStatus {
        KvClusterStatus {
            conditions: vec![Condition {
                type_: CONDITION.into(),
                status: if reason == "Hibernated" {
                    "True"
                } else {
                    "False"
                }
                .into(),
                observed_generation: Some(1),
                last_transition_time: Some(since.into()),
                reason: reason.into(),
                message: String::new(),
            }],
            ..KvClusterStatus::default()
        }
    }

    fn cluster(hibernation: bool) -> KvCluster {
        let mut kvc = KvCluster::new("demo", serde_yaml::from_str("{}").expect("spec"));
        kvc.spec.hibernation = hibernation;
        kvc
    }

    #[test]
    fn a_wake_up_lasts_from_the_hibernated_status_until_the_deadline() {
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().expect("time");
        let soon = Timestamp::from_second(t0.as_second() + 60).expect("time");
        let late =
            Timestamp::from_second(t0.as_second() + WAKE_DEADLINE_SECONDS + 1).expect("time");
        let since = t0.to_string();
        assert!(waking(&cluster(false), &status("Hibernated", &since), late));
        assert!(waking(&cluster(false), &status("WakingUp", &since), soon));
        assert!(!waking(&cluster(false), &status("WakingUp", &since), late));
        assert!(!waking(&cluster(false), &status("Awake", &since), soon));
        assert!(!waking(&cluster(true), &status("Hibernated", &since), soon));
        assert!(!waking(&cluster(false), &KvClusterStatus::default(), soon));
    }

    #[test]
    fn nodes_not_back_during_a_wake_up_have_no_down_time() {
        let mut observed = Observed::default();
        observed.nodes.insert(
            0,
            NodeObservation {
                running: false,
                down_since_ms: Some(5),
                report: None,
            },
        );
        observed.nodes.insert(
            1,
            NodeObservation {
                running: true,
                down_since_ms: None,
                report: None,
            },
        );
        let mut unreachable: BTreeMap<u32, u64> = [(0, 5)].into();
        spare_waking_nodes(&mut observed, &mut unreachable);
        assert_eq!(observed.nodes[&0].down_since_ms, None);
        assert!(unreachable.is_empty());
    }

    #[test]
    fn the_condition_follows_hibernation_and_appears_only_once_asked_for() {
        let none = KvClusterStatus::default();
        assert_eq!(state(false, None, false, true, &none), None);
        assert_eq!(
            state(true, None, false, false, &none),
            Some(Hibernation::Hibernated)
        );
        assert_eq!(
            state(false, Some("wait"), false, true, &none),
            Some(Hibernation::Deferred("wait".into()))
        );
        let hibernated = status("Hibernated", "2026-01-01T00:00:00Z");
        assert_eq!(
            state(false, None, true, false, &hibernated),
            Some(Hibernation::WakingUp)
        );
        assert_eq!(
            state(false, None, true, true, &hibernated),
            Some(Hibernation::Awake)
        );
        let c = Hibernation::Hibernated.condition(7, Some(3));
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "Hibernated")
        );
        assert!(c.message.contains("epoch 7"), "{}", c.message);
    }
}
