//! The control plane's decisions, as one pure function: [`plan`].
//!
//! The planner takes what the user asked for ([`Desired`]), what the platform
//! saw ([`Observed`]: the topology it holds, each node's process or pod and
//! the node's own report from `GET /v1/cluster`) and a few settings
//! ([`PlannerConfig`]), and returns a [`Plan`]: the next topology (when it
//! changes), what to do to processes or pods, the node state changes to
//! announce, and the status to show. No I/O and no Kubernetes types: the
//! Kubernetes controller and the local platform (`kvctl up`) both drive it.
//!
//! Node states follow SPEC §3:
//! - an ordinal in [`Desired::failed_nodes`] is `Failed` (held down, fenced);
//!   it gets one [`Action::Kill`] when it enters that state, and stays Failed
//!   even when its process runs again, until it leaves the set;
//! - a node unreachable for at least [`PlannerConfig::failure_detection_ms`]
//!   is `Failed`;
//! - a `Failed` node that is not held down and is back becomes `Recovering`
//!   (or `Joining` when it only owns data in the pending placement);
//! - `Recovering` becomes `Up` only when the node reports
//!   `syncedEpoch >= ` the epoch of the topology it is planned against. That
//!   topology is the one that made it Recovering or a later one, so the rule
//!   is at least as strict as "synced since it entered the state" (the
//!   topology does not record when each node entered its state).
//!
//! Placement changes (replicas, factor, strategy) are two-phase: the new
//! placement goes into `pending`, new ordinals are `Joining`, removed ones
//! `Leaving`. New ordinals are started first and enter the pending placement
//! only once each answers (an owner that is not there yet would fail the
//! pending quorum of every write to its keys). It is committed only when every owner of the pending placement
//! that is not `Failed` (and was not `Failed` before this plan) reports
//! `syncedEpoch >=` the current epoch, every node that answers (Leaving ones
//! too: any node coordinates writes) reports at least the current epoch, and
//! every bucket of the pending placement keeps at least one such owner. Then
//! the Leaving nodes leave the topology and the Joining ones are Up; the
//! Leaving nodes are stopped only once every node that stays reports the
//! committed topology, so that no node routes to a stopped one.
//! A new change while one is pending replaces the pending placement (a new
//! epoch: streaming restarts), or cancels it when the committed placement is
//! asked for again.
//!
//! Hibernation ([`Desired::hibernate`]) stops every node and leaves the
//! topology as it is: nodes absent because they were stopped on request are
//! not failures, no epoch is issued and nothing is rebalanced, so waking up
//! brings the same nodes back in the same states with their own stores (no
//! catch-up). It waits while a placement change is pending
//! ([`Plan::hibernation_deferred`]), and spec changes made meanwhile are
//! planned after the wake-up.
//!
//! Every topology the planner returns passes [`Topology::validate`], has an
//! epoch above the current one, the epoch floor and every epoch a node
//! reports, and planning again on it with the same observations returns no
//! new topology.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use kv_core::{
    BUCKETS, Consistency, NodeInfo, NodeState, Placement, PlacementSpec, Strategy, Topology,
};

/// The largest cluster the planner plans for: the topology's limit
/// ([`kv_core::MAX_NODES`]), so a larger request is refused here with its
/// reason rather than failing later as an invalid topology.
pub const MAX_NODES: u32 = kv_core::MAX_NODES as u32;

/// What the user asked for: the KvCluster spec, or `kvctl up`'s flags and
/// control routes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    /// Number of nodes, ordinals `0..replicas`.
    pub replicas: u32,
    pub strategy: Strategy,
    /// Owners per key with `ConsistentHashing`; must be 1..=replicas. Ignored
    /// by `Full` (but must not be 0).
    pub factor: u32,
    pub read_consistency: Consistency,
    pub write_consistency: Consistency,
    /// Ordinals held down on purpose (`spec.faultInjection.failedNodes`,
    /// `kvctl fail`).
    pub failed_nodes: BTreeSet<u32>,
    /// Accept a hold-down that leaves some key with fewer live owners than
    /// the write consistency needs (writes to it fail until released).
    pub force: bool,
    /// Stop every node and keep its store (`spec.hibernation`): see
    /// [`Phase::Hibernated`]. Deferred while a placement change is pending.
    pub hibernate: bool,
}

