//! Rolling restart on request: the annotation `kvstore.dev/restartedAt`
//! ([`RESTARTED_AT`]) with a value the status has not carried out yet
//! restarts every node once, one at a time.
//!
//! The controller deletes one pod (the StatefulSet makes it again, on the
//! same volume) and deletes the next only once that node is back: its new
//! pod Ready, the node Up in the topology and reporting the topology's
//! epoch as both its own and its synced epoch, its store not catching up.
//! Every other node must be so too before a pod is deleted, so a restart
//! never takes a second owner of some key away, and it waits while the
//! cluster is hibernated, rebalancing, or has a node down (a drill
//! included). `status.lastRestart` shows the progress and, once every node
//! was restarted, `finishedAt`: the same annotation value restarts nothing
//! again, and a new value starts a new restart.
//!
//! [`step`] decides; it is pure, and the controller carries out its pod
//! deletion and Event.

use std::collections::{BTreeMap, BTreeSet};

use kv_core::{NodeState, Topology};

use super::crd::{KvCluster, RESTARTED_AT, RestartStatus, RestartingNode};
use kv_control::planner::NodeProgress;

/// What the controller saw of one node's pod and process.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeView {
    /// The pod's UID, when the pod exists.
    pub pod_uid: Option<String>,
    pub ready: bool,
    pub report: Option<NodeProgress>,
    /// The node reports its store is new or rebuilt and still pulling.
    pub store_catching_up: bool,
}

/// What one reconcile does for the restart.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Step {
    /// `status.lastRestart` to write (the previous one when nothing is asked).
    pub status: Option<RestartStatus>,
    /// Delete this node's pod now.
    pub delete: Option<u32>,
    /// An Event: (reason, note).
    pub event: Option<(&'static str, String)>,
}

impl Step {
    /// A restart is asked for and not finished.
    pub fn in_progress(&self) -> bool {
        self.status
            .as_ref()
            .is_some_and(|r| r.finished_at.is_none())
    }
}

pub use kv_crd::kvcluster::request_now;

/// The annotation's value, when it asks for something.
pub fn requested(kvc: &KvCluster) -> Option<&str> {
    kvc.metadata
        .annotations
        .as_ref()?
        .get(RESTARTED_AT)
        .map(|v| v.trim())
        .filter(|v| !v.is_empty())
}

/// Is node `o` back: Up, Ready, reporting `t`'s epoch as its own and as
/// synced, not rebuilding its store.
fn caught_up(t: &Topology, o: u32, v: Option<&NodeView>) -> bool {
    t.state_of(o) == Some(NodeState::Up)
        && v.is_some_and(|v| {
            v.ready
                && !v.store_catching_up
                && v.report
                    .as_ref()
                    .is_some_and(|r| r.epoch >= t.epoch && r.synced_epoch >= t.epoch)
        })
}

