//! The KvCluster controller: what every reconcile shares ([`Context`]), its
//! errors and their retry policy, and [`reconcile`], one round of
//! kv-control's observe → plan → act loop ([`kv_control::step`]) with the
//! cluster as the platform ([`round`](super::round)): what it reads is in
//! [`observe`](super::observe), what it writes in [`apply`](super::apply),
//! the status it computes in [`status`](super::status), the Events in
//! [`events`](super::events), its calls to the nodes in [`nodes`](super::nodes).
//!
//! A spec the schema could not refuse becomes a condition: nothing is applied
//! and the controller waits for the next edit instead of retrying in a loop.
//!
//! A spec the planner refuses (a hold-down that would leave keys short of W
//! live owners, say) does not stop the cluster: the controller keeps
//! reconciling the last spec the planner accepted (`status.acceptedSpec`),
//! with failure detection, recoveries and rollouts, shows the refusal as the
//! condition `SpecRefused` and a Warning Event, and carries the new spec out
//! at the first reconcile where the planner accepts it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::Recorder;
use kv_control::metrics::Metrics;
use kv_control::planner::{self, Desired, Observed, Plan, PlannerConfig, Rebalance};
use kv_core::Topology;
use serde::Serialize;
use tracing::{info, warn};

use super::crd::{FORCE_FAULT_INJECTION, KvCluster, NodeStatus, Phase};
use super::objects;
use super::round::Round;

pub use super::nodes::{NODE_CALL_TIMEOUT, NodeReports, ReportUrl, adopt};
pub use super::status::{FORCE_CONDITION, SPEC_REFUSED, force_condition, status_patch};

/// Why a reconcile failed. Variant names are the `result` label of
/// `kv_operator_reconciles_total` (see [`Error::metric_label`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("serializing {0}: {1}")]
    Serialization(&'static str, serde_json::Error),
    #[error("KvCluster has no namespace")]
    MissingNamespace,
    #[error("TLS certificates: {0}")]
    Tls(kv_net::pki::PkiError),
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            e if e.is_conflict() => "conflict",
            Error::Kube(_) => "kube",
            Error::Serialization(..) => "serialization",
            Error::MissingNamespace => "missing_namespace",
            Error::Tls(_) => "tls",
        }
    }

    /// The API server refused a write made over a stale version (409): the
    /// object changed since it was read, and its watch event is on its way.
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::Kube(kube::Error::Api(s)) if s.code == 409)
    }
}

/// How long a rollout may stay incomplete before Progressing turns False
/// with reason `RolloutStuck`.
pub const ROLLOUT_DEADLINE_SECONDS: i64 = 600;

/// What every reconcile shares.
pub struct Context {
    pub client: kube::Client,
    pub recorder: Recorder,
    pub metrics: Metrics,
    /// Ask live nodes for their report on `/v1/cluster`; `None` turns it off.
    pub node_reports: Option<NodeReports>,
    /// The operator's own namespace, whose kv-operator pods each cluster's
    /// NetworkPolicy lets in; any namespace when `None`.
    pub operator_namespace: Option<String>,
    /// Consecutive failed reconciles per cluster (`namespace/name`), for backoff.
    failures: std::sync::Mutex<BTreeMap<String, u32>>,
    /// Whether the API server serves PodMonitors, and when that was last
    /// asked; `None`: never asked, no PodMonitor is made (see
    /// [`Context::with_pod_monitors`]).
    pub(super) pod_monitors: Option<std::sync::Mutex<Option<(Instant, bool)>>>,
}

/// How long the answer to "are PodMonitors served?" is kept: installing the
/// Prometheus Operator later is noticed within this.
pub const MONITORING_DISCOVERY_TTL: Duration = Duration::from_secs(300);