impl Default for Desired {
    /// The KvCluster defaults (SPEC §2): 3 replicas, `ConsistentHashing`,
    /// factor 3, `Quorum`/`Quorum`.
    fn default() -> Self {
        Desired {
            replicas: 3,
            strategy: Strategy::ConsistentHashing,
            factor: 3,
            read_consistency: Consistency::Quorum,
            write_consistency: Consistency::Quorum,
            failed_nodes: BTreeSet::new(),
            force: false,
            hibernate: false,
        }
    }
}

impl Desired {
    /// How many of `nodes` (ordinal, state) are Failed because this holds
    /// them down: a drill, not a failure (the metrics tell them apart).
    pub fn held_down(&self, nodes: impl IntoIterator<Item = (u32, NodeState)>) -> usize {
        nodes
            .into_iter()
            .filter(|(o, s)| *s == NodeState::Failed && self.failed_nodes.contains(o))
            .count()
    }

    /// The placement this asks for. `Full` records the member count as its
    /// factor, so that two placements are equal exactly when they place
    /// every bucket on the same nodes.
    pub fn placement(&self) -> PlacementSpec {
        let factor = match self.strategy {
            Strategy::Full => self.replicas,
            Strategy::ConsistentHashing => self.factor.min(self.replicas),
        };
        PlacementSpec {
            strategy: self.strategy,
            factor,
            members: (0..self.replicas).collect(),
        }
    }
}

/// What the planner needs of a node's report ([`kv_core::NodeReport`], its
/// `GET /v1/cluster`): how far it has caught up with which topology.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeProgress {
    /// `topology.epoch`: the epoch of the topology the node holds.
    pub epoch: u64,
    /// `syncedEpoch`: the highest epoch for which the node has pulled every
    /// bucket it must hold.
    pub synced_epoch: u64,
    /// `resyncProgress` (0..1) of its current catch-up or streaming.
    pub resync_progress: f64,
}

impl From<&kv_core::NodeReport> for NodeProgress {
    fn from(r: &kv_core::NodeReport) -> Self {
        NodeProgress {
            epoch: r.epoch(),
            synced_epoch: r.synced_epoch,
            resync_progress: r.resync_progress,
        }
    }
}

/// What the platform saw of one ordinal.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeObservation {
    /// The process (or the pod's container) exists and has started.
    pub running: bool,
    /// Since when the node has been unreachable (not running, or running
    /// but not answering), in ms since the Unix epoch. `None` when it is fine
    /// or when no time is known: failure detection only counts from a time
    /// the caller gives, so a node the platform has not seen yet (just
    /// added, not started) is not Failed before it had a chance to start.
    pub down_since_ms: Option<u64>,
    /// The node's report, when it answered.
    pub report: Option<NodeProgress>,
}

impl NodeObservation {
    /// The node answers, or runs and is not known to be unreachable.
    pub fn alive(&self) -> bool {
        self.report.is_some() || (self.running && self.down_since_ms.is_none())
    }
}

/// What the platform saw.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observed {
    /// Stable identity of the cluster (the KvCluster's `namespace/name`, or
    /// the local data directory's id), so that nodes keep their data when the
    /// topology is rewritten.
    pub cluster_id: String,
    /// The topology the control plane holds (ConfigMap, local state file),
    /// if there is a valid one.
    pub topology: Option<Topology>,
    /// The last epoch the control plane knows it issued: the next one is
    /// above it even if the stored topology was lost.
    pub epoch_floor: u64,
    /// Now, in ms since the Unix epoch.
    pub now_ms: u64,
    /// Per ordinal; an ordinal missing here is neither running nor
    /// reporting, with no known down time (see
    /// [`NodeObservation::down_since_ms`]).
    pub nodes: BTreeMap<u32, NodeObservation>,
}

/// Client and peer `host:port` of an ordinal.
pub type AddressFn = Arc<dyn Fn(u32) -> (String, String) + Send + Sync>;

/// Settings of the planner.
#[derive(Clone)]
pub struct PlannerConfig {
    /// How long a node may be unreachable before it is Failed.
    pub failure_detection_ms: u64,
    /// The client and peer address of each ordinal: DNS names on Kubernetes,
    /// loopback ports locally.
    pub addresses: AddressFn,
}