/// The next step of the restart asked by `requested` (`None`: no
/// annotation), from the last status, the topology after this reconcile's
/// plan, and each node's pod and report. `hold` is why the cluster cannot
/// lose a node now (hibernated, rebalancing), if it cannot.
pub fn step(
    requested: Option<&str>,
    previous: Option<&RestartStatus>,
    t: &Topology,
    nodes: &BTreeMap<u32, NodeView>,
    hold: Option<&str>,
    now: &str,
) -> Step {
    let Some(requested) = requested else {
        return Step {
            status: previous.cloned(),
            ..Step::default()
        };
    };
    let mut event = None;
    let mut r = match previous {
        Some(r) if r.requested_at == requested => r.clone(),
        _ => {
            event = Some((
                "RestartRequested",
                format!(
                    "rolling restart {requested}: one node at a time, each Up and caught up before the next"
                ),
            ));
            RestartStatus {
                requested_at: requested.to_string(),
                ..RestartStatus::default()
            }
        }
    };
    if r.finished_at.is_some() {
        return Step {
            status: Some(r),
            ..Step::default()
        };
    }
    let done = |r: RestartStatus, event| Step {
        status: Some(r),
        delete: None,
        event,
    };
    // The node being restarted: back on a new pod and caught up?
    if let Some(cur) = r.restarting.clone() {
        let v = nodes.get(&cur.ordinal);
        let new_pod = v
            .and_then(|v| v.pod_uid.as_deref())
            .is_some_and(|uid| uid != cur.pod_uid);
        if !(new_pod && caught_up(t, cur.ordinal, v)) {
            r.waiting_for = Some(format!(
                "node {} to be back on a new pod, Up and caught up (synced epoch {})",
                cur.ordinal, t.epoch
            ));
            return done(r, event);
        }
        r.restarted.push(cur.ordinal);
        r.restarting = None;
    }
    if let Some(why) = hold {
        r.waiting_for = Some(why.to_string());
        return done(r, event);
    }
    let restarted: BTreeSet<u32> = r.restarted.iter().copied().collect();
    let Some(next) = t
        .nodes
        .iter()
        .map(|n| n.ordinal)
        .find(|o| !restarted.contains(o))
    else {
        r.waiting_for = None;
        r.finished_at = Some(now.to_string());
        let note = format!(
            "rolling restart {} finished: nodes {:?} restarted",
            r.requested_at, r.restarted
        );
        return done(r, Some(("RestartFinished", note)));
    };
    let behind: Vec<u32> = t
        .nodes
        .iter()
        .map(|n| n.ordinal)
        .filter(|&o| !caught_up(t, o, nodes.get(&o)))
        .collect();
    if !behind.is_empty() {
        r.waiting_for = Some(format!(
            "nodes {behind:?} to be Up, Ready and caught up before node {next} is restarted"
        ));
        return done(r, event);
    }
    let Some(uid) = nodes.get(&next).and_then(|v| v.pod_uid.clone()) else {
        r.waiting_for = Some(format!("the pod of node {next}"));
        return done(r, event);
    };
    r.restarting = Some(RestartingNode {
        ordinal: next,
        pod_uid: uid,
    });
    r.waiting_for = None;
    let note = format!(
        "rolling restart {}: restarting node {next} ({} of {} done)",
        r.requested_at,
        r.restarted.len(),
        t.nodes.len()
    );
    Step {
        status: Some(r),
        delete: Some(next),
        event: Some(("RestartingNode", note)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topology(states: &[NodeState]) -> Topology {
        let kvc = KvCluster::new("demo", serde_yaml::from_str("{}").expect("spec"));
        Topology {
            cluster_id: "c".into(),
            epoch: 4,
            read_consistency: kv_core::Consistency::Quorum,
            write_consistency: kv_core::Consistency::Quorum,
            placement: kvc.spec.desired().placement(),
            pending: None,
            nodes: states
                .iter()
                .enumerate()
                .map(|(i, s)| super::super::objects::node_info(&kvc, i as u32, *s))
                .collect(),
        }
    }

    fn healthy(uid: &str) -> NodeView {
        NodeView {
            pod_uid: Some(uid.into()),
            ready: true,
            report: Some(NodeProgress {
                epoch: 4,
                synced_epoch: 4,
                resync_progress: 1.0,
            }),
            store_catching_up: false,
        }
    }

    fn all_healthy(pods: &str) -> BTreeMap<u32, NodeView> {
        (0..3)
            .map(|o| (o, healthy(&format!("{pods}-{o}"))))
            .collect()
    }

    const NOW: &str = "2026-01-01T00:00:00Z";

    #[test]
    fn no_annotation_restarts_nothing_and_keeps_the_last_record() {
        let t = topology(&[NodeState::Up; 3]);
        let last = RestartStatus {
            requested_at: "a".into(),
            finished_at: Some(NOW.into()),
            ..RestartStatus::default()
        };
        let s = step(None, Some(&last), &t, &all_healthy("p"), None, NOW);
        assert_eq!(s.delete, None);
        assert_eq!(s.status, Some(last));
    }

    #[test]
    fn a_restart_goes_one_node_at_a_time_each_back_and_caught_up_before_the_next() {
        let t = topology(&[NodeState::Up; 3]);
        let mut nodes = all_healthy("old");
        let s = step(Some("r1"), None, &t, &nodes, None, NOW);
        assert_eq!(s.delete, Some(0));
        assert_eq!(s.event.as_ref().map(|e| e.0), Some("RestartingNode"));
        let mut last = s.status.expect("status");

        // Pod 0 is gone, then back on a new pod but not caught up: wait.
        nodes.remove(&0);
        let s = step(Some("r1"), Some(&last), &t, &nodes, None, NOW);
        assert_eq!(s.delete, None);
        let mut back = healthy("new-0");
        back.report = Some(NodeProgress {
            epoch: 4,
            synced_epoch: 0,
            resync_progress: 0.0,
        });
        nodes.insert(0, back);
        let s = step(Some("r1"), Some(&last), &t, &nodes, None, NOW);
        assert_eq!(s.delete, None, "synced epoch 0 < 4");
        assert!(
            s.status
                .as_ref()
                .and_then(|r| r.waiting_for.as_deref())
                .is_some_and(|w| w.contains("node 0")),
            "{s:?}"
        );

        // Caught up: node 1 next.
        nodes.insert(0, healthy("new-0"));
        let s = step(Some("r1"), Some(&last), &t, &nodes, None, NOW);
        assert_eq!(s.delete, Some(1));
        last = s.status.expect("status");
        assert_eq!(last.restarted, [0]);
        nodes.insert(1, healthy("new-1"));
        let s = step(Some("r1"), Some(&last), &t, &nodes, None, NOW);
        assert_eq!(s.delete, Some(2));
        last = s.status.expect("status");
        nodes.insert(2, healthy("new-2"));
        let s = step(Some("r1"), Some(&last), &t, &nodes, None, NOW);
        assert_eq!(s.delete, None);
        let done = s.status.expect("status");
        assert_eq!(done.restarted, [0, 1, 2]);
        assert_eq!(done.finished_at.as_deref(), Some(NOW));
        assert_eq!(s.event.as_ref().map(|e| e.0), Some("RestartFinished"));

        // The same value again: nothing; a new value: a new restart.
        let s = step(Some("r1"), Some(&done), &t, &nodes, None, NOW);
        assert_eq!((s.delete, s.event), (None, None));
        let s = step(Some("r2"), Some(&done), &t, &nodes, None, NOW);
        assert_eq!(s.delete, Some(0));
    }

    #[test]
    fn a_restart_waits_while_a_node_is_down_or_the_cluster_is_held() {
        let t = topology(&[NodeState::Up, NodeState::Failed, NodeState::Up]);
        let mut nodes = all_healthy("p");
        nodes.remove(&1);
        let s = step(Some("r"), None, &t, &nodes, None, NOW);
        assert_eq!(s.delete, None);
        assert!(
            s.status
                .and_then(|r| r.waiting_for)
                .is_some_and(|w| w.contains("[1]"))
        );
        let t = topology(&[NodeState::Up; 3]);
        let s = step(
            Some("r"),
            None,
            &t,
            &all_healthy("p"),
            Some("hibernated"),
            NOW,
        );
        assert_eq!(s.delete, None);
        let s = step(Some("r"), None, &t, &all_healthy("p"), None, NOW);
        let mut catching = all_healthy("p");
        if let Some(v) = catching.get_mut(&2) {
            v.store_catching_up = true;
        }
        assert_eq!(s.delete, Some(0));
        let s = step(Some("r"), None, &t, &catching, None, NOW);
        assert_eq!(s.delete, None, "node 2 is rebuilding its store");
    }
}
