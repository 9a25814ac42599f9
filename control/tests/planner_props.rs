//! Property tests: random sequences of spec changes, hold-downs, crashes,
//! restarts, node reports and time steps, fed to the planner like a platform
//! would (carrying out its actions), with the planner's guarantees checked
//! after every step.

mod planner_support;

use std::collections::{BTreeMap, BTreeSet};

use kv_control::planner::{
    Action, Desired, NodeObservation, NodeProgress, Observed, Phase, Plan, Rebalance, plan,
};
use kv_core::{BUCKETS, Consistency, NodeState, Placement, Strategy as Placing, Topology};
use planner_support::config;
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Replicas(u32),
    Factor(u32),
    Strategy(bool),
    Write(u8),
    Hold(u32),
    Release(u32),
    Force(bool),
    /// The process dies and stays dead until `Restart`.
    Crash(u32),
    /// The process is back (a human or the StatefulSet restarted it).
    Restart(u32),
    /// The node has pulled everything for the epoch it holds.
    Sync(u32),
    SyncAll,
    Tick(u64),
    /// `spec.hibernation` set or cleared.
    Hibernate(bool),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (0u32..=6).prop_map(Op::Replicas),
        1 => (0u32..=4).prop_map(Op::Factor),
        1 => any::<bool>().prop_map(Op::Strategy),
        1 => (0u8..3).prop_map(Op::Write),
        2 => (0u32..6).prop_map(Op::Hold),
        2 => (0u32..6).prop_map(Op::Release),
        1 => any::<bool>().prop_map(Op::Force),
        2 => (0u32..6).prop_map(Op::Crash),
        2 => (0u32..6).prop_map(Op::Restart),
        3 => (0u32..6).prop_map(Op::Sync),
        3 => Just(Op::SyncAll),
        3 => (0u64..=12_000).prop_map(Op::Tick),
        1 => any::<bool>().prop_map(Op::Hibernate),
    ]
}

#[derive(Clone, Debug, Default)]
struct SimNode {
    running: bool,
    /// Dead until a `Restart` op: `Start` actions do not bring it back.
    broken: bool,
    down_since: Option<u64>,
    /// Epoch of the topology the node holds.
    epoch: u64,
    synced: u64,
}

struct Sim {
    desired: Desired,
    topology: Option<Topology>,
    floor: u64,
    now: u64,
    nodes: BTreeMap<u32, SimNode>,
    /// Epoch at which each node entered Recovering or Joining.
    entered: BTreeMap<u32, u64>,
}

impl Sim {
    fn observed(&self) -> Observed {
        Observed {
            cluster_id: "ns/demo".into(),
            topology: self.topology.clone(),
            epoch_floor: self.floor,
            now_ms: self.now,
            nodes: self
                .nodes
                .iter()
                .map(|(&o, n)| {
                    (
                        o,
                        NodeObservation {
                            running: n.running,
                            down_since_ms: n.down_since,
                            report: n.running.then_some(NodeProgress {
                                epoch: n.epoch,
                                synced_epoch: n.synced,
                                resync_progress: if n.synced >= n.epoch { 1.0 } else { 0.3 },
                            }),
                        },
                    )
                })
                .collect(),
        }
    }

    fn node(&mut self, o: u32) -> &mut SimNode {
        self.nodes.entry(o).or_default()
    }

    fn stop(&mut self, o: u32) {
        let now = self.now;
        let n = self.node(o);
        if n.running {
            n.running = false;
            n.down_since = Some(now);
        }
    }