impl PlannerConfig {
    pub const DEFAULT_FAILURE_DETECTION_MS: u64 = 10_000;

    /// Default failure detection time (10 s) and the given addresses.
    pub fn new(addresses: impl Fn(u32) -> (String, String) + Send + Sync + 'static) -> Self {
        PlannerConfig {
            failure_detection_ms: Self::DEFAULT_FAILURE_DETECTION_MS,
            addresses: Arc::new(addresses),
        }
    }

    pub fn with_failure_detection_ms(mut self, ms: u64) -> Self {
        self.failure_detection_ms = ms;
        self
    }
}

impl fmt::Debug for PlannerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PlannerConfig")
            .field("failure_detection_ms", &self.failure_detection_ms)
            .finish_non_exhaustive()
    }
}

/// Something the platform must do, in the order the plan lists them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Action {
    /// Kill the node now (delete the pod, SIGKILL the process): it was just
    /// held down. Sent once; the node stays fenced while held down. Locally,
    /// do not restart it until the plan says [`Action::Start`].
    Kill(u32),
    /// Write the plan's topology (or the current one) where nodes read it and
    /// push it to every running node. Comes before any `Stop`, so that nodes
    /// learn a placement without the stopped ones before those go.
    PushTopology,
    /// Stop the node for good: it left the topology after a committed
    /// scale-down (or a cancelled join), and every node that stays reports
    /// that topology. Kubernetes does this by lowering the StatefulSet's
    /// replicas to [`Plan::node_count`].
    Stop(u32),
    /// Start the node: it belongs to the topology, is not held down and is
    /// not running. Repeated every plan until it runs (a no-op on
    /// Kubernetes, where the StatefulSet starts pods).
    Start(u32),
}

/// A node changing state, for Events and log lines.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub ordinal: u32,
    /// `None` for a node new to the topology.
    pub from: Option<NodeState>,
    pub to: NodeState,
    pub reason: String,
}

/// Why the planner refused the request. Nothing changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub reason: String,
}

/// The cluster as a whole, in one word; the planner never says `WakingUp`
/// (only a platform can tell that pods are not back yet).
pub use crate::phase::Phase;

/// What happened to the placement in this plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rebalance {
    /// A new placement is pending.
    Started,
    /// The pending placement was replaced by a newer request.
    Replaced,
    /// The committed placement was asked for again: nothing is pending now.
    Cancelled,
    /// The pending placement is now the committed one.
    Committed,
}

/// One node, for the status.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeStatus {
    pub ordinal: u32,
    pub state: NodeState,
    /// Catch-up progress (0..1) while Joining or Recovering, when reported.
    pub resync_progress: Option<f64>,
}

/// What to do next.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// The next topology, only when it differs from the observed one.
    pub topology: Option<Topology>,
    pub actions: Vec<Action>,
    pub transitions: Vec<Transition>,
    pub refusal: Option<Refusal>,
    pub phase: Phase,
    pub rebalance: Option<Rebalance>,
    /// Every node of the topology after this plan.
    pub nodes: Vec<NodeStatus>,
    /// Ordinals dropped from the topology by this plan.
    pub removed: Vec<u32>,
    /// Processes or pods the platform must keep: highest ordinal of the
    /// topology after this plan + 1. Stays high during a scale-down until
    /// the Leaving nodes are out of the committed topology and every node
    /// that stays answers with that topology. 0 while hibernated.
    pub node_count: u32,
    /// Why hibernation was asked for but not carried out in this plan (a
    /// placement change is pending: stopping every node then would leave
    /// the new owners half-streamed); the plan carries the change on.
    pub hibernation_deferred: Option<String>,
}

impl Plan {
    /// The topology after this plan: the new one, or the observed one.
    pub fn topology_after<'a>(&'a self, observed: &'a Observed) -> Option<&'a Topology> {
        self.topology.as_ref().or(observed.topology.as_ref())
    }

    pub fn kills(&self) -> impl Iterator<Item = u32> + '_ {
        self.actions.iter().filter_map(|a| match a {
            Action::Kill(o) => Some(*o),
            _ => None,
        })
    }
}

