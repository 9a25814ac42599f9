//! The one control loop: observe → plan → act, the same on every platform.
//!
//! A [`Platform`] is what differs between Kubernetes (pods of a StatefulSet,
//! a ConfigMap, a status subresource) and `kvctl up` (processes on loopback,
//! a state file, a gateway): how the cluster is seen and how a plan is
//! carried out. [`step`] is what does not differ: the planner decides from
//! what was observed, and the platform carries out the decision in one
//! order, so that nodes always hear of a topology before any node is stopped
//! for it (see [`Action`]).

use std::future::Future;

use kv_core::Topology;

use crate::planner::{self, Action, Desired, Observed, Plan, PlannerConfig, Refusal};

/// What a platform saw of its cluster, and what the user asked of it.
#[derive(Clone, Debug)]
pub struct Observation {
    pub desired: Desired,
    pub observed: Observed,
    pub config: PlannerConfig,
}

/// How one round of the loop ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Nothing was planned; the platform said why (a cluster being deleted,
    /// a spec that cannot be read).
    Skipped,
    /// The planner refused the desired cluster and the platform had nothing
    /// else to plan: nothing was changed. The plan carries the refusal and
    /// the nodes' states as they are.
    Refused(Plan),
    /// The plan was carried out. `refused` is set when it is the plan of the
    /// platform's fallback (the last accepted spec) because the planner
    /// refused what the user asks now.
    Planned {
        plan: Plan,
        topology: Topology,
        refused: Option<Refusal>,
    },
}

impl Step {
    /// The plan of the round, carried out or refused.
    pub fn plan(&self) -> Option<&Plan> {
        match self {
            Step::Skipped => None,
            Step::Refused(plan) | Step::Planned { plan, .. } => Some(plan),
        }
    }
}

/// A place kvstore's nodes run. Methods are called by [`step`] in the order
/// they are listed; each may fail, which ends the round (the next round
/// observes again, so a half-carried-out plan is finished or replaced then).
pub trait Platform: Send {
    type Error: Send;

    /// Look at the cluster: the user's desired state, the nodes' processes
    /// and reports, the topology kept. `None`: nothing to plan this round.
    fn observe(&mut self) -> impl Future<Output = Result<Option<Observation>, Self::Error>> + Send;

    /// The planner refused `observation.desired`. A platform that keeps the
    /// last spec it accepted returns it, to carry on with what is running
    /// rather than stand still; `None` ends the round with [`Step::Refused`].
    fn refused(
        &mut self,
        refusal: &Refusal,
        observation: &Observation,
    ) -> impl Future<Output = Result<Option<Desired>, Self::Error>> + Send {
        let _ = (refusal, observation);
        async { Ok(None) }
    }

    /// Before anything changes: announce the plan, make what nodes need
    /// before they start (credentials, certificates).
    fn prepare(
        &mut self,
        plan: &Plan,
        observed: &Observed,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Keep `topology` where starting nodes read it and where the next
    /// round's [`Platform::observe`] finds it. `changed`: the planner
    /// issued it (a new epoch) in this round.
    fn commit(
        &mut self,
        topology: &Topology,
        changed: bool,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Kill node `ordinal` now: it was just held down.
    fn kill(&mut self, ordinal: u32) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Tell every running node `topology` at once.
    fn push(&mut self, topology: &Topology)
    -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Stop node `ordinal` for good: it left the topology.
    fn stop(&mut self, ordinal: u32) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Start node `ordinal`: it belongs to the topology and is not running.
    fn start(&mut self, ordinal: u32) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// After the actions: what the platform converges declaratively (a
    /// StatefulSet's replicas, [`Plan::node_count`]), and the record of the
    /// round (status, events, metrics).
    fn finish(
        &mut self,
        step: &Step,
        observed: &Observed,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// One round of the loop on `platform`.
pub async fn step<P: Platform>(platform: &mut P) -> Result<Step, P::Error> {
    let Some(observation) = platform.observe().await? else {
        return Ok(Step::Skipped);
    };
    let observed = &observation.observed;
    let first = planner::plan(&observation.desired, observed, &observation.config);
    let (mut plan, refused) = match first.refusal.clone() {
        None => (first, None),
        Some(refusal) => match platform.refused(&refusal, &observation).await? {
            Some(fallback) => {
                let carried = planner::plan(&fallback, observed, &observation.config);
                if carried.refusal.is_some() {
                    return finish_refused(platform, carried, observed).await;
                }
                (carried, Some(refusal))
            }
            None => return finish_refused(platform, first, observed).await,
        },
    };
    let Some(topology) = plan.topology_after(observed).cloned() else {
        // Only a refusal plans no topology; said here rather than trusted.
        plan.refusal = Some(Refusal {
            reason: "the planner returned no topology".to_string(),
        });
        return finish_refused(platform, plan, observed).await;
    };
    platform.prepare(&plan, observed).await?;
    platform.commit(&topology, plan.topology.is_some()).await?;
    for action in &plan.actions {
        match *action {
            Action::Kill(o) => platform.kill(o).await?,
            Action::PushTopology => platform.push(&topology).await?,
            Action::Stop(o) => platform.stop(o).await?,
            Action::Start(o) => platform.start(o).await?,
        }
    }
    let step = Step::Planned {
        plan,
        topology,
        refused,
    };
    platform.finish(&step, observed).await?;
    Ok(step)
}

async fn finish_refused<P: Platform>(
    platform: &mut P,
    plan: Plan,
    observed: &Observed,
) -> Result<Step, P::Error> {
    let step = Step::Refused(plan);
    platform.finish(&step, observed).await?;
    Ok(step)
}
