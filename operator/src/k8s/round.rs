//! One reconcile of a KvCluster as kv-control's loop sees it: Kubernetes as a
//! [`Platform`](kv_control::Platform).
//!
//! - observe: the topology ConfigMap, the StatefulSet, the node pods, the
//!   token Secrets, with `spec.tls` the CA and certificate Secrets, and each
//!   live node's report ([`observe`](super::observe));
//! - refused: carry on with the last accepted spec (`status.acceptedSpec`);
//! - prepare: the generated Secrets and certificates, the bootstrap source;
//! - commit: the topology ConfigMap (conditional on the version read);
//! - push: the topology to every running node;
//! - kill: held-down pods, deleted once the StatefulSet is applied;
//!   start/stop are the StatefulSet's replicas ([`Plan::node_count`]);
//! - finish: Services, StatefulSet, PodDisruptionBudget, NetworkPolicy,
//!   PodMonitor, pod deletions, Events and the status ([`apply`](super::apply)).

use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use kv_control::planner::{Desired, Observed, Plan, Refusal};
use kv_control::{Observation, Step};
use kv_core::Topology;
use tracing::warn;

use super::apply;
use super::controller::{Context, Decision, Error};
use super::crd::{AcceptedSpec, FORCE_FAULT_INJECTION, KvCluster, KvClusterStatus, Phase};
use super::events::publish;
use super::status::spec_refused;

/// What one reconcile learnt and decided, from observe to finish.
pub(super) struct Round<'a> {
    pub ctx: &'a Context,
    /// The KvCluster as read.
    pub kvc: &'a KvCluster,
    pub ns: String,
    /// `namespace/name`, the metrics' key.
    pub key: String,
    pub now: Timestamp,
    pub previous: KvClusterStatus,
    pub kvcs: Api<KvCluster>,
    pub cms: Api<ConfigMap>,
    pub stss: Api<StatefulSet>,
    pub pods: Api<Pod>,
    pub secrets: Api<Secret>,
    pub seen: Option<super::observe::Seen>,
    /// The planner refused the current spec: why (with the annotation's
    /// value when it was meant to force), and the spec carried on instead.
    pub refused: Option<String>,
    pub accepted: Option<AcceptedSpec>,
    /// The KvCluster the objects are built for: the read one with the
    /// accepted spec applied.
    pub target: Option<KvCluster>,
    pub decision: Option<Decision>,
    pub problems: Vec<(&'static str, String)>,
    pub bootstrap_problem: Option<String>,
    /// Held-down nodes whose pods go once the StatefulSet is applied.
    pub kills: Vec<u32>,
    /// When to reconcile again.
    pub requeue: Action,
}

impl<'a> Round<'a> {
    pub fn new(kvc: &'a KvCluster, ctx: &'a Context, ns: String) -> Round<'a> {
        let client = || ctx.client.clone();
        Round {
            ctx,
            kvc,
            key: format!("{ns}/{}", kvc.name_any()),
            now: Timestamp::now(),
            previous: kvc.status.clone().unwrap_or_default(),
            kvcs: Api::namespaced(client(), &ns),
            cms: Api::namespaced(client(), &ns),
            stss: Api::namespaced(client(), &ns),
            pods: Api::namespaced(client(), &ns),
            secrets: Api::namespaced(client(), &ns),
            ns,
            seen: None,
            refused: None,
            accepted: None,
            target: None,
            decision: None,
            problems: Vec::new(),
            bootstrap_problem: None,
            kills: Vec::new(),
            requeue: Action::await_change(),
        }
    }

    /// The KvCluster the objects are built for.
    pub fn target(&self) -> &KvCluster {
        self.target.as_ref().unwrap_or(self.kvc)
    }

    /// Nothing is applied: the status says why (see [`apply::refuse`]).
    async fn refuse_all(&mut self, reason: &str) -> Result<(), Error> {
        let c = spec_refused(reason, None, self.kvc.meta().generation);
        apply::refuse(
            self.ctx,
            self.kvc,
            &self.kvcs,
            &self.previous,
            super::status::SPEC_REFUSED,
            reason,
            vec![c],
            self.now,
        )
        .await?;
        self.ctx
            .metrics
            .observe_cluster(&self.key, Phase::Failed, vec![], 0);
        // The refusal may depend on nodes that are down: look again later.
        self.requeue = Action::requeue(Duration::from_secs(60));
        Ok(())
    }
}

