//! From what the controller observed to what it does next, as a pure function.
//!
//! The controller gathers an [`Observed`] (the topology in the ConfigMap, each
//! node's pod and, when reachable, the node's own report from `/v1/cluster`)
//! and [`decide`] returns the next topology, the pods to delete, how many pods
//! the StatefulSet needs and the status to write. No Kubernetes types, no I/O:
//! the same rules can be driven by `kvctl up`, and every transition is tested
//! here as data.
//!
//! Node states follow SPEC §3:
//! - an ordinal listed in `faultInjection.failedNodes` is `Failed` and its pod
//!   is deleted once, when it enters the list; it stays fenced (Failed in the
//!   topology) until removed from the list;
//! - a node whose pod has not been alive for `failureDetectionSeconds` is `Failed`;
//! - a `Failed` node that is alive again (and not held down) is `Recovering`;
//! - `Recovering` and `Joining` nodes become `Up` when their report shows
//!   catch-up complete at the current epoch.
//!
//! Liveness here is "the container started" (its startup probe on `/healthz`
//! passed) or "it answered `/v1/cluster`", never pod readiness: readiness means
//! Up, and waiting on it to declare a node Up would deadlock.
//!
//! Rebalancing: when the spec's placement (members, strategy, factor) differs
//! from the committed one, the new placement becomes `pending`, new ordinals
//! join as `Joining` and removed ordinals become `Leaving`; the pending placement
//! is committed when every owner of the new placement that is not Failed
//! reports its catch-up done at the current epoch. Only then are the leaving
//! nodes dropped from the topology and their pods removed, so a scale-down never loses the only copy of a key.

use std::collections::BTreeMap;

use kv_core::{NodeInfo, NodeState, PlacementSpec, Strategy, Topology};

use super::crd::{KvClusterSpec, NodeStatus, Phase};

/// What the controller saw of one node.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeObservation {
    /// The pod exists and its container has started (startup probe passed).
    pub alive: bool,
    /// When the pod stopped being alive (or was created, if it never was),
    /// in seconds since the Unix epoch; `None` if there is no pod at all.
    pub down_since: Option<i64>,
    /// The node's own report, when its `/v1/cluster` answered.
    pub report: Option<NodeReport>,
}

/// What a node says about itself on `GET /v1/cluster`.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeReport {
    /// Epoch of the topology the node holds.
    pub epoch: u64,
    /// Catch-up progress (0..1) of the node's current resync; 1 when done or idle.
    pub resync_progress: f64,
}

/// Everything [`decide`] needs besides the spec.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observed {
    /// `<namespace>/<name>`: stable across re-creation of the resource, so
    /// nodes that keep their volumes rejoin the same cluster.
    pub cluster_id: String,
    /// The topology in the ConfigMap, if there is a valid one.
    pub topology: Option<Topology>,
    /// The epoch last written to the status: a floor for the next epoch, so a
    /// lost or corrupted ConfigMap never makes the epoch go back.
    pub epoch_floor: u64,
    pub nodes: BTreeMap<u32, NodeObservation>,
    /// Pod names by ordinal, for the status.
    pub pod_names: BTreeMap<u32, String>,
    /// Current time, seconds since the Unix epoch.
    pub now: i64,
}

/// A node changing state, for Events and logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub ordinal: u32,
    pub from: Option<NodeState>,
    pub to: NodeState,
}

/// What to do next.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub topology: Topology,
    /// The topology differs from the observed one (its epoch was raised).
    pub topology_changed: bool,
    /// Pods the StatefulSet must have (highest ordinal in the topology + 1).
    pub pods: u32,
    /// Ordinals whose pod must be deleted now (fault injection).
    pub delete_pods: Vec<u32>,
    pub transitions: Vec<Transition>,
    /// A rebalance began (`Some(true)`) or was committed (`Some(false)`).
    pub rebalance: Option<bool>,
    pub nodes: Vec<NodeStatus>,
    pub phase: Phase,
}

/// The placement the spec asks for.
pub fn desired_placement(spec: &KvClusterSpec) -> PlacementSpec {
    let members: Vec<u32> = (0..spec.replicas).collect();
    let factor = match spec.replication.strategy {
        Strategy::Full => spec.replicas,
        Strategy::ConsistentHashing => spec.replication.factor.min(spec.replicas),
    };
    PlacementSpec {
        strategy: spec.replication.strategy,
        factor,
        members,
    }
}

