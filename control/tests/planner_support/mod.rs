//! Helpers shared by the planner tests.
#![allow(dead_code)]

use std::collections::BTreeMap;

use kv_control::planner::{
    Desired, NodeObservation, NodeProgress, Observed, Plan, PlannerConfig, plan,
};
use kv_core::{NodeState, Topology};

pub fn config() -> PlannerConfig {
    PlannerConfig::new(|o| (format!("n{o}:7400"), format!("n{o}:7401")))
}

/// A node that runs and reports `epoch`, synced up to `synced`.
pub fn reporting(epoch: u64, synced: u64) -> NodeObservation {
    NodeObservation {
        running: true,
        down_since_ms: None,
        report: Some(NodeProgress {
            epoch,
            synced_epoch: synced,
            resync_progress: if synced >= epoch { 1.0 } else { 0.5 },
        }),
    }
}

/// A node that runs but has not answered yet.
pub fn running() -> NodeObservation {
    NodeObservation {
        running: true,
        down_since_ms: None,
        report: None,
    }
}

/// A node down since `since` (ms).
pub fn down(since: u64) -> NodeObservation {
    NodeObservation {
        running: false,
        down_since_ms: Some(since),
        report: None,
    }
}

pub const NOW: u64 = 1_000_000;

pub fn observed(topology: Option<Topology>, nodes: Vec<(u32, NodeObservation)>) -> Observed {
    Observed {
        cluster_id: "ns/demo".into(),
        epoch_floor: topology.as_ref().map_or(0, |t| t.epoch),
        topology,
        now_ms: NOW,
        nodes: nodes.into_iter().collect::<BTreeMap<_, _>>(),
    }
}

/// Every ordinal in `0..n` running and synced at `epoch`.
pub fn all_synced(n: u32, epoch: u64) -> Vec<(u32, NodeObservation)> {
    (0..n).map(|o| (o, reporting(epoch, epoch))).collect()
}

/// Plan, and check what must hold of every plan.
pub fn step(d: &Desired, o: &Observed) -> Plan {
    let p = plan(d, o, &config());
    if let Some(t) = &p.topology {
        assert_eq!(t.validate(), Ok(()), "every planned topology is valid");
        let cur = o.topology.as_ref().map_or(0, |t| t.epoch);
        assert!(t.epoch > cur && t.epoch > o.epoch_floor, "epochs only rise");
    }
    p
}

/// The topology after `p`.
pub fn after(p: &Plan, o: &Observed) -> Topology {
    p.topology_after(o).cloned().expect("a topology")
}

/// Plan until nothing changes, with every node in `0..n` running and
/// reporting itself synced at the epoch it is given.
pub fn settle(d: &Desired, mut t: Option<Topology>, n: u32) -> (Topology, Vec<Plan>) {
    let mut plans = Vec::new();
    for _ in 0..10 {
        let epoch = t.as_ref().map_or(0, |t| t.epoch);
        let o = observed(t.clone(), all_synced(n, epoch));
        let p = step(d, &o);
        let changed = p.topology.is_some();
        t = Some(after(&p, &o));
        plans.push(p);
        if !changed {
            return (t.expect("topology"), plans);
        }
    }
    panic!("the planner did not settle in 10 steps: {plans:#?}");
}

pub fn states(t: &Topology) -> Vec<(u32, NodeState)> {
    t.nodes.iter().map(|n| (n.ordinal, n.state)).collect()
}

pub fn desired(replicas: u32) -> Desired {
    Desired {
        replicas,
        ..Desired::default()
    }
}