    /// Apply an op; returns the desired spec to plan with.
    fn apply(&mut self, op: &Op) -> Desired {
        let mut d = self.desired.clone();
        match *op {
            Op::Replicas(r) => d.replicas = r,
            Op::Factor(f) => d.factor = f,
            Op::Strategy(full) => {
                d.strategy = if full {
                    Placing::Full
                } else {
                    Placing::ConsistentHashing
                }
            }
            Op::Write(w) => {
                d.write_consistency =
                    [Consistency::One, Consistency::Quorum, Consistency::All][usize::from(w) % 3]
            }
            Op::Hold(o) => {
                d.failed_nodes.insert(o);
            }
            Op::Release(o) => {
                d.failed_nodes.remove(&o);
            }
            Op::Force(f) => d.force = f,
            Op::Crash(o) => {
                self.stop(o);
                self.node(o).broken = true;
            }
            Op::Restart(o) => {
                let epoch = self.topology.as_ref().map_or(0, |t| t.epoch);
                let n = self.node(o);
                n.broken = false;
                if !n.running {
                    n.running = true;
                    n.down_since = None;
                    n.epoch = n.epoch.max(epoch);
                }
            }
            Op::Sync(o) => {
                let n = self.node(o);
                if n.running {
                    n.synced = n.epoch;
                }
            }
            Op::SyncAll => {
                for n in self.nodes.values_mut().filter(|n| n.running) {
                    n.synced = n.epoch;
                }
            }
            Op::Tick(ms) => self.now += ms,
            Op::Hibernate(h) => d.hibernate = h,
        }
        d
    }

    /// Carry out a plan like a platform would.
    fn carry_out(&mut self, p: &Plan) {
        let epoch = p.topology_after(&self.observed()).map_or(0, |t| t.epoch);
        if let Some(t) = &p.topology {
            self.topology = Some(t.clone());
            self.floor = self.floor.max(t.epoch);
        }
        for a in &p.actions {
            match *a {
                Action::Kill(o) | Action::Stop(o) => self.stop(o),
                Action::PushTopology => {
                    for n in self.nodes.values_mut().filter(|n| n.running) {
                        n.epoch = n.epoch.max(epoch);
                    }
                }
                Action::Start(o) => {
                    let n = self.node(o);
                    if !n.broken && !n.running {
                        n.running = true;
                        n.down_since = None;
                        n.epoch = n.epoch.max(epoch);
                    }
                }
            }
        }
    }
}

fn state(t: &Topology, o: u32) -> Option<NodeState> {
    t.state_of(o)
}