/// Decide the next step. Pure and deterministic.
pub fn plan(desired: &Desired, observed: &Observed, config: &PlannerConfig) -> Plan {
    if let Err(reason) = check(desired, observed) {
        return refused(reason, observed);
    }
    let pending = observed.topology.as_ref().and_then(|t| t.pending.as_ref());
    if desired.hibernate && pending.is_none() {
        return hibernate(desired, observed, config);
    }
    let draft = match &observed.topology {
        None => first(desired, observed, config),
        Some(current) => next(desired, observed, config, current),
    };
    let mut plan = finish(draft, observed);
    if desired.hibernate && plan.refusal.is_none() {
        plan.hibernation_deferred = Some(format!(
            "hibernation waits for the pending placement change to commit (epoch {}): stopping every node now would leave new owners with half their buckets",
            observed.topology.as_ref().map_or(0, |t| t.epoch)
        ));
    }
    plan
}

/// Every node stopped, the topology kept as it is: no node is Failed, no
/// epoch is issued, nothing is rebalanced, so the nodes come back with the
/// same topology and their own stores. Changes of the spec wait for the
/// wake-up. A cluster without a topology gets its first one (all nodes
/// Up), so that it wakes up as it would have started.
fn hibernate(desired: &Desired, observed: &Observed, config: &PlannerConfig) -> Plan {
    let (topology, nodes) = match &observed.topology {
        Some(t) => (None, statuses(t, observed)),
        None => {
            let draft = first(desired, observed, config);
            let mut first = finish(draft, observed);
            if first.refusal.is_some() {
                return first;
            }
            first.actions.clear();
            (first.topology.take(), first.nodes)
        }
    };
    let actions = observed
        .nodes
        .iter()
        .filter(|(_, o)| o.running || o.report.is_some())
        .map(|(&o, _)| Action::Stop(o))
        .collect();
    Plan {
        topology,
        actions,
        transitions: Vec::new(),
        refusal: None,
        phase: Phase::Hibernated,
        rebalance: None,
        nodes,
        removed: Vec::new(),
        node_count: 0,
        hibernation_deferred: None,
    }
}

/// A plan before its epoch and status are settled.
struct Draft {
    topology: Topology,
    changed: bool,
    kills: Vec<u32>,
    transitions: Vec<Transition>,
    rebalance: Option<Rebalance>,
    removed: Vec<u32>,
    creating: bool,
    held: BTreeSet<u32>,
    /// New members of the desired placement that must run and answer before
    /// they become owners: started, kept, not in the topology yet.
    starting: Vec<u32>,
}

fn refused(reason: String, observed: &Observed) -> Plan {
    let nodes = observed
        .topology
        .as_ref()
        .map(|t| statuses(t, observed))
        .unwrap_or_default();
    Plan {
        topology: None,
        actions: Vec::new(),
        transitions: Vec::new(),
        refusal: Some(Refusal { reason }),
        phase: Phase::Failed,
        rebalance: None,
        nodes,
        removed: Vec::new(),
        node_count: observed.topology.as_ref().map_or(0, node_count),
        hibernation_deferred: None,
    }
}

/// Requests that cannot or must not be carried out.
fn check(desired: &Desired, observed: &Observed) -> Result<(), String> {
    let r = desired.replicas;
    if r == 0 {
        return Err("replicas must be at least 1".into());
    }
    if r > MAX_NODES {
        return Err(format!("replicas must be at most {MAX_NODES}, got {r}"));
    }
    if desired.factor == 0 {
        return Err("the replication factor must be at least 1".into());
    }
    if desired.strategy == Strategy::ConsistentHashing && desired.factor > r {
        return Err(format!(
            "replication factor {} exceeds replicas {r}: lower the factor or add replicas",
            desired.factor
        ));
    }
    if let Some(o) = desired.failed_nodes.iter().find(|&&o| o >= r) {
        return Err(format!(
            "failed node {o} is not a node of this cluster (ordinals 0..{r}): remove it from the held-down nodes"
        ));
    }
    if observed.topology.is_none() && observed.cluster_id.trim().is_empty() {
        return Err("the cluster id is empty".into());
    }
    if !desired.force {
        check_writes_stay_possible(desired, observed)?;
    }
    Ok(())
}