impl kv_control::Platform for Round<'_> {
    type Error = Error;

    async fn observe(&mut self) -> Result<Option<Observation>, Error> {
        super::observe::observe(self).await
    }

    async fn refused(
        &mut self,
        refusal: &Refusal,
        _: &Observation,
    ) -> Result<Option<Desired>, Error> {
        let kvc = self.kvc;
        let reason = match kvc.force_fault_injection() {
            // The user probably meant to force it: say why it was not.
            Err(value) => format!(
                "{}; the annotation {FORCE_FAULT_INJECTION} is {value:?}, not \"true\" or \"false\", so it was planned without force",
                refusal.reason
            ),
            Ok(_) => refusal.reason.clone(),
        };
        warn!(kvcluster = %kvc.name_any(), %reason, "spec refused");
        self.refused = Some(reason);
        // Carried on only if the planner accepts it (kv_control::step plans
        // it again); else nothing changes.
        Ok(carry_on(kvc, &self.previous).map(|(desired, accepted)| {
            self.accepted = Some(accepted);
            desired
        }))
    }

    async fn prepare(&mut self, plan: &Plan, observed: &Observed) -> Result<(), Error> {
        let kvc = self.kvc;
        let target = self
            .accepted
            .get_or_insert_with(|| AcceptedSpec::of(kvc))
            .applied_to(kvc);
        let Some(topology) = plan.topology_after(observed) else {
            return Ok(());
        };
        let decision = Decision::of(&target, plan, topology.clone());
        self.target = Some(target);
        if decision.phase == Phase::Hibernated
            && let Some(seen) = &mut self.seen
        {
            // Stopped on request: no node is unreachable.
            seen.unreachable.clear();
        }
        self.decision = Some(decision);
        if let Some(reason) = &self.refused {
            let kvc = self.target();
            let generation = self.accepted.as_ref().and_then(|a| a.generation);
            let c = spec_refused(reason, Some(generation), kvc.meta().generation);
            // One Event per refused generation; the condition follows the
            // planner's message, which can change with the nodes' states.
            let shown = self.previous.conditions.iter().any(|p| {
                p.type_ == super::status::SPEC_REFUSED
                    && p.status == "True"
                    && p.observed_generation == c.observed_generation
            });
            if !shown {
                publish(
                    self.ctx,
                    kvc,
                    EventType::Warning,
                    super::status::SPEC_REFUSED,
                    "Validate",
                    &c.message,
                )
                .await;
            }
        }
        apply::credentials(self).await
    }

    async fn commit(&mut self, topology: &Topology, _changed: bool) -> Result<(), Error> {
        // Written every round: server-side apply keeps it as the planner
        // says, conditional on the version it was planned from.
        apply::topology(self, topology).await
    }

    async fn kill(&mut self, ordinal: u32) -> Result<(), Error> {
        self.kills.push(ordinal);
        Ok(())
    }

    async fn push(&mut self, topology: &Topology) -> Result<(), Error> {
        apply::push(self, topology).await;
        Ok(())
    }

    async fn stop(&mut self, _ordinal: u32) -> Result<(), Error> {
        // The StatefulSet's replicas (Plan::node_count), applied in finish.
        Ok(())
    }

    async fn start(&mut self, _ordinal: u32) -> Result<(), Error> {
        // The StatefulSet starts the pods it has replicas for.
        Ok(())
    }

    async fn finish(&mut self, step: &Step, observed: &Observed) -> Result<(), Error> {
        match step {
            Step::Skipped => Ok(()),
            Step::Refused(_) => {
                let reason = self
                    .refused
                    .clone()
                    .unwrap_or_else(|| "the planner refused the spec".to_string());
                self.refuse_all(&reason).await
            }
            Step::Planned { .. } => apply::converge(self, observed).await,
        }
    }
}

/// The desired cluster of the last accepted spec (`status.acceptedSpec`),
/// when the current one is refused: `None` when there is none or it is the
/// current one.
fn carry_on(kvc: &KvCluster, previous: &KvClusterStatus) -> Option<(Desired, AcceptedSpec)> {
    let accepted = previous.accepted_spec.clone()?;
    let now = AcceptedSpec::of(kvc);
    let without_generation = |a: AcceptedSpec| AcceptedSpec {
        generation: None,
        ..a
    };
    if without_generation(accepted.clone()) == without_generation(now) {
        return None;
    }
    // Hibernation is never refused: it comes from the current spec.
    let desired = Desired {
        hibernate: kvc.spec.hibernation,
        ..accepted.desired()
    };
    Some((desired, accepted))
}