impl Context {
    pub fn new(
        client: kube::Client,
        metrics: Metrics,
        node_reports: Option<NodeReports>,
    ) -> Context {
        let reporter = kube::runtime::events::Reporter {
            controller: objects::MANAGER.to_string(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            node_reports,
            operator_namespace: None,
            failures: Default::default(),
            pod_monitors: None,
        }
    }

    /// Make a PodMonitor per cluster whenever the API server serves the
    /// Prometheus Operator's `monitoring.coreos.com/v1` PodMonitors.
    pub fn with_pod_monitors(mut self) -> Context {
        self.pod_monitors = Some(Default::default());
        self
    }

    /// The operator runs in `namespace` (see [`Context::operator_namespace`]).
    pub fn with_operator_namespace(mut self, namespace: Option<String>) -> Context {
        self.operator_namespace = namespace;
        self
    }
}

pub(super) fn apply_params() -> PatchParams {
    PatchParams::apply(objects::MANAGER).force()
}

pub(super) fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

pub(super) async fn get_opt<K>(api: &Api<K>, name: &str) -> Result<Option<K>, Error>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.get(name).await {
        Ok(o) => Ok(Some(o)),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

pub(super) async fn apply<K>(api: &Api<K>, name: &str, obj: &K) -> Result<(), Error>
where
    K: Clone + Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.patch(name, &apply_params(), &Patch::Apply(obj)).await?;
    Ok(())
}

/// Apply `obj`, or, when the spec asks for none, delete the one made before
/// (already gone is fine).
pub(super) async fn apply_or_delete<K>(
    api: &Api<K>,
    name: &str,
    obj: Option<&K>,
) -> Result<(), Error>
where
    K: Clone + Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match obj {
        Some(obj) => apply(api, name, obj).await,
        None => match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(e.into()),
        },
    }
}

/// What the planner decided, in the controller's terms.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// The topology to write: the planned one, or the observed one unchanged.
    pub topology: Topology,
    /// The planner raised the epoch.
    pub topology_changed: bool,
    /// Pods the StatefulSet must have.
    pub pods: u32,
    /// Pods to delete now: nodes that were just held down.
    pub delete_pods: Vec<u32>,
    /// Push the topology to every running node: it changed, or some node
    /// reports an older one.
    pub push_topology: bool,
    pub transitions: Vec<planner::Transition>,
    pub rebalance: Option<Rebalance>,
    /// Every node's status (pod names filled in).
    pub nodes: Vec<NodeStatus>,
    pub phase: Phase,
    /// Hibernation is asked for but waits (a placement change is pending): why.
    pub hibernation_deferred: Option<String>,
}

/// The planner's settings for a cluster ([`KvCluster::planner_config`]).
pub fn planner_config(kvc: &KvCluster) -> PlannerConfig {
    kvc.planner_config()
}

/// Plan the next step of `kvc` from what was observed; `Err` carries the
/// planner's refusal, a reason a person can act on (nothing is to change).
/// The spec is planned with force when the [`FORCE_FAULT_INJECTION`]
/// annotation is `"true"` (see [`KvCluster::desired`]).
pub fn decide(kvc: &KvCluster, observed: &Observed) -> Result<Decision, String> {
    decide_for(kvc, &kvc.desired(), observed).map_err(|reason| {
        match kvc.force_fault_injection() {
            // The user probably meant to force it: say why it was not.
            Err(value) => format!(
                "{reason}; the annotation {FORCE_FAULT_INJECTION} is {value:?}, not \"true\" or \"false\", so it was planned without force"
            ),
            Ok(_) => reason,
        }
    })
}

/// Plan `desired` for the cluster `kvc` (its names and failure detection).
fn decide_for(kvc: &KvCluster, desired: &Desired, observed: &Observed) -> Result<Decision, String> {
    let plan = planner::plan(desired, observed, &planner_config(kvc));
    if let Some(r) = plan.refusal {
        return Err(r.reason);
    }
    let topology = plan
        .topology_after(observed)
        .cloned()
        .ok_or_else(|| "the planner returned no topology".to_string())?;
    Ok(Decision::of(kvc, &plan, topology))
}

impl Decision {
    /// `plan` for the cluster `kvc`, whose topology after it is `topology`.
    pub fn of(kvc: &KvCluster, plan: &Plan, topology: Topology) -> Decision {
        Decision {
            topology_changed: plan.topology.is_some(),
            topology,
            pods: plan.node_count,
            delete_pods: plan.kills().collect(),
            push_topology: plan.actions.contains(&planner::Action::PushTopology),
            nodes: plan
                .nodes
                .iter()
                .map(|n| NodeStatus {
                    ordinal: n.ordinal,
                    pod: objects::pod_name(kvc, n.ordinal),
                    state: n.state,
                    resync_progress: n.resync_progress,
                    unreachable_since: None,
                    tokens: None,
                })
                .collect(),
            transitions: plan.transitions.clone(),
            rebalance: plan.rebalance,
            phase: plan.phase,
            hibernation_deferred: plan.hibernation_deferred.clone(),
        }
    }
}