/// Holding nodes down must leave every key W live owners, unless forced.
/// Only a request that holds down a node not already Failed is checked, so
/// that a cluster already short of owners can still be changed.
///
/// The planner keeps no memory of when a hold was asked for, so a hold it
/// accepted must stay acceptable on every later plan unless the user asks
/// for more. A held node the topology does not have yet (a new member
/// waiting for the others to start) stays out of it for several plans; it
/// is judged against the target placement with the held nodes alone, so a
/// node that crashes meanwhile does not turn an accepted spec into a
/// refused one (which would stop the whole cluster from being operated).
fn check_writes_stay_possible(desired: &Desired, observed: &Observed) -> Result<(), String> {
    let current = observed.topology.as_ref();
    let state_now = |o: u32| current.and_then(|t| t.state_of(o));
    let failed_now: BTreeSet<u32> = current
        .map(|t| {
            t.nodes
                .iter()
                .filter(|n| n.state == NodeState::Failed)
                .map(|n| n.ordinal)
                .collect()
        })
        .unwrap_or_default();
    let (live, future): (Vec<u32>, Vec<u32>) = desired
        .failed_nodes
        .iter()
        .copied()
        .filter(|&o| state_now(o) != Some(NodeState::Failed))
        .partition(|&o| state_now(o).is_some());
    let target = desired.placement();
    let w = desired.write_consistency;
    let refuse = |newly: &[u32], live: usize, owners: usize| {
        format!(
            "holding down node(s) {newly:?} would leave some keys with {live} of {owners} owners live, \
             but writes at {w} need {}: hold down fewer nodes, lower the write consistency, or force it",
            w.required(owners)
        )
    };
    if !live.is_empty() {
        let down: BTreeSet<u32> = desired.failed_nodes.union(&failed_now).copied().collect();
        let committed = current.map_or_else(|| target.clone(), |t| t.placement.clone());
        let mut specs = vec![committed];
        if specs[0] != target {
            specs.push(target.clone());
        }
        for spec in &specs {
            if let Some((l, owners)) = short_bucket(spec, &down, w) {
                return Err(refuse(&live, l, owners));
            }
        }
    }
    if !future.is_empty()
        && let Some((l, owners)) = short_bucket(&target, &desired.failed_nodes, w)
    {
        return Err(refuse(&future, l, owners));
    }
    Ok(())
}

/// A bucket with fewer than `w` owners outside `down`: (live, owners).
fn short_bucket(
    spec: &PlacementSpec,
    down: &BTreeSet<u32>,
    w: Consistency,
) -> Option<(usize, usize)> {
    let f = spec.effective_factor();
    let members_down = spec.members.iter().filter(|m| down.contains(m)).count();
    if members_down <= f.saturating_sub(w.required(f)) {
        return None;
    }
    let placement = Placement::new(spec);
    (0..BUCKETS).find_map(|b| {
        let owners = placement.owners(b);
        let live = owners.iter().filter(|o| !down.contains(o)).count();
        (live < w.required(owners.len())).then_some((live, owners.len()))
    })
}

fn node_info(config: &PlannerConfig, ordinal: u32, state: NodeState) -> NodeInfo {
    let (address, peer_address) = (config.addresses)(ordinal);
    NodeInfo {
        ordinal,
        address,
        peer_address,
        state,
    }
}

fn transition(ordinal: u32, from: Option<NodeState>, to: NodeState, reason: &str) -> Transition {
    Transition {
        ordinal,
        from,
        to,
        reason: reason.to_string(),
    }
}

/// No topology yet: every node Up (held-down ones Failed) in the desired placement.
fn first(desired: &Desired, observed: &Observed, config: &PlannerConfig) -> Draft {
    let placement = desired.placement();
    let mut kills = Vec::new();
    let mut transitions = Vec::new();
    let nodes = placement
        .members
        .iter()
        .map(|&o| {
            let state = if desired.failed_nodes.contains(&o) {
                kills.push(o);
                transitions.push(transition(o, None, NodeState::Failed, "held down"));
                NodeState::Failed
            } else {
                transitions.push(transition(o, None, NodeState::Up, "created"));
                NodeState::Up
            };
            node_info(config, o, state)
        })
        .collect();
    Draft {
        topology: Topology {
            cluster_id: observed.cluster_id.clone(),
            epoch: 0,
            read_consistency: desired.read_consistency,
            write_consistency: desired.write_consistency,
            placement,
            pending: None,
            nodes,
        },
        changed: true,
        kills,
        transitions,
        rebalance: None,
        removed: Vec::new(),
        creating: true,
        held: desired.failed_nodes.clone(),
        starting: Vec::new(),
    }
}