/// Every guarantee of one step from `before` (with `observed`) to `p`.
fn check_step(
    d: &Desired,
    observed: &Observed,
    p: &Plan,
    entered: &BTreeMap<u32, u64>,
) -> Result<(), TestCaseError> {
    let before = observed.topology.as_ref();
    if let Some(r) = &p.refusal {
        prop_assert!(p.topology.is_none(), "refused ({}) yet changed", r.reason);
        prop_assert!(p.actions.is_empty() && p.transitions.is_empty());
        return Ok(());
    }
    let Some(after) = p.topology_after(observed) else {
        return Err(TestCaseError::fail("no topology after an accepted plan"));
    };
    prop_assert_eq!(after.validate(), Ok(()));
    if let Some(t) = &p.topology {
        let cur = before.map_or(0, |b| b.epoch);
        prop_assert!(
            t.epoch > cur && t.epoch > observed.epoch_floor,
            "epoch rises"
        );
    }

    // Hibernated: every node stopped, the topology left as it is (a first
    // one only for a cluster that had none), nobody's state changed.
    // Otherwise hibernation waits only for a pending placement change.
    if p.phase == Phase::Hibernated {
        prop_assert!(d.hibernate);
        prop_assert!(p.topology.is_none() || before.is_none());
        prop_assert_eq!(p.node_count, 0);
        prop_assert!(p.transitions.is_empty(), "{:?}", p.transitions);
        prop_assert!(
            p.actions.iter().all(|a| matches!(a, Action::Stop(_))),
            "{:?}",
            p.actions
        );
        return Ok(());
    }
    if d.hibernate {
        prop_assert!(
            before.is_some_and(|t| t.pending.is_some()),
            "hibernation deferred without a pending placement"
        );
        prop_assert!(p.hibernation_deferred.is_some());
    }

    // The node set is exactly the owners of the two placements.
    let members: BTreeSet<u32> = after
        .placement
        .members
        .iter()
        .chain(after.pending.iter().flat_map(|p| p.members.iter()))
        .copied()
        .collect();
    let nodes: BTreeSet<u32> = after.nodes.iter().map(|n| n.ordinal).collect();
    prop_assert_eq!(&members, &nodes);
    prop_assert!(p.node_count >= nodes.iter().max().map_or(0, |m| m + 1));

    // Held-down nodes are Failed; only they are killed, never started.
    for &o in &d.failed_nodes {
        if let Some(s) = state(after, o) {
            prop_assert_eq!(s, NodeState::Failed, "held node {} is fenced", o);
        }
    }
    for a in &p.actions {
        match *a {
            Action::Kill(o) => prop_assert!(d.failed_nodes.contains(&o)),
            Action::Start(o) => {
                prop_assert!(!d.failed_nodes.contains(&o));
                // A member of the topology, or a new one started before it
                // may own anything.
                prop_assert!(nodes.contains(&o) || o < d.replicas);
                prop_assert!(o < p.node_count);
            }
            Action::Stop(o) => {
                prop_assert!(
                    !nodes.contains(&o),
                    "node {} stopped while in the topology",
                    o
                );
                // Only once no node can still route to it: the topology
                // without it is the one every staying node answers with.
                prop_assert!(p.topology.is_none(), "node {} stopped as it left", o);
                for n in after.nodes.iter().filter(|n| n.state != NodeState::Failed) {
                    let behind = observed
                        .nodes
                        .get(&n.ordinal)
                        .and_then(|x| x.report.as_ref())
                        .is_some_and(|r| r.epoch < after.epoch);
                    prop_assert!(
                        !behind,
                        "node {} stopped while node {} is behind",
                        o,
                        n.ordinal
                    );
                }
            }
            Action::PushTopology => {}
        }
    }

    let Some(before) = before else {
        return Ok(());
    };
    let report = |o: u32| observed.nodes.get(&o).and_then(|n| n.report.as_ref());

    // A node new to the pending placement answered before it became an owner.
    if let Some(pending) = &after.pending {
        for &o in &pending.members {
            let known = before.placement.members.contains(&o)
                || before
                    .pending
                    .as_ref()
                    .is_some_and(|bp| bp.members.contains(&o));
            if !known && !d.failed_nodes.contains(&o) {
                prop_assert!(
                    report(o).is_some(),
                    "node {} owns data before it answers",
                    o
                );
            }
        }
    }

    // Up from Recovering or Joining only with a report synced at the entry epoch.
    for n in &after.nodes {
        let prev = state(before, n.ordinal);
        if n.state == NodeState::Up && prev != Some(NodeState::Up) {
            prop_assert!(
                prev.is_some(),
                "a node new to a topology is never Up at once"
            );
            prop_assert_ne!(prev, Some(NodeState::Failed), "Failed never jumps to Up");
            if matches!(prev, Some(NodeState::Recovering | NodeState::Joining)) {
                let need = entered.get(&n.ordinal).copied().unwrap_or(u64::MAX);
                let synced = report(n.ordinal).map_or(0, |r| r.synced_epoch);
                prop_assert!(
                    synced >= need,
                    "node {} Up with synced {} < entry epoch {}",
                    n.ordinal,
                    synced,
                    need
                );
            }
        }
    }

    // A committed placement never loses every holder of a bucket's data.
    if after.placement != before.placement {
        prop_assert_eq!(Some(&after.placement), before.pending.as_ref());
        prop_assert_eq!(p.rebalance, Some(Rebalance::Committed));
        let old = Placement::new(&before.placement);
        let new = Placement::new(&after.placement);
        let holder = |o: u32, b: u32| {
            state(after, o).is_some_and(|s| s != NodeState::Failed)
                && state(before, o).is_some_and(|s| s != NodeState::Failed)
                && (old.owns(o, b) || report(o).is_some_and(|r| r.synced_epoch >= before.epoch))
        };
        for b in 0..BUCKETS {
            prop_assert!(
                new.owners(b).iter().any(|&o| holder(o, b)),
                "bucket {} lost every holder: {:?}",
                b,
                new.owners(b)
            );
        }
    }
    Ok(())
}