/// Reconcile one KvCluster. Called by the kube-runtime `Controller`.
#[tracing::instrument(skip_all, fields(kvcluster = %kvc.name_any(), namespace = kvc.namespace().unwrap_or_default()))]
pub async fn reconcile(kvc: Arc<KvCluster>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_once(&kvc, &ctx).await;
    let label = match &result {
        Ok(_) => {
            if let Ok(mut f) = ctx.failures.lock() {
                f.remove(&cluster_key(&kvc));
            }
            "ok"
        }
        Err(e) => e.metric_label(),
    };
    ctx.metrics.record(started, label);
    result
}

/// One round of kv-control's loop with this cluster as the platform.
async fn reconcile_once(kvc: &KvCluster, ctx: &Context) -> Result<Action, Error> {
    let ns = kvc.namespace().ok_or(Error::MissingNamespace)?;
    let mut round = Round::new(kvc, ctx, ns);
    kv_control::step(&mut round).await?;
    Ok(round.requeue)
}

fn cluster_key(kvc: &KvCluster) -> String {
    format!("{}/{}", kvc.namespace().unwrap_or_default(), kvc.name_any())
}

/// Retry delay after a write lost to a concurrent one (409).
pub const CONFLICT_RETRY: Duration = Duration::from_secs(1);

/// Retry delay after `failures` consecutive failed reconciles: 5 s doubling
/// up to 5 minutes, so that a failing API server is not hammered. A watch
/// event still triggers a reconcile at once.
pub fn backoff(failures: u32) -> Duration {
    let secs = 5u64.saturating_mul(1u64 << failures.saturating_sub(1).min(6));
    Duration::from_secs(secs.min(300))
}