/// Does the node answer with a topology older than `epoch`? (A node that
/// does not answer is not known to be behind.)
fn reports_below(obs: Option<&NodeObservation>, epoch: u64) -> bool {
    obs.and_then(|o| o.report.as_ref())
        .is_some_and(|r| r.epoch < epoch)
}

/// Has the node pulled everything it must hold at `epoch`?
fn synced(obs: Option<&NodeObservation>, epoch: u64) -> bool {
    obs.and_then(|o| o.report.as_ref())
        .is_some_and(|r| r.synced_epoch >= epoch)
}

fn next(
    desired: &Desired,
    observed: &Observed,
    config: &PlannerConfig,
    current: &Topology,
) -> Draft {
    let epoch = current.epoch;
    let target = desired.placement();
    let committed = current.placement.clone();

    // 1. The placement to move to.
    let (mut pending, mut rebalance) = match &current.pending {
        None if target != committed => (Some(target.clone()), Some(Rebalance::Started)),
        None => (None, None),
        Some(p) if *p == target => (Some(target.clone()), None),
        Some(_) if target == committed => (None, Some(Rebalance::Cancelled)),
        Some(_) => (Some(target.clone()), Some(Rebalance::Replaced)),
    };
    // A new member becomes an owner only once it runs and answers: an owner
    // of the pending placement takes writes at once, and one that is not
    // there yet (a pod being scheduled, a process starting) would fail the
    // pending quorum of every write it owns. Until then it is started and
    // the placement waits.
    let known = |o: &u32| {
        committed.members.contains(o)
            || current
                .pending
                .as_ref()
                .is_some_and(|p| p.members.contains(o))
    };
    let starting: Vec<u32> = target
        .members
        .iter()
        .copied()
        .filter(|o| !known(o) && !desired.failed_nodes.contains(o))
        .collect();
    let waiting = matches!(rebalance, Some(Rebalance::Started | Rebalance::Replaced))
        && starting.iter().any(|o| {
            observed
                .nodes
                .get(o)
                .and_then(|n| n.report.as_ref())
                .is_none()
        });
    if waiting {
        pending = current.pending.clone();
        rebalance = None;
    }
    let starting = if waiting { starting } else { Vec::new() };
    let pending_unchanged = pending.is_some() && pending == current.pending;
    let in_c = |o: u32| committed.members.contains(&o);
    let in_p = |o: u32| pending.as_ref().is_some_and(|p| p.members.contains(&o));

    // 2. Each node's state.
    let ordinals: BTreeSet<u32> = committed
        .members
        .iter()
        .chain(pending.iter().flat_map(|p| p.members.iter()))
        .copied()
        .collect();
    let mut kills = Vec::new();
    let mut transitions = Vec::new();
    let mut nodes = Vec::new();
    for &o in &ordinals {
        let prev = current.state_of(o);
        let obs = observed.nodes.get(&o);
        let healthy = if !in_c(o) {
            NodeState::Joining
        } else if pending.is_some() && !in_p(o) {
            NodeState::Leaving
        } else {
            NodeState::Up
        };
        let (state, reason) = if desired.failed_nodes.contains(&o) {
            if prev != Some(NodeState::Failed) {
                kills.push(o);
            }
            (NodeState::Failed, "held down".to_string())
        } else {
            match prev {
                // A new node the platform already knows to be down for long
                // (a process stopped earlier) is Failed until it is back.
                None => match node_step(healthy, healthy, obs, observed.now_ms, config, epoch) {
                    (NodeState::Failed, why) => (NodeState::Failed, why),
                    _ => (healthy, "new owner, streaming its data in".to_string()),
                },
                Some(s) => node_step(s, healthy, obs, observed.now_ms, config, epoch),
            }
        };
        if prev != Some(state) {
            transitions.push(transition(o, prev, state, &reason));
        }
        nodes.push(node_info(config, o, state));
    }
    let removed: Vec<u32> = current
        .nodes
        .iter()
        .map(|n| n.ordinal)
        .filter(|o| !ordinals.contains(o))
        .collect();

    // 3. Commit a pending placement whose owners have all streamed their data in.
    let mut placement = committed.clone();
    let mut next_pending = pending.clone();
    let mut removed = removed;
    if let (true, Some(p)) = (pending_unchanged, &pending) {
        let state_of = |o: u32| nodes.iter().find(|n| n.ordinal == o).map(|n| n.state);
        let ready = p.members.iter().all(|&o| {
            state_of(o) == Some(NodeState::Failed)
                || (current.state_of(o) != Some(NodeState::Failed)
                    && synced(observed.nodes.get(&o), epoch))
        });
        // Every node that coordinates (Leaving ones too) must write to the
        // owners of both placements before the old owners are let go: a
        // node still on an older epoch writes to the old owners only.
        let everyone_knows = nodes
            .iter()
            .filter(|n| n.state != NodeState::Failed)
            .all(|n| !reports_below(observed.nodes.get(&n.ordinal), epoch));
        let holders: BTreeSet<u32> = p
            .members
            .iter()
            .copied()
            .filter(|&o| state_of(o).is_some_and(|s| s != NodeState::Failed))
            .collect();
        if ready
            && everyone_knows
            && short_bucket(p, &complement(&p.members, &holders), Consistency::One).is_none()
        {
            rebalance = Some(Rebalance::Committed);
            placement = p.clone();
            next_pending = None;
            nodes.retain(|n| {
                let keep = p.members.contains(&n.ordinal);
                if !keep {
                    removed.push(n.ordinal);
                }
                keep
            });
            for n in &mut nodes {
                if n.state != NodeState::Failed && n.state != NodeState::Up {
                    transitions.push(transition(
                        n.ordinal,
                        Some(n.state),
                        NodeState::Up,
                        "placement committed",
                    ));
                    n.state = NodeState::Up;
                }
            }
        }
    }
    removed.sort_unstable();

    let topology = Topology {
        cluster_id: current.cluster_id.clone(),
        epoch,
        read_consistency: desired.read_consistency,
        write_consistency: desired.write_consistency,
        placement,
        pending: next_pending,
        nodes,
    };
    Draft {
        changed: topology != *current,
        topology,
        kills,
        transitions,
        rebalance,
        removed,
        creating: false,
        held: desired.failed_nodes.clone(),
        starting,
    }
}

