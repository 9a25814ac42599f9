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
//! wake-up ends when every node that is not held down is back ([`not_back`]:
//! its pod Ready and the node reporting), or after
//! [`WAKE_DEADLINE_SECONDS`]; then failure detection counts as usual.
//!
//! The planner keeps the waking nodes Up in the topology, so the status
//! does not take their states from it: until a node is back it shows
//! Recovering and the phase is `WakingUp` (a wake-up once showed Running
//! with every node Up before any pod existed).
//!
//! [`Desired::hibernate`]: kv_control::planner::Desired::hibernate

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::jiff::Timestamp;
use kv_core::NodeState;

use super::crd::{Condition, KvCluster, KvClusterStatus, Phase};
use kv_control::planner::Observed;

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
    /// Asked off, and these nodes are not back yet.
    WakingUp(BTreeSet<u32>),
    /// Asked off, after a hibernation (or a deferral) the status showed.
    Awake,
}

impl Hibernation {
    pub fn reason(&self) -> &'static str {
        match self {
            Hibernation::Hibernated => "Hibernated",
            Hibernation::Deferred(_) => "RebalancePending",
            Hibernation::WakingUp(_) => "WakingUp",
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
            Hibernation::WakingUp(nodes) => format!(
                "the pods are starting on their volumes; nodes {nodes:?} are not back yet (pod Ready, node reporting) and are not failed for up to {WAKE_DEADLINE_SECONDS} s"
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

/// The nodes of the topology, Failed ones aside, that are not back: a node
/// is back once it answers (it reported; when the controller does not ask
/// for reports, `reporting` false, once it runs) and, if it is Up in the
/// topology, its pod is Ready (`ready`, by ordinal). Only an Up node passes
/// the readiness probe, and only a Ready pod is behind the client Service.
pub fn not_back(
    observed: &Observed,
    ready: &BTreeMap<u32, bool>,
    reporting: bool,
) -> BTreeSet<u32> {
    let Some(t) = &observed.topology else {
        return BTreeSet::new();
    };
    let back = |ordinal: u32, state: NodeState| {
        let answers = observed
            .nodes
            .get(&ordinal)
            .is_some_and(|o| o.report.is_some() || (!reporting && o.alive()));
        let ready = state != NodeState::Up || ready.get(&ordinal).copied().unwrap_or(false);
        answers && ready
    };
    t.nodes
        .iter()
        .filter(|n| n.state != NodeState::Failed && !back(n.ordinal, n.state))
        .map(|n| n.ordinal)
        .collect()
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
    not_back: &BTreeSet<u32>,
    previous: &KvClusterStatus,
) -> Option<Hibernation> {
    if hibernated {
        return Some(Hibernation::Hibernated);
    }
    if let Some(reason) = deferred {
        return Some(Hibernation::Deferred(reason.to_string()));
    }
    if waking && !not_back.is_empty() {
        return Some(Hibernation::WakingUp(not_back.clone()));
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
    use kv_control::planner::{NodeObservation, NodeProgress};

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

    /// Three nodes Up at epoch 4, node 1 held down (Failed), as the
    /// controller observes them with no pod yet.
    fn woken(reporting_pods: &[u32]) -> Observed {
        use kv_core::{Consistency, NodeInfo, PlacementSpec, Strategy, Topology};
        let node = |ordinal, state| NodeInfo {
            ordinal,
            address: format!("demo-{ordinal}:7400"),
            peer_address: format!("demo-{ordinal}:7401"),
            state,
        };
        let mut observed = Observed {
            topology: Some(Topology {
                cluster_id: "demo".into(),
                epoch: 4,
                read_consistency: Consistency::Quorum,
                write_consistency: Consistency::Quorum,
                placement: PlacementSpec {
                    strategy: Strategy::Full,
                    factor: 3,
                    members: vec![0, 1, 2],
                },
                pending: None,
                nodes: vec![
                    node(0, NodeState::Up),
                    node(1, NodeState::Failed),
                    node(2, NodeState::Up),
                ],
            }),
            ..Observed::default()
        };
        for o in 0..3 {
            let report = reporting_pods.contains(&o).then_some(NodeProgress {
                epoch: 4,
                synced_epoch: 4,
                resync_progress: 1.0,
            });
            observed.nodes.insert(
                o,
                NodeObservation {
                    running: report.is_some(),
                    down_since_ms: None,
                    report,
                },
            );
        }
        observed
    }

    #[test]
    fn a_waking_node_is_back_once_its_pod_is_ready_and_it_reports() {
        let none_ready = BTreeMap::new();
        let all_ready: BTreeMap<u32, bool> = (0..3).map(|o| (o, true)).collect();
        // No pod yet: every node but the held-down one is awaited.
        assert_eq!(not_back(&woken(&[]), &none_ready, true), [0, 2].into());
        // Reporting but not Ready (the client Service does not route to it yet).
        assert_eq!(not_back(&woken(&[0, 2]), &none_ready, true), [0, 2].into());
        // Ready, but node 2 does not answer.
        assert_eq!(not_back(&woken(&[0]), &all_ready, true), [2].into());
        assert_eq!(not_back(&woken(&[0, 2]), &all_ready, true), BTreeSet::new());
        // Without reports, running and Ready is back.
        let mut running = woken(&[]);
        for o in running.nodes.values_mut() {
            o.running = true;
        }
        assert_eq!(not_back(&running, &all_ready, false), BTreeSet::new());
        assert_eq!(not_back(&running, &all_ready, true), [0, 2].into());
    }

    #[test]
    fn the_condition_follows_hibernation_and_appears_only_once_asked_for() {
        let none = KvClusterStatus::default();
        let all_back = BTreeSet::new();
        let two_missing: BTreeSet<u32> = [0, 2].into();
        assert_eq!(state(false, None, false, &all_back, &none), None);
        assert_eq!(
            state(true, None, false, &two_missing, &none),
            Some(Hibernation::Hibernated)
        );
        assert_eq!(
            state(false, Some("wait"), false, &all_back, &none),
            Some(Hibernation::Deferred("wait".into()))
        );
        let hibernated = status("Hibernated", "2026-01-01T00:00:00Z");
        let waking_up = state(false, None, true, &two_missing, &hibernated);
        assert_eq!(waking_up, Some(Hibernation::WakingUp(two_missing.clone())));
        let c = waking_up.expect("waking up").condition(7, Some(3));
        assert!(
            c.message.contains("nodes {0, 2} are not back"),
            "{}",
            c.message
        );
        assert_eq!(
            state(false, None, true, &all_back, &hibernated),
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