fn initial() -> impl Strategy<Value = Desired> {
    (1u32..=5, any::<bool>(), 1u32..=3).prop_map(|(replicas, full, factor)| Desired {
        replicas,
        strategy: if full {
            Placing::Full
        } else {
            Placing::ConsistentHashing
        },
        factor: factor.min(replicas),
        ..Desired::default()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn the_planner_keeps_its_guarantees_through_random_histories(
        start in initial(),
        ops in prop::collection::vec(op(), 1..50),
    ) {
        let cfg = config();
        let mut sim = Sim {
            desired: start,
            topology: None,
            floor: 0,
            now: 1_000_000,
            nodes: BTreeMap::new(),
            entered: BTreeMap::new(),
        };
        let first = plan(&sim.desired, &sim.observed(), &cfg);
        prop_assert!(first.refusal.is_none());
        prop_assert!(first.topology.is_some());
        sim.carry_out(&first);
        let mut last_epoch = sim.topology.as_ref().map_or(0, |t| t.epoch);

        for op in &ops {
            let d = sim.apply(op);
            let observed = sim.observed();
            let p = plan(&d, &observed, &cfg);
            check_step(&d, &observed, &p, &sim.entered)?;

            // Idempotent: the same observations against the new topology change nothing.
            if let Some(t) = &p.topology {
                let mut again = observed.clone();
                again.topology = Some(t.clone());
                again.epoch_floor = again.epoch_floor.max(t.epoch);
                let q = plan(&d, &again, &cfg);
                prop_assert!(q.refusal.is_none(), "refused on its own output: {:?}", q.refusal);
                prop_assert!(q.topology.is_none(), "not idempotent after {:?}", op);
                prop_assert!(q.kills().next().is_none(), "killed twice");
            }

            if p.refusal.is_none() {
                sim.desired = d;
                if let Some(t) = &p.topology {
                    for n in &t.nodes {
                        let prev = sim.topology.as_ref().and_then(|b| b.state_of(n.ordinal));
                        if matches!(n.state, NodeState::Recovering | NodeState::Joining)
                            && prev != Some(n.state)
                        {
                            sim.entered.insert(n.ordinal, t.epoch);
                        }
                    }
                }
            }
            sim.carry_out(&p);
            let epoch = sim.topology.as_ref().map_or(0, |t| t.epoch);
            prop_assert!(epoch >= last_epoch, "epoch went back");
            last_epoch = epoch;
        }
    }

    /// Whatever is pending settles once every node runs and syncs: the
    /// planner cannot wedge itself.
    #[test]
    fn a_cluster_whose_nodes_all_run_and_sync_settles_on_the_desired_placement(
        start in initial(),
        target in initial(),
    ) {
        let cfg = config();
        let mut sim = Sim {
            desired: start,
            topology: None,
            floor: 0,
            now: 1_000_000,
            nodes: BTreeMap::new(),
            entered: BTreeMap::new(),
        };
        let first = plan(&sim.desired, &sim.observed(), &cfg);
        sim.carry_out(&first);
        sim.desired = target.clone();
        let mut settled = false;
        for _ in 0..12 {
            sim.apply(&Op::SyncAll);
            let p = plan(&sim.desired, &sim.observed(), &cfg);
            prop_assert!(p.refusal.is_none());
            let changed = p.topology.is_some();
            sim.carry_out(&p);
            if !changed && p.actions.is_empty() {
                settled = true;
                break;
            }
        }
        prop_assert!(settled, "did not settle");
        let t = sim.topology.clone().expect("topology");
        prop_assert_eq!(t.pending, None);
        prop_assert_eq!(t.placement, target.placement());
        prop_assert!(t.nodes.iter().all(|n| n.state == NodeState::Up));
    }
}