pub fn error_policy(kvc: Arc<KvCluster>, error: &Error, ctx: Arc<Context>) -> Action {
    if error.is_conflict() {
        // Lost a race with another writer: plan again from what it wrote,
        // soon, and without the backoff meant for a failing API server.
        info!(kvcluster = %kvc.name_any(), error = %error, "conflict; reconciling again from the current objects");
        return Action::requeue(CONFLICT_RETRY);
    }
    let failures = match ctx.failures.lock() {
        Ok(mut f) => {
            let n = f.entry(cluster_key(&kvc)).or_insert(0);
            *n = n.saturating_add(1);
            *n
        }
        Err(_) => 1,
    };
    let delay = backoff(failures);
    warn!(kvcluster = %kvc.name_any(), error = %error, failures, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

#[cfg(test)]
mod tests {
    use super::*;

    use k8s_openapi::api::apps::v1::StatefulSet;
    use k8s_openapi::api::core::v1::Secret;
    use k8s_openapi::jiff::Timestamp;
    use kv_control::planner::{NodeObservation, NodeProgress};
    use kv_core::NodeState;

    use super::super::crd::KvClusterStatus;
    use super::super::hibernation::{self, Hibernation};
    use super::super::observe::{ordinal_of, secret_fingerprints, track_unreachable};
    use super::super::record::tokens_settled;
    use super::super::status::{cond, conditions_of, merge_conditions, status_of};

    #[test]
    fn tokens_are_settled_only_when_every_node_holds_exactly_the_secrets_tokens() {
        let secret = |text: &str| Secret {
            data: Some(
                [(
                    "token".to_string(),
                    k8s_openapi::ByteString(text.as_bytes().to_vec()),
                )]
                .into(),
            ),
            ..Secret::default()
        };
        let fp = |t: &str| kv_net::token::fingerprint(t);
        let a = secret_fingerprints(Some(&secret("aaaa")), "token");
        assert_eq!(a, Some(vec![fp("aaaa")]));
        let ab = secret_fingerprints(Some(&secret("aaaa\nbbbb\n")), "token");
        assert_eq!(ab, Some(vec![fp("aaaa"), fp("bbbb")]));
        assert_eq!(secret_fingerprints(Some(&secret("")), "token"), None);
        assert_eq!(secret_fingerprints(None, "token"), None);

        let node = |client: &[&str]| kv_core::report::TokenFingerprints {
            client: client.iter().map(|t| fp(t)).collect(),
            cluster: vec![fp("cccc")],
        };
        let cluster = Some(vec![fp("cccc")]);
        let held: BTreeMap<u32, _> = [(0, node(&["aaaa"])), (1, node(&["aaaa"]))].into();
        assert!(tokens_settled(&held, a.clone(), cluster.clone()));
        // The Secret holds two tokens: a rotation is under way.
        assert!(!tokens_settled(&held, ab.clone(), cluster.clone()));
        // One node has not read the Secret's new content yet.
        let b = Some(vec![fp("bbbb")]);
        let behind: BTreeMap<u32, _> = [(0, node(&["bbbb"])), (1, node(&["aaaa"]))].into();
        assert!(!tokens_settled(&behind, b.clone(), cluster.clone()));
        // A node that shows no tokens is not waited on.
        let silent: BTreeMap<u32, _> = [
            (0, node(&["bbbb"])),
            (1, kv_core::report::TokenFingerprints::default()),
        ]
        .into();
        assert!(tokens_settled(&silent, b, cluster));
    }

    fn rolling_out(generation: i64, sts_updated: i32) -> (KvCluster, Decision, StatefulSet) {
        let mut kvc = KvCluster::new("demo", serde_yaml::from_str("{}").expect("spec"));
        kvc.metadata.namespace = Some("ns".into());
        kvc.metadata.generation = Some(generation);
        let empty = Observed {
            cluster_id: "ns/demo".into(),
            ..Observed::default()
        };
        let first = decide(&kvc, &empty).expect("a first topology");
        let all_alive = (0..3)
            .map(|o| {
                (
                    o,
                    NodeObservation {
                        running: true,
                        down_since_ms: None,
                        report: None,
                    },
                )
            })
            .collect();
        let observed = Observed {
            topology: Some(first.topology),
            nodes: all_alive,
            ..empty
        };
        let d = decide(&kvc, &observed).expect("planned");
        let sts: StatefulSet = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "demo"},
            "status": {"replicas": 3, "updatedReplicas": sts_updated}
        }))
        .expect("sts");
        (kvc, d, sts)
    }

    #[test]
    fn a_rollout_incomplete_past_the_deadline_is_rollout_stuck_until_the_spec_is_edited() {
        let ready = (0..3).map(|o| (o, true)).collect();
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().expect("time");
        let late =
            Timestamp::from_second(t0.as_second() + ROLLOUT_DEADLINE_SECONDS + 1).expect("time");
        let progressing = |s: &KvClusterStatus| {
            s.conditions
                .iter()
                .find(|c| c.type_ == "Progressing")
                .cloned()
                .expect("Progressing")
        };

        let (kvc, d, sts) = rolling_out(2, 1);
        let start = status_of(
            &kvc,
            &d,
            &ready,
            Some(&sts),
            &KvClusterStatus::default(),
            vec![],
            None,
            t0,
        );
        assert_eq!(progressing(&start).reason, "RollingOut");
        let soon = status_of(&kvc, &d, &ready, Some(&sts), &start, vec![], None, t0);
        assert_eq!(progressing(&soon).reason, "RollingOut");
        let stuck = status_of(&kvc, &d, &ready, Some(&sts), &start, vec![], None, late);
        assert_eq!(progressing(&stuck).status, "False");
        assert_eq!(progressing(&stuck).reason, "RolloutStuck");

        // Editing the spec (a new generation) starts a new rollout clock.
        let (kvc3, d3, sts3) = rolling_out(3, 1);
        let edited = status_of(&kvc3, &d3, &ready, Some(&sts3), &stuck, vec![], None, late);
        assert_eq!(progressing(&edited).reason, "RollingOut");
        assert_eq!(progressing(&edited).observed_generation, Some(3));

        // A finished rollout is simply reconciled.
        let (kvc, d, done) = rolling_out(3, 3);
        let fine = status_of(&kvc, &d, &ready, Some(&done), &edited, vec![], None, late);
        assert_eq!(progressing(&fine).reason, "Reconciled");
        assert_eq!(fine.phase, Some(Phase::Running));
    }

    /// Three nodes at Quorum, all Up at epoch 4, with 0 and 2 to be held
    /// down (one live owner of three left, writes need two), annotated
    /// with `annotation` when given.
    fn two_of_three_held_down(annotation: Option<&str>) -> (KvCluster, Observed) {
        let mut kvc = KvCluster::new(
            "demo",
            serde_yaml::from_str("{faultInjection: {failedNodes: [0, 2]}}").expect("spec"),
        );
        kvc.metadata.namespace = Some("ns".into());
        kvc.metadata.generation = Some(2);
        if let Some(v) = annotation {
            kvc.metadata.annotations =
                Some([(FORCE_FAULT_INJECTION.to_string(), v.to_string())].into());
        }
        let topology = Topology {
            cluster_id: "ns/demo".into(),
            epoch: 4,
            read_consistency: kv_core::Consistency::Quorum,
            write_consistency: kv_core::Consistency::Quorum,
            placement: kvc.spec.desired().placement(),
            pending: None,
            nodes: (0..3)
                .map(|o| objects::node_info(&kvc, o, NodeState::Up))
                .collect(),
        };
        let running = NodeObservation {
            running: true,
            down_since_ms: None,
            report: None,
        };
        let observed = Observed {
            cluster_id: "ns/demo".into(),
            topology: Some(topology),
            epoch_floor: 4,
            nodes: (0..3).map(|o| (o, running.clone())).collect(),
            ..Observed::default()
        };
        (kvc, observed)
    }

    #[test]
    fn a_hold_down_that_leaves_keys_short_of_w_is_refused_without_the_force_annotation() {
        for annotation in [None, Some("false")] {
            let (kvc, observed) = two_of_three_held_down(annotation);
            let reason = decide(&kvc, &observed).expect_err("refused");
            assert!(
                reason.starts_with("holding down node(s) [0, 2] would leave some keys with 1 of 3 owners live, but writes at Quorum need 2"),
                "{annotation:?}: {reason}"
            );
            assert_eq!(force_condition(&kvc, Some(2)), None, "{annotation:?}");
        }
    }

    #[test]
    fn the_same_hold_down_is_carried_out_with_the_force_annotation_true() {
        let (kvc, observed) = two_of_three_held_down(Some("true"));
        let d = decide(&kvc, &observed).expect("forced");
        assert!(d.topology_changed);
        assert_eq!(d.topology.epoch, 5);
        assert_eq!(d.delete_pods, [0, 2]);
        assert_eq!(d.topology.state_of(0), Some(NodeState::Failed));
        assert_eq!(d.topology.state_of(1), Some(NodeState::Up));
        assert_eq!(d.topology.state_of(2), Some(NodeState::Failed));
        let c = force_condition(&kvc, Some(2)).expect("condition");
        assert_eq!(
            (c.type_.as_str(), c.status.as_str(), c.reason.as_str()),
            (FORCE_CONDITION, "True", "Annotated")
        );
    }

    #[test]
    fn an_invalid_force_annotation_is_planned_without_force_and_named_in_the_refusal() {
        let (kvc, observed) = two_of_three_held_down(Some("yes"));
        let reason = decide(&kvc, &observed).expect_err("not forced");
        assert!(
            reason.starts_with("holding down node(s) [0, 2]")
                && reason.ends_with(
                    "the annotation kvstore.dev/force-fault-injection is \"yes\", not \"true\" or \"false\", so it was planned without force"
                ),
            "{reason}"
        );
        let c = force_condition(&kvc, Some(2)).expect("condition");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "InvalidAnnotation")
        );
        assert!(c.message.contains("\"yes\""), "{}", c.message);
    }

    #[test]
    fn the_force_condition_leaves_the_status_when_the_annotation_is_removed() {
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().expect("time");
        let (forced, _) = two_of_three_held_down(Some("true"));
        let with = conditions_of(&forced, &[], vec![], Some(2), t0);
        assert_eq!(with.len(), 1);
        assert_eq!(with[0].type_, FORCE_CONDITION);
        let (plain, _) = two_of_three_held_down(None);
        let without = conditions_of(
            &plain,
            &with,
            vec![cond("Degraded", false, "AllNodesUp", "", Some(2))],
            Some(2),
            t0,
        );
        let types: Vec<&str> = without.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, ["Degraded"]);
    }

    /// The status the controller writes in a reconcile just after
    /// `spec.hibernation` went false: three nodes Up at epoch 4, the last
    /// status Hibernated, the pods of `back` Ready and reporting, the
    /// others not made yet. The same steps as `reconcile_inner`.
    fn woken_status(back: &[u32]) -> KvClusterStatus {
        let now: Timestamp = "2026-01-01T01:00:00Z".parse().expect("time");
        let (mut kvc, asleep) = two_of_three_held_down(None);
        kvc.spec.fault_injection = Default::default();
        let previous = KvClusterStatus {
            phase: Some(Phase::Hibernated),
            topology_epoch: 4,
            nodes: decide(&kvc, &asleep).expect("planned").nodes,
            conditions: vec![Hibernation::Hibernated.condition(4, Some(2))],
            ..KvClusterStatus::default()
        };
        let report = NodeProgress {
            epoch: 4,
            synced_epoch: 4,
            resync_progress: 1.0,
        };
        let mut observed = Observed {
            nodes: BTreeMap::new(),
            now_ms: u64::try_from(now.as_millisecond()).expect("time"),
            ..asleep
        };
        let mut ready = BTreeMap::new();
        for &o in back {
            ready.insert(o, true);
            observed.nodes.insert(
                o,
                NodeObservation {
                    running: true,
                    down_since_ms: None,
                    report: Some(report.clone()),
                },
            );
        }
        // No pod: down since the StatefulSet was made, as reconcile sees it.
        for o in 0..3 {
            observed.nodes.entry(o).or_insert(NodeObservation {
                running: false,
                down_since_ms: Some(0),
                report: None,
            });
        }
        let mut unreachable = track_unreachable(&mut observed, &previous);
        let waking = hibernation::waking(&kvc, &previous, now);
        let not_back = hibernation::not_back(&observed, &ready, true);
        if waking {
            hibernation::spare_waking_nodes(&mut observed, &mut unreachable);
        }
        let d = decide(&kvc, &observed).expect("planned");
        assert_eq!(d.topology.epoch, 4, "waking issues no epoch");
        let h = hibernation::state(false, None, waking, &not_back, &previous);
        status_of(&kvc, &d, &ready, None, &previous, vec![], h.as_ref(), now)
    }

    fn states(s: &KvClusterStatus) -> Vec<NodeState> {
        s.nodes.iter().map(|n| n.state).collect()
    }

    fn reason<'a>(s: &'a KvClusterStatus, type_: &str) -> &'a str {
        s.conditions
            .iter()
            .find(|c| c.type_ == type_)
            .map_or("", |c| c.reason.as_str())
    }

    #[test]
    fn waking_up_is_not_running_until_every_pod_is_back_ready_and_reporting() {
        let none = woken_status(&[]);
        assert_eq!(none.phase, Some(Phase::WakingUp));
        assert_eq!(states(&none), [NodeState::Recovering; 3]);
        assert_eq!(reason(&none, "Progressing"), "WakingUp");
        assert_eq!(reason(&none, "Degraded"), "NodesNotUp");
        assert_eq!(reason(&none, "Available"), "QuorumLost");

        let two = woken_status(&[0, 2]);
        assert_eq!(two.phase, Some(Phase::WakingUp));
        assert_eq!(
            states(&two),
            [NodeState::Up, NodeState::Recovering, NodeState::Up]
        );
        assert_eq!(reason(&two, "Available"), "QuorumAvailable");

        let all = woken_status(&[0, 1, 2]);
        assert_eq!(all.phase, Some(Phase::Running));
        assert_eq!(states(&all), [NodeState::Up; 3]);
        assert_eq!(reason(&all, "Progressing"), "Reconciled");
    }

    #[test]
    fn retries_back_off_from_5_seconds_doubling_to_5_minutes() {
        let delays: Vec<u64> = (1..=9).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(delays, [5, 10, 20, 40, 80, 160, 300, 300, 300]);
    }

    #[test]
    fn pod_names_give_ordinals_only_for_their_own_cluster() {
        assert_eq!(ordinal_of("demo", "demo-2"), Some(2));
        assert_eq!(ordinal_of("demo", "demo-x"), None);
        assert_eq!(ordinal_of("demo", "demo2-1"), None);
        assert_eq!(ordinal_of("demo", "other-1"), None);
    }

    #[test]
    fn a_condition_keeps_its_transition_time_while_its_status_holds() {
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().expect("time");
        let t1: Timestamp = "2026-01-01T00:05:00Z".parse().expect("time");
        let first = merge_conditions(
            &[],
            vec![cond("Degraded", true, "A", "", Some(1))],
            Some(1),
            t0,
        );
        let same = merge_conditions(
            &first,
            vec![cond("Degraded", true, "B", "", Some(2))],
            Some(2),
            t1,
        );
        assert_eq!(same[0].last_transition_time, first[0].last_transition_time);
        assert_eq!(same[0].observed_generation, Some(2));
        let flipped = merge_conditions(
            &same,
            vec![cond("Degraded", false, "C", "", Some(2))],
            Some(2),
            t1,
        );
        assert_eq!(flipped[0].last_transition_time, Some(t1.to_string()));
    }
}