/// Members of `members` not in `holders`.
fn complement(members: &[u32], holders: &BTreeSet<u32>) -> BTreeSet<u32> {
    members
        .iter()
        .copied()
        .filter(|o| !holders.contains(o))
        .collect()
}

/// The next state of a node that is not held down, and why.
fn node_step(
    s: NodeState,
    healthy: NodeState,
    obs: Option<&NodeObservation>,
    now_ms: u64,
    config: &PlannerConfig,
    epoch: u64,
) -> (NodeState, String) {
    let alive = obs.is_some_and(NodeObservation::alive);
    let down_for = obs
        .and_then(|o| o.down_since_ms)
        .map(|t| now_ms.saturating_sub(t));
    let down_long = !alive && down_for.is_some_and(|d| d >= config.failure_detection_ms);
    match s {
        NodeState::Failed if alive => {
            let to = if healthy == NodeState::Joining {
                NodeState::Joining
            } else {
                NodeState::Recovering
            };
            (to, "back, catching up".to_string())
        }
        NodeState::Failed => (NodeState::Failed, String::new()),
        _ if down_long => {
            let why = format!("unreachable for {} ms", down_for.unwrap_or_default());
            (NodeState::Failed, why)
        }
        NodeState::Recovering | NodeState::Joining if healthy == NodeState::Joining => {
            (NodeState::Joining, "streaming its data in".to_string())
        }
        NodeState::Recovering | NodeState::Joining => {
            if synced(obs, epoch) {
                (healthy, format!("caught up (synced epoch {epoch})"))
            } else {
                (s, String::new())
            }
        }
        NodeState::Up | NodeState::Leaving => {
            let why = match healthy {
                NodeState::Leaving => "removed from the placement, streaming its data out",
                NodeState::Joining => "not an owner of the committed placement",
                _ => "kept by the placement",
            };
            (healthy, why.to_string())
        }
    }
}