fn report_done(obs: Option<&NodeObservation>, epoch: u64) -> bool {
    obs.and_then(|o| o.report.as_ref())
        .is_some_and(|r| r.epoch >= epoch && r.resync_progress >= 1.0)
}

/// Decide the next step. `spec` must have passed [`KvClusterSpec::validate`];
/// `address` gives a new node's client and peer `host:port`.
pub fn decide(
    spec: &KvClusterSpec,
    observed: &Observed,
    address: impl Fn(u32) -> (String, String),
) -> Decision {
    let desired = desired_placement(spec);
    let failed_on_purpose = &spec.fault_injection.failed_nodes;
    let node_address = |ordinal: u32, state: NodeState, prev: Option<&NodeInfo>| match prev {
        Some(p) => NodeInfo { state, ..p.clone() },
        None => {
            let (address, peer_address) = address(ordinal);
            NodeInfo {
                ordinal,
                address,
                peer_address,
                state,
            }
        }
    };

    let mut transitions = Vec::new();
    let mut delete_pods = Vec::new();
    let mut rebalance = None;

    let next = match &observed.topology {
        // A new cluster: every node starts Up on empty volumes. Nodes whose
        // volumes already hold data rejoin it: the cluster id does not change.
        None => Topology {
            cluster_id: observed.cluster_id.clone(),
            epoch: observed.epoch_floor,
            read_consistency: spec.replication.read_consistency,
            write_consistency: spec.replication.write_consistency,
            placement: desired.clone(),
            pending: None,
            nodes: desired
                .members
                .iter()
                .map(|&o| {
                    let state = if failed_on_purpose.contains(&o) {
                        delete_pods.push(o);
                        NodeState::Failed
                    } else {
                        NodeState::Up
                    };
                    transitions.push(Transition {
                        ordinal: o,
                        from: None,
                        to: state,
                    });
                    node_address(o, state, None)
                })
                .collect(),
        },
        Some(current) => {
            let mut t = current.clone();
            t.read_consistency = spec.replication.read_consistency;
            t.write_consistency = spec.replication.write_consistency;

            // 1. Each existing node's state.
            for n in &mut t.nodes {
                let obs = observed.nodes.get(&n.ordinal);
                let alive = obs.is_some_and(|o| o.alive || o.report.is_some());
                let down_for = obs
                    .and_then(|o| o.down_since)
                    .map_or(i64::MAX, |since| observed.now.saturating_sub(since));
                let next_state = if failed_on_purpose.contains(&n.ordinal) {
                    if n.state != NodeState::Failed {
                        delete_pods.push(n.ordinal);
                    }
                    NodeState::Failed
                } else {
                    match n.state {
                        NodeState::Failed if alive => NodeState::Recovering,
                        NodeState::Failed => NodeState::Failed,
                        _ if !alive && down_for >= i64::from(spec.failure_detection_seconds) => {
                            NodeState::Failed
                        }
                        NodeState::Recovering if report_done(obs, current.epoch) => NodeState::Up,
                        s => s,
                    }
                };
                if next_state != n.state {
                    transitions.push(Transition {
                        ordinal: n.ordinal,
                        from: Some(n.state),
                        to: next_state,
                    });
                    n.state = next_state;
                }
            }

            // 2. Placement: start a rebalance, or commit one that is done.
            let target_differs = |p: &PlacementSpec| p != &desired;
            match t.pending.clone() {
                Some(pending) if target_differs(&pending) => {
                    // The spec changed again mid-rebalance: aim at the new target.
                    t.pending = Some(desired.clone());
                }
                Some(pending) => {
                    // Every owner of the new placement that is not down has
                    // streamed in what it will own (a Failed one catches up later
                    // through hints and anti-entropy, as after any failure).
                    let streaming_done = t
                        .nodes
                        .iter()
                        .filter(|n| n.state != NodeState::Failed)
                        .filter(|n| pending.members.contains(&n.ordinal))
                        .all(|n| report_done(observed.nodes.get(&n.ordinal), current.epoch));
                    if streaming_done {
                        rebalance = Some(false);
                        t.placement = desired.clone();
                        t.pending = None;
                        let members = &t.placement.members;
                        t.nodes.retain(|n| members.contains(&n.ordinal));
                        for n in &mut t.nodes {
                            if n.state == NodeState::Joining {
                                transitions.push(Transition {
                                    ordinal: n.ordinal,
                                    from: Some(NodeState::Joining),
                                    to: NodeState::Up,
                                });
                                n.state = NodeState::Up;
                            }
                        }
                    }
                }
                None if target_differs(&t.placement) => {
                    rebalance = Some(true);
                    t.pending = Some(desired.clone());
                }
                None => {}
            }
            if let Some(pending) = t.pending.clone() {
                for &o in &pending.members {
                    if t.node(o).is_none() {
                        let state = if failed_on_purpose.contains(&o) {
                            NodeState::Failed
                        } else {
                            NodeState::Joining
                        };
                        transitions.push(Transition {
                            ordinal: o,
                            from: None,
                            to: state,
                        });
                        t.nodes.push(node_address(o, state, None));
                    }
                }
                for n in &mut t.nodes {
                    if !pending.members.contains(&n.ordinal)
                        && !matches!(n.state, NodeState::Leaving | NodeState::Failed)
                    {
                        transitions.push(Transition {
                            ordinal: n.ordinal,
                            from: Some(n.state),
                            to: NodeState::Leaving,
                        });
                        n.state = NodeState::Leaving;
                    }
                }
                t.nodes.sort_by_key(|n| n.ordinal);
            }
            t
        }
    };

    let mut next = next;
    let topology_changed = match &observed.topology {
        None => true,
        Some(current) => {
            let mut same = next.clone();
            same.epoch = current.epoch;
            &same != current
        }
    };
    if topology_changed {
        let base = observed
            .topology
            .as_ref()
            .map_or(0, |t| t.epoch)
            .max(observed.epoch_floor);
        next.epoch = base + 1;
    }

    let pods = next.nodes.iter().map(|n| n.ordinal + 1).max().unwrap_or(0);
    let nodes = next
        .nodes
        .iter()
        .map(|n| NodeStatus {
            ordinal: n.ordinal,
            pod: observed
                .pod_names
                .get(&n.ordinal)
                .cloned()
                .unwrap_or_default(),
            state: n.state,
            resync_progress: match n.state {
                NodeState::Joining | NodeState::Recovering => observed
                    .nodes
                    .get(&n.ordinal)
                    .and_then(|o| o.report.as_ref())
                    .map(|r| r.resync_progress.clamp(0.0, 1.0)),
                _ => None,
            },
        })
        .collect();
    let phase = if next.pending.is_some() {
        Phase::Rebalancing
    } else if observed.topology.is_none() {
        Phase::Creating
    } else if next.nodes.iter().all(|n| n.state == NodeState::Up) {
        Phase::Running
    } else {
        Phase::Degraded
    };
    delete_pods.sort_unstable();
    Decision {
        topology: next,
        topology_changed,
        pods,
        delete_pods,
        transitions,
        rebalance,
        nodes,
        phase,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decide_(s: &KvClusterSpec, o: &Observed) -> Decision {
        let d = decide(s, o, |n| (format!("n{n}:7400"), format!("n{n}:7401")));
        assert_eq!(
            d.topology.validate(),
            Ok(()),
            "every decided topology is valid"
        );
        d
    }

    fn spec(yaml: &str) -> KvClusterSpec {
        serde_yaml::from_str(yaml).expect("test spec parses")
    }

    fn alive() -> NodeObservation {
        NodeObservation {
            alive: true,
            down_since: None,
            report: Some(NodeReport {
                epoch: 0,
                resync_progress: 1.0,
            }),
        }
    }

    fn observed(topology: Option<Topology>, nodes: &[(u32, NodeObservation)]) -> Observed {
        Observed {
            cluster_id: "ns/demo".into(),
            topology,
            epoch_floor: 0,
            nodes: nodes.iter().cloned().collect(),
            pod_names: BTreeMap::new(),
            now: 1_000,
        }
    }

    /// Run decide until the topology stops changing, with every node alive and
    /// reporting catch-up done at the epoch it is given.
    fn settle(
        s: &KvClusterSpec,
        mut t: Option<Topology>,
        ordinals: u32,
    ) -> (Topology, Vec<Decision>) {
        let mut steps = Vec::new();
        for _ in 0..10 {
            let epoch = t.as_ref().map_or(0, |t| t.epoch);
            let nodes: Vec<(u32, NodeObservation)> = (0..ordinals)
                .map(|o| {
                    let mut a = alive();
                    a.report = Some(NodeReport {
                        epoch,
                        resync_progress: 1.0,
                    });
                    (o, a)
                })
                .collect();
            let d = decide_(s, &observed(t.clone(), &nodes));
            let changed = d.topology_changed;
            t = Some(d.topology.clone());
            steps.push(d);
            if !changed {
                break;
            }
        }
        (t.expect("at least one step"), steps)
    }

    #[test]
    fn a_new_cluster_gets_every_node_up_at_epoch_one() {
        let d = decide_(&spec("{}"), &observed(None, &[]));
        assert!(d.topology_changed);
        assert_eq!(d.topology.epoch, 1);
        assert_eq!(d.topology.placement.members, [0, 1, 2]);
        assert_eq!(d.topology.placement.factor, 3);
        assert!(d.topology.nodes.iter().all(|n| n.state == NodeState::Up));
        assert_eq!(d.pods, 3);
        assert_eq!(d.phase, Phase::Creating);
        assert!(d.delete_pods.is_empty());
    }

    #[test]
    fn a_lost_configmap_never_lowers_the_epoch() {
        let mut o = observed(None, &[]);
        o.epoch_floor = 41;
        assert_eq!(decide_(&spec("{}"), &o).topology.epoch, 42);
    }

    #[test]
    fn an_ordinal_added_to_failed_nodes_is_deleted_once_and_held_failed() {
        let (t, _) = settle(&spec("{}"), None, 3);
        let s = spec("{faultInjection: {failedNodes: [1]}}");
        let all_alive = [(0, alive()), (1, alive()), (2, alive())];
        let d = decide_(&s, &observed(Some(t.clone()), &all_alive));
        assert_eq!(d.delete_pods, [1]);
        assert_eq!(d.topology.state_of(1), Some(NodeState::Failed));
        assert_eq!(d.topology.epoch, t.epoch + 1);
        assert_eq!(d.phase, Phase::Degraded);
        assert_eq!(
            d.transitions,
            [Transition {
                ordinal: 1,
                from: Some(NodeState::Up),
                to: NodeState::Failed
            }]
        );
        // The StatefulSet brings the pod back; it stays fenced, and is not deleted again.
        let again = decide_(&s, &observed(Some(d.topology.clone()), &all_alive));
        assert!(again.delete_pods.is_empty());
        assert!(!again.topology_changed);
        assert_eq!(again.topology.state_of(1), Some(NodeState::Failed));
    }

    #[test]
    fn a_released_node_recovers_and_is_up_only_after_its_catch_up_is_reported_done() {
        let (t, _) = settle(&spec("{faultInjection: {failedNodes: [1]}}"), None, 3);
        assert_eq!(t.state_of(1), Some(NodeState::Failed));
        let s = spec("{}");
        let mut behind = alive();
        behind.report = Some(NodeReport {
            epoch: t.epoch + 1,
            resync_progress: 0.4,
        });
        let d = decide_(
            &s,
            &observed(
                Some(t.clone()),
                &[(0, alive()), (1, behind.clone()), (2, alive())],
            ),
        );
        assert_eq!(d.topology.state_of(1), Some(NodeState::Recovering));
        assert_eq!(d.nodes[1].resync_progress, Some(0.4));
        let still = decide_(
            &s,
            &observed(
                Some(d.topology.clone()),
                &[(0, alive()), (1, behind.clone()), (2, alive())],
            ),
        );
        assert_eq!(still.topology.state_of(1), Some(NodeState::Recovering));
        let mut done = behind;
        done.report = Some(NodeReport {
            epoch: d.topology.epoch,
            resync_progress: 1.0,
        });
        let up = decide_(
            &s,
            &observed(
                Some(d.topology.clone()),
                &[(0, alive()), (1, done), (2, alive())],
            ),
        );
        assert_eq!(up.topology.state_of(1), Some(NodeState::Up));
        assert_eq!(up.phase, Phase::Running);
    }

    #[test]
    fn a_node_down_longer_than_failure_detection_is_failed_and_not_before() {
        let (t, _) = settle(&spec("{failureDetectionSeconds: 10}"), None, 3);
        let s = spec("{failureDetectionSeconds: 10}");
        let down = |since| NodeObservation {
            alive: false,
            down_since: Some(since),
            report: None,
        };
        let d = decide_(
            &s,
            &observed(
                Some(t.clone()),
                &[(0, alive()), (1, down(995)), (2, alive())],
            ),
        );
        assert_eq!(d.topology.state_of(1), Some(NodeState::Up));
        assert!(!d.topology_changed);
        let d = decide_(
            &s,
            &observed(Some(t), &[(0, alive()), (1, down(990)), (2, alive())]),
        );
        assert_eq!(d.topology.state_of(1), Some(NodeState::Failed));
        assert!(
            d.delete_pods.is_empty(),
            "a node that failed on its own is not deleted"
        );
    }

    #[test]
    fn scaling_3_to_5_to_3_commits_placements_only_after_streaming_and_drops_pods_last() {
        let (t3, _) = settle(&spec("{replicas: 3}"), None, 3);
        let s5 = spec("{replicas: 5}");
        let five_alive: Vec<(u32, NodeObservation)> = (0..5).map(|o| (o, alive())).collect();
        // Step 1: pending placement, new nodes Joining, pods for them.
        let d = decide_(
            &s5,
            &observed(
                Some(t3.clone()),
                &[(0, alive()), (1, alive()), (2, alive())],
            ),
        );
        assert_eq!(d.rebalance, Some(true));
        assert_eq!(d.phase, Phase::Rebalancing);
        assert_eq!(d.topology.placement.members, [0, 1, 2]);
        assert_eq!(
            d.topology.pending.as_ref().map(|p| p.members.clone()),
            Some(vec![0, 1, 2, 3, 4])
        );
        assert_eq!(d.topology.state_of(3), Some(NodeState::Joining));
        assert_eq!(d.pods, 5);
        // Not committed while the joiners have not reported done.
        let wait = decide_(&s5, &observed(Some(d.topology.clone()), &five_alive));
        assert!(
            !wait.topology_changed,
            "joiners reporting an old epoch keep the rebalance pending"
        );
        let (t5, steps) = settle(&s5, Some(d.topology), 5);
        assert_eq!(steps[0].rebalance, Some(false));
        assert_eq!(t5.pending, None);
        assert_eq!(t5.placement.members, [0, 1, 2, 3, 4]);
        assert!(t5.nodes.iter().all(|n| n.state == NodeState::Up));

        // Back to 3: nodes 3 and 4 leave but keep serving and keep their pods.
        let s3 = spec("{replicas: 3}");
        let d = decide_(&s3, &observed(Some(t5.clone()), &five_alive));
        assert_eq!(d.topology.state_of(3), Some(NodeState::Leaving));
        assert_eq!(d.topology.state_of(4), Some(NodeState::Leaving));
        assert_eq!(d.pods, 5, "leaving nodes keep their pods until the commit");
        let wait = decide_(&s3, &observed(Some(d.topology.clone()), &five_alive));
        assert!(
            !wait.topology_changed,
            "the remaining owners must report their catch-up before the leavers go"
        );
        let (t, steps) = settle(&s3, Some(d.topology), 5);
        assert_eq!(steps[0].rebalance, Some(false));
        assert_eq!(t.placement.members, [0, 1, 2]);
        assert_eq!(t.nodes.len(), 3);
        assert_eq!(
            steps[0].pods, 3,
            "pods are dropped with the commit, not before"
        );
    }

    #[test]
    fn a_leaving_node_that_dies_is_failed_not_leaving_and_is_dropped_at_the_commit() {
        let (t5, _) = settle(&spec("{replicas: 5}"), None, 5);
        let s3 = spec("{replicas: 3}");
        let five_alive: Vec<(u32, NodeObservation)> = (0..5).map(|o| (o, alive())).collect();
        let d = decide_(&s3, &observed(Some(t5), &five_alive));
        assert_eq!(d.topology.state_of(4), Some(NodeState::Leaving));
        let mut four_dead = five_alive.clone();
        four_dead[4].1 = NodeObservation {
            alive: false,
            down_since: Some(0),
            report: None,
        };
        let d = decide_(&s3, &observed(Some(d.topology), &four_dead));
        assert_eq!(
            d.topology.state_of(4),
            Some(NodeState::Failed),
            "a dead node serves nothing"
        );
        let (t, _) = settle(&s3, Some(d.topology), 3);
        assert_eq!(t.placement.members, [0, 1, 2]);
        assert_eq!(t.state_of(4), None);
    }

    #[test]
    fn consistency_changes_raise_the_epoch_without_a_rebalance() {
        let (t, _) = settle(&spec("{}"), None, 3);
        let s = spec("{replication: {readConsistency: One}}");
        let d = decide_(
            &s,
            &observed(Some(t.clone()), &[(0, alive()), (1, alive()), (2, alive())]),
        );
        assert!(d.topology_changed);
        assert_eq!(d.rebalance, None);
        assert_eq!(d.topology.read_consistency, kv_core::Consistency::One);
        assert_eq!(d.topology.epoch, t.epoch + 1);
    }
}