fn node_count(t: &Topology) -> u32 {
    t.nodes
        .iter()
        .map(|n| n.ordinal.saturating_add(1))
        .max()
        .unwrap_or(0)
}

fn statuses(t: &Topology, observed: &Observed) -> Vec<NodeStatus> {
    t.nodes
        .iter()
        .map(|n| NodeStatus {
            ordinal: n.ordinal,
            state: n.state,
            resync_progress: match n.state {
                NodeState::Joining | NodeState::Recovering => observed
                    .nodes
                    .get(&n.ordinal)
                    .and_then(|o| o.report.as_ref())
                    .map(|r| {
                        if r.resync_progress.is_finite() {
                            r.resync_progress.clamp(0.0, 1.0)
                        } else {
                            0.0
                        }
                    }),
                _ => None,
            },
        })
        .collect()
}

/// Settle the epoch, validate, and derive actions and status.
fn finish(draft: Draft, observed: &Observed) -> Plan {
    let Draft {
        mut topology,
        changed,
        kills,
        transitions,
        rebalance,
        removed,
        creating,
        held,
        starting,
    } = draft;
    let current_epoch = observed.topology.as_ref().map_or(0, |t| t.epoch);
    let reported = observed
        .nodes
        .values()
        .filter_map(|o| o.report.as_ref().map(|r| r.epoch))
        .max()
        .unwrap_or(0);
    let base = current_epoch.max(observed.epoch_floor).max(reported);
    // A stored topology below an epoch already issued (or held by a node) is
    // issued again above it: nodes refuse anything older than what they hold.
    let changed = changed || base > current_epoch;
    if changed {
        topology.epoch = base.saturating_add(1);
        if let Err(e) = topology.validate() {
            return refused(
                format!("the planned topology is invalid ({e}); check the node addresses"),
                observed,
            );
        }
    }

    let mut actions: Vec<Action> = kills.into_iter().map(Action::Kill).collect();
    let behind = topology.nodes.iter().any(|n| {
        observed
            .nodes
            .get(&n.ordinal)
            .and_then(|o| o.report.as_ref())
            .is_some_and(|r| r.epoch < topology.epoch)
    });
    if changed || behind {
        actions.push(Action::PushTopology);
    }
    // A node out of the topology is stopped only once every node that stays
    // answers with this topology: until then some node may still route to it
    // (a node learns a topology by a push or, on Kubernetes, a ConfigMap sync
    // that can take a minute).
    let in_topology = |o: u32| topology.node(o).is_some();
    let retired: Vec<u32> = observed
        .nodes
        .iter()
        .filter(|(o, obs)| {
            !in_topology(**o) && !starting.contains(o) && (obs.running || obs.report.is_some())
        })
        .map(|(&o, _)| o)
        .collect();
    let everyone_knows = !changed
        && topology
            .nodes
            .iter()
            .filter(|n| n.state != NodeState::Failed)
            .all(|n| !reports_below(observed.nodes.get(&n.ordinal), topology.epoch));
    let mut count = node_count(&topology);
    if everyone_knows {
        actions.extend(retired.iter().map(|&o| Action::Stop(o)));
    } else if let Some(&last) = retired.last() {
        count = count.max(last.saturating_add(1));
    }
    for &o in &starting {
        let obs = observed.nodes.get(&o);
        if !obs.is_some_and(|o| o.running || o.report.is_some()) {
            actions.push(Action::Start(o));
        }
        count = count.max(o.saturating_add(1));
    }
    for n in &topology.nodes {
        let obs = observed.nodes.get(&n.ordinal);
        let runs = obs.is_some_and(|o| o.running || o.report.is_some());
        if !runs && !held.contains(&n.ordinal) {
            actions.push(Action::Start(n.ordinal));
        }
    }

    let phase = if creating {
        Phase::Creating
    } else if topology.pending.is_some() || !starting.is_empty() {
        Phase::Rebalancing
    } else if topology.nodes.iter().all(|n| n.state == NodeState::Up) {
        Phase::Running
    } else {
        Phase::Degraded
    };
    Plan {
        nodes: statuses(&topology, observed),
        node_count: count,
        topology: changed.then_some(topology),
        actions,
        transitions,
        refusal: None,
        phase,
        rebalance,
        removed,
        hibernation_deferred: None,
    }
}
