//! The reconcile loop: observe, decide, apply, write the status, requeue.
//!
//! One reconcile of a KvCluster reads, in this order: the topology ConfigMap,
//! the StatefulSet, the node pods, the token Secrets, with `spec.tls` the CA
//! and certificate Secrets ([`tls`]), and (in a real cluster) each live
//! node's `/v1/cluster` (over https with `spec.tls`). It hands that to the
//! [planner](crate::planner) (see [`decide`]) and then applies, in this order: the generated Secrets (created once, never
//! overwritten; the nodes' certificate is renewed in place), the topology ConfigMap, the peer and client Services, the
//! StatefulSet, the PodDisruptionBudget (or its removal), the NetworkPolicy
//! (or its removal), the deletion of pods
//! held down by fault injection, Events for what changed, and the status with
//! `observedGeneration`. The ConfigMap goes before the StatefulSet so that a
//! scale-down removes pods only after the topology without them is written.
//!
//! Everything is server-side apply with the field manager `kv-operator`. A
//! spec the schema could not refuse becomes a condition: nothing is applied and
//! the controller waits for the next edit instead of retrying in a loop.
//!
//! A spec the planner refuses (a hold-down that would leave keys short of W
//! live owners, say) does not stop the cluster: the controller keeps
//! reconciling the last spec the planner accepted (`status.acceptedSpec`),
//! with failure detection, recoveries and rollouts, shows the refusal as the
//! condition `SpecRefused` and a Warning Event, and carries the new spec out
//! at the first reconcile where the planner accepts it.
//!
//! The status this writes is computed in [`status`](super::status), the
//! Events it publishes in [`events`](super::events), and its calls to the
//! nodes (reports, topology pushes) are in [`nodes`](super::nodes).
//!
//! Failure detection: a node is unreachable when it neither runs nor reports;
//! `status.nodes[].unreachableSince` keeps since when (across reconciles and
//! operator restarts), and the planner makes it Failed once that is
//! `spec.failureDetectionSeconds` ago.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{EventType, Recorder};
use kube::{Resource, ResourceExt};
use kv_core::{NodeState, Topology};
use serde::Serialize;
use tracing::{info, warn};

use super::bootstrap;
use super::crd::{
    AcceptedSpec, Condition, FORCE_FAULT_INJECTION, KvCluster, KvClusterStatus, NodeStatus, Phase,
    TlsMode,
};
use super::hibernation::{self, Hibernation};
use super::metrics::Metrics;
use super::objects;
use super::restart;
use super::tls;
use super::verify;
use super::volumes;
use crate::planner::{
    self, Desired, NodeObservation, NodeProgress, Observed, PlannerConfig, Rebalance,
};

use super::events::{publish, publish_hibernation, publish_transitions, warn_invalid_annotation};
pub use super::nodes::{NODE_CALL_TIMEOUT, NodeReports, ReportUrl, adopt};
use super::nodes::{fetch_report, node_client, push_topology};
pub use super::status::{FORCE_CONDITION, SPEC_REFUSED, force_condition, status_patch};
use super::status::{
    cond, conditions_of, merge_conditions, parse_ms, rfc3339, show_restart, spec_refused,
    status_of, write_status,
};

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
    pod_monitors: Option<std::sync::Mutex<Option<(Instant, bool)>>>,
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
async fn apply_or_delete<K>(api: &Api<K>, name: &str, obj: Option<&K>) -> Result<(), Error>
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
    Ok(Decision {
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
        transitions: plan.transitions,
        rebalance: plan.rebalance,
        phase: plan.phase.into(),
        hibernation_deferred: plan.hibernation_deferred,
    })
}

/// Reconcile one KvCluster. Called by the kube-runtime `Controller`.
#[tracing::instrument(skip_all, fields(kvcluster = %kvc.name_any(), namespace = kvc.namespace().unwrap_or_default()))]
pub async fn reconcile(kvc: Arc<KvCluster>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_inner(&kvc, &ctx).await;
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

async fn reconcile_inner(kvc: &KvCluster, ctx: &Context) -> Result<Action, Error> {
    let ns = kvc.namespace().ok_or(Error::MissingNamespace)?;
    let name = kvc.name_any();
    let key = format!("{ns}/{name}");
    if kvc.meta().deletion_timestamp.is_some() {
        // Owner references let Kubernetes delete what the cluster owns.
        ctx.metrics.forget_cluster(&key);
        return Ok(Action::await_change());
    }
    let now = Timestamp::now();
    let kvcs: Api<KvCluster> = Api::namespaced(ctx.client.clone(), &ns);
    let previous = kvc.status.clone().unwrap_or_default();

    if let Err(reason) = kvc.spec.validate() {
        warn!(kvcluster = %name, %reason, "invalid spec");
        refuse(
            ctx,
            kvc,
            &kvcs,
            &previous,
            "InvalidSpec",
            &reason,
            vec![],
            now,
        )
        .await?;
        ctx.metrics.observe_cluster(&key, Phase::Failed, vec![], 0);
        return Ok(Action::await_change());
    }

    warn_invalid_annotation(ctx, kvc, &previous).await;

    // Observe.
    let cms: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
    let stss: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let cm_name = objects::topology_configmap_name(kvc);
    let stored = get_opt(&cms, &cm_name).await?;
    // Ordinals whose pods may be waiting fenced on the held list they read
    // at start (see the release below).
    let was_held: BTreeSet<u32> = stored
        .as_ref()
        .and_then(|cm| cm.data.as_ref()?.get(objects::HELD_KEY))
        .map(|list| kv_core::topology::parse_held(list).0)
        .unwrap_or_default();
    // The version read, for a conditional write below: a topology is
    // written only over the ConfigMap it was planned from.
    let stored_version = stored
        .as_ref()
        .map(|cm| cm.metadata.resource_version.clone());
    let topology = stored.and_then(|cm| {
        let json = cm.data?.remove(objects::TOPOLOGY_KEY)?;
        match Topology::from_json(json.as_bytes()) {
            Ok(t) => Some(t),
            Err(e) => {
                warn!(kvcluster = %name, error = %e, "topology ConfigMap is invalid; rewriting it");
                None
            }
        }
    });
    let sts = get_opt(&stss, &objects::statefulset_name(kvc)).await?;
    let selector = objects::selector_labels(kvc)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let pod_list = pods.list(&ListParams::default().labels(&selector)).await?;
    let secret_name = objects::auth_secret_name(kvc);
    let secret = get_opt(&secrets, &secret_name).await?;
    let cluster_secret_name = objects::cluster_auth_secret_name(kvc);
    let cluster_secret = if cluster_secret_name == secret_name {
        secret.clone()
    } else {
        get_opt(&secrets, &cluster_secret_name).await?
    };
    let (ca_secret, tls_secret) = tls_secrets(&secrets, kvc).await?;
    let node_http = ctx
        .node_reports
        .as_ref()
        .and_then(|r| node_client(r, kvc, ca_secret.as_ref(), tls_secret.as_ref()));

    // The KvCluster's UID names the cluster: a KvCluster deleted and made
    // again under the same name is another cluster, and nodes on volumes it
    // retained do not serve the old data as the new cluster's (a node
    // refuses a topology of another cluster id). Clusters made before the
    // UID was used keep the `namespace/name` their topology carries.
    let legacy_id = key.clone();
    let mut observed = Observed {
        cluster_id: kvc.uid().unwrap_or_else(|| key.clone()),
        topology,
        epoch_floor: previous.topology_epoch,
        now_ms: u64::try_from(now.as_millisecond()).unwrap_or(0),
        ..Observed::default()
    };
    let sts_created = sts
        .as_ref()
        .and_then(|s| s.metadata.creation_timestamp.as_ref())
        .and_then(|t| u64::try_from(t.0.as_millisecond()).ok());
    let mut ready = BTreeMap::new();
    // Nodes whose store is new or rebuilt (a wiped or replaced volume):
    // they serve nothing until they have pulled their buckets.
    let mut catching_up = BTreeSet::new();
    let mut tokens_held: BTreeMap<u32, kv_core::report::TokenFingerprints> = BTreeMap::new();
    // Whether the nodes were asked for their reports: a node that is asked
    // is back from hibernation only once it answers.
    let mut reporting = false;
    for pod in &pod_list.items {
        let Some(ordinal) = ordinal_of(&name, &pod.name_any()) else {
            continue;
        };
        ready.insert(ordinal, pod_ready(pod));
        observed.nodes.insert(ordinal, observe_pod(pod));
    }
    if let (Some(reports), Some(http), Some(token)) = (
        &ctx.node_reports,
        &node_http,
        secret_token(secret.as_ref(), objects::TOKEN_KEY),
    ) {
        reporting = true;
        // All at once: a node that does not answer costs one timeout, not one each.
        let asks = observed
            .nodes
            .iter()
            .filter(|(_, o)| o.running)
            .map(|(&ordinal, _)| {
                let url = (reports.url)(kvc, ordinal);
                let token = &token;
                async move { (ordinal, fetch_report(http, &url, token).await) }
            });
        let mut held_by_nodes: Vec<Topology> = Vec::new();
        for (ordinal, report) in futures::future::join_all(asks).await {
            if let Some(obs) = observed.nodes.get_mut(&ordinal) {
                obs.report = report.as_ref().map(NodeProgress::from);
            }
            if report.as_ref().is_some_and(|r| r.store_catching_up) {
                catching_up.insert(ordinal);
            }
            if let Some(r) = &report {
                tokens_held.insert(ordinal, r.tokens.clone());
            }
            held_by_nodes.extend(report.map(|r| r.topology));
        }
        // No valid ConfigMap (deleted, or edited into garbage): the nodes
        // keep the topology they were given, so the newest one of this
        // cluster is carried on from. Planning from nothing would commit
        // the target placement with every node Up, and new owners would
        // serve keys they never received.
        if observed.topology.is_none()
            && let Some(t) = adopt(held_by_nodes, &[&observed.cluster_id, &legacy_id])
        {
            warn!(kvcluster = %name, epoch = t.epoch, "no valid topology ConfigMap: carrying on from the newest topology the nodes hold");
            publish(
                ctx,
                kvc,
                EventType::Warning,
                "TopologyAdopted",
                "Observe",
                &format!(
                    "the topology ConfigMap was missing or invalid; carried on from epoch {} held by the nodes",
                    t.epoch
                ),
            )
            .await;
            observed.topology = Some(t);
        }
    }
    // A node of the topology without a pod (deleted, or not schedulable)
    // has been down at least since the StatefulSet exists; a joiner's pod is
    // still being created. Nodes refuse a topology older than theirs: if the
    // ConfigMap and the status were both lost, the nodes' own epochs keep the
    // next one above (the planner counts reported epochs too).
    if let Some(t) = &observed.topology {
        for n in &t.nodes {
            if n.state != NodeState::Joining {
                observed
                    .nodes
                    .entry(n.ordinal)
                    .or_insert_with(|| NodeObservation {
                        running: false,
                        down_since_ms: sts_created,
                        report: None,
                    });
            }
        }
    }
    let mut unreachable = track_unreachable(&mut observed, &previous);
    // Waking up from hibernation: nodes whose pods are not back yet were
    // stopped on request, not lost (see `hibernation`).
    let waking = hibernation::waking(kvc, &previous, now);
    let not_back = hibernation::not_back(&observed, &ready, reporting);
    if waking {
        hibernation::spare_waking_nodes(&mut observed, &mut unreachable);
    }
    observed.epoch_floor = observed
        .nodes
        .values()
        .filter_map(|o| o.report.as_ref().map(|r| r.epoch))
        .fold(observed.epoch_floor, u64::max);

    // Decide: the current spec, or while the planner refuses it, the last
    // accepted one (the objects are then built for that one too).
    let (decision, accepted, refused) = match decide(kvc, &observed) {
        Ok(d) => (d, AcceptedSpec::of(kvc), None),
        Err(reason) => {
            warn!(kvcluster = %name, %reason, "spec refused");
            match carry_on(kvc, &previous, &observed) {
                Some((d, accepted)) => (d, accepted, Some(reason)),
                None => {
                    let c = spec_refused(&reason, None, kvc.meta().generation);
                    refuse(
                        ctx,
                        kvc,
                        &kvcs,
                        &previous,
                        SPEC_REFUSED,
                        &reason,
                        vec![c],
                        now,
                    )
                    .await?;
                    ctx.metrics.observe_cluster(&key, Phase::Failed, vec![], 0);
                    // The refusal may depend on nodes that are down: look again later.
                    return Ok(Action::requeue(Duration::from_secs(60)));
                }
            }
        }
    };
    let carried = accepted.applied_to(kvc);
    let kvc = &carried;
    let hibernated = decision.phase == Phase::Hibernated;
    if hibernated {
        // Stopped on request: no node is unreachable.
        unreachable.clear();
    }
    if let Some(reason) = &refused {
        let c = spec_refused(reason, Some(accepted.generation), kvc.meta().generation);
        // One Event per refused generation; the condition follows the
        // planner's message, which can change with the nodes' states.
        let shown = previous.conditions.iter().any(|p| {
            p.type_ == SPEC_REFUSED
                && p.status == "True"
                && p.observed_generation == c.observed_generation
        });
        if !shown {
            publish(
                ctx,
                kvc,
                EventType::Warning,
                SPEC_REFUSED,
                "Validate",
                &c.message,
            )
            .await;
        }
    }

    // Apply.
    let mut problems = Vec::new();
    // Before the StatefulSet: no node of a cluster started from a backup
    // may start without the source.
    let bootstrap_problem = bootstrap::prepare(kvc, &secrets, previous.bootstrap.as_ref()).await?;
    if let Some(p) = &bootstrap_problem {
        problems.push(("BootstrapSourceUnusable", p.clone()));
    }
    if kvc.spec.auth_secret_name.is_none() {
        if secret.is_none() {
            let s = objects::auth_secret(kvc, &objects::random_token());
            secrets.create(&PostParams::default(), &s).await?;
            info!(kvcluster = %name, secret = %secret_name, "generated the client token Secret");
        }
        if cluster_secret.is_none() {
            // A cluster made when `<name>-auth` held both tokens keeps its
            // cluster token: its running nodes know only that one.
            let kept = secret
                .as_ref()
                .and_then(|s| s.data.as_ref()?.get(objects::CLUSTER_TOKEN_KEY))
                .and_then(|t| String::from_utf8(t.0.clone()).ok())
                .filter(|t| kv_net::token::parse("cluster token", t).is_ok());
            let token = kept.unwrap_or_else(objects::random_token);
            let s = objects::cluster_auth_secret(kvc, &token);
            secrets.create(&PostParams::default(), &s).await?;
            info!(kvcluster = %name, secret = %cluster_secret_name, "generated the cluster token Secret");
        }
    } else if secret_token(secret.as_ref(), objects::TOKEN_KEY).is_none()
        || secret_token(cluster_secret.as_ref(), objects::CLUSTER_TOKEN_KEY).is_none()
    {
        problems.push((
            "AuthSecretMissing",
            format!("Secret {secret_name} is missing or lacks the keys token and cluster-token"),
        ));
    }
    let named = decision.pods.max(kvc.spec.replicas);
    match kvc.spec.tls.mode {
        TlsMode::Generated => problems.extend(
            ensure_tls(kvc, &secrets, ca_secret, tls_secret, named)
                .await?
                .map(|p| ("TlsCaUnusable", p)),
        ),
        TlsMode::Provided => problems.extend(
            tls::check_provided(kvc, tls_secret.as_ref(), named, SystemTime::now())
                .err()
                .map(|p| ("TlsSecretInvalid", p)),
        ),
        TlsMode::Disabled => {}
    }
    let cm = objects::topology_configmap(kvc, &decision.topology)
        .map_err(|e| Error::Serialization("topology", e))?;
    write_topology(&cms, &cm_name, cm, stored_version).await?;
    // The ConfigMap is the copy a starting node reads; a running node sees a
    // change of it only at the kubelet's next sync (a minute or more), so
    // every running node is told at once. Nodes keep the newest epoch they
    // are given; one that missed this push reports an older epoch and is
    // pushed to again at the next reconcile.
    if decision.push_topology
        && let (Some(links), Some(http), Some(cluster_token)) = (
            &ctx.node_reports,
            &node_http,
            secret_token(cluster_secret.as_ref(), objects::CLUSTER_TOKEN_KEY),
        )
    {
        let running: Vec<u32> = observed
            .nodes
            .iter()
            .filter(|(_, o)| o.running)
            .map(|(&o, _)| o)
            .collect();
        push_topology(
            links,
            http,
            kvc,
            &running,
            &decision.topology,
            &cluster_token,
        )
        .await;
    }
    let svcs: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
    apply(
        &svcs,
        &objects::peer_service_name(kvc),
        &objects::peer_service(kvc),
    )
    .await?;
    apply(
        &svcs,
        &objects::client_service_name(kvc),
        &objects::client_service(kvc),
    )
    .await?;
    let mut statefulset = objects::statefulset(kvc, decision.pods);
    if let Some(live) = &sts {
        volumes::keep_template_size(&mut statefulset, live);
    }
    apply(&stss, &objects::statefulset_name(kvc), &statefulset).await?;
    // Once a resize was asked for, the claims are watched over (a scale-up
    // makes claims of the template's size; a size set back is reported).
    let resized_before = previous
        .conditions
        .iter()
        .any(|c| c.type_ == volumes::CONDITION);
    let volumes_condition =
        if resized_before || volumes::resize_asked(&kvc.spec.storage.size, sts.as_ref()) {
            Some(resize_volumes(ctx, kvc, &selector).await?)
        } else {
            None
        };
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(ctx.client.clone(), &ns);
    apply_or_delete(&pdbs, &objects::pdb_name(kvc), objects::pdb(kvc).as_ref()).await?;
    let nps: Api<NetworkPolicy> = Api::namespaced(ctx.client.clone(), &ns);
    let np = objects::network_policy(kvc, ctx.operator_namespace.as_deref());
    apply_or_delete(&nps, &objects::network_policy_name(kvc), np.as_ref()).await?;
    if pod_monitors_served(ctx).await {
        let monitors: Api<DynamicObject> =
            Api::namespaced_with(ctx.client.clone(), &ns, &objects::pod_monitor_resource());
        let pm = objects::pod_monitor(kvc);
        apply_or_delete(&monitors, &objects::pod_monitor_name(kvc), pm.as_ref()).await?;
    }
    for &ordinal in &decision.delete_pods {
        let pod = objects::pod_name(kvc, ordinal);
        match pods.delete(&pod, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(e.into()),
        }
        info!(kvcluster = %name, %pod, "fault injection: pod deleted and held down");
        let mut note = format!(
            "node {ordinal} ({pod}) deleted and held Failed until removed from faultInjection.failedNodes"
        );
        if kvc.force_fault_injection() == Ok(true) {
            note.push_str(&format!(
                " (planned with force: {FORCE_FAULT_INJECTION} is \"true\")"
            ));
        }
        publish(
            ctx,
            kvc,
            EventType::Normal,
            "FaultInjected",
            "DeletePod",
            &note,
        )
        .await;
    }
    // A released node's pod waits on the held list it read at start; its
    // mounted copy changes only at the kubelet's next sync (a minute or
    // more), so the pod is deleted once, and the new one reads the list
    // just written.
    let held_now = kvc.desired().failed_nodes;
    for &ordinal in was_held.difference(&held_now) {
        let pod = objects::pod_name(kvc, ordinal);
        if hibernated || !observed.nodes.get(&ordinal).is_some_and(|o| o.running) {
            continue;
        }
        match pods.delete(&pod, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => continue,
            Err(e) => return Err(e.into()),
        }
        info!(kvcluster = %name, %pod, "hold-down released: pod deleted to restart with the current list");
        publish(
            ctx,
            kvc,
            EventType::Normal,
            "HoldReleased",
            "DeletePod",
            &format!("node {ordinal} ({pod}) released from faultInjection.failedNodes: its pod restarts and the node catches up"),
        )
        .await;
    }
    publish_transitions(ctx, kvc, &decision).await;
    let hibernation = hibernation::state(
        hibernated,
        decision.hibernation_deferred.as_deref(),
        waking,
        &not_back,
        &previous,
    );
    publish_hibernation(ctx, kvc, hibernation.as_ref(), &previous).await;
    let restart = restart_step(
        kvc,
        &decision,
        &pod_list.items,
        &observed,
        &catching_up,
        hibernation.as_ref(),
        now,
        &previous,
    );
    if let Some(ordinal) = restart.delete {
        let pod = objects::pod_name(kvc, ordinal);
        match pods.delete(&pod, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(e.into()),
        }
        info!(kvcluster = %name, %pod, "rolling restart: pod deleted");
    }
    if let Some((reason, note)) = &restart.event {
        publish(ctx, kvc, EventType::Normal, reason, "Restart", note).await;
    }

    // Status.
    let mut status = status_of(
        kvc,
        &decision,
        &ready,
        sts.as_ref(),
        &previous,
        problems,
        hibernation.as_ref(),
        now,
    );
    for n in &mut status.nodes {
        n.unreachable_since = unreachable.get(&n.ordinal).map(|&ms| rfc3339(ms));
        n.tokens = tokens_held.get(&n.ordinal).cloned().map(Into::into);
        // Shown as what it is to a user: not serving, catching up. (The
        // topology keeps it Up: the node itself refuses reads and its
        // acknowledgements do not count until it has caught up.)
        if n.state == NodeState::Up && catching_up.contains(&n.ordinal) {
            n.state = NodeState::Recovering;
        }
    }
    if status.phase == Some(Phase::Running) && status.nodes.iter().any(|n| n.state != NodeState::Up)
    {
        status.phase = Some(Phase::Degraded);
    }
    status.bootstrap = bootstrap::status(
        kvc,
        previous.bootstrap.as_ref(),
        bootstrap_problem,
        status.phase.unwrap_or(decision.phase),
        status
            .nodes
            .iter()
            .filter(|n| n.state == NodeState::Up)
            .count(),
        &now.to_string(),
    );
    if status.bootstrap.as_ref().map(|b| b.phase) == Some(bootstrap::BootstrapPhase::Restored)
        && previous.bootstrap.as_ref().map(|b| b.phase) != Some(bootstrap::BootstrapPhase::Restored)
    {
        publish(
            ctx,
            kvc,
            EventType::Normal,
            "Restored",
            "Bootstrap",
            &format!(
                "every node loaded its buckets from {} and is Up",
                kvc.spec
                    .bootstrap
                    .as_ref()
                    .map_or("", |b| b.from_backup.destination.as_str())
            ),
        )
        .await;
    }
    let generation = kvc.meta().generation;
    status.conditions = match &refused {
        Some(reason) => merge_conditions(
            &status.conditions,
            vec![spec_refused(reason, Some(accepted.generation), generation)],
            generation,
            now,
        ),
        None => {
            let mut cs = status.conditions;
            cs.retain(|c| c.type_ != SPEC_REFUSED);
            cs
        }
    };
    if let Some(h) = &hibernation {
        status.conditions = merge_conditions(
            &status.conditions,
            vec![h.condition(decision.topology.epoch, generation)],
            generation,
            now,
        );
    }
    // A resize in progress is looked at again soon, like a rollout.
    let volumes_settled = volumes_condition
        .as_ref()
        .is_none_or(|c| c.status == "True" || c.reason == "ExpansionNotSupported");
    if let Some(c) = volumes_condition {
        status.conditions = merge_conditions(&status.conditions, vec![c], generation, now);
    }
    if let (Some(at), Some(links), Some(http), Some(token)) = (
        verify::requested(kvc, previous.last_verify.as_ref()),
        &ctx.node_reports,
        &node_http,
        secret_token(secret.as_ref(), objects::TOKEN_KEY),
    ) {
        let v = verify::run(
            links,
            http,
            kvc,
            &decision.topology,
            &token,
            at,
            now.to_string(),
        )
        .await;
        let (type_, reason, note) = if v.consistent {
            (
                EventType::Normal,
                "Verified",
                format!(
                    "{} buckets compared at epoch {}: every owner holds the same",
                    v.buckets_compared, v.epoch
                ),
            )
        } else {
            (
                EventType::Warning,
                "VerifyFailed",
                format!(
                    "{} of {} buckets differ between owners; not checked: {}",
                    v.divergent_buckets,
                    v.buckets_compared,
                    if v.not_checked.is_empty() {
                        "none".to_string()
                    } else {
                        v.not_checked.join("; ")
                    }
                ),
            )
        };
        publish(ctx, kvc, type_, reason, "Verify", &note).await;
        status.last_verify = Some(v);
    }
    show_restart(&mut status, &restart, generation, now);
    status.last_restart = restart.status.clone();
    status.accepted_spec = Some(accepted);
    write_status(&kvcs, kvc, &status).await?;
    let phase = status.phase.unwrap_or(decision.phase);
    // Failed nodes listed in faultInjection.failedNodes are a drill.
    let held = kvc
        .desired()
        .held_down(decision.topology.nodes.iter().map(|n| (n.ordinal, n.state)));
    ctx.metrics.observe_cluster(
        &key,
        phase,
        decision.topology.nodes.iter().map(|n| n.state).collect(),
        held,
    );
    info!(kvcluster = %name, phase = ?phase, epoch = decision.topology.epoch, "reconciled");

    // Look again soon while anything is moving or a refused spec waits;
    // node reports are polled, not watched.
    let in_topology = decision.topology.nodes.last().map_or(0, |n| n.ordinal + 1);
    let keeps_retired_pods = decision.pods > in_topology;
    // A token rotation in progress (kvctl rotate-token --cluster waits on
    // the fingerprints in the status): look again soon until every node
    // holds what the Secrets hold.
    let tokens_settled = tokens_settled(
        &tokens_held,
        secret_fingerprints(secret.as_ref(), objects::TOKEN_KEY),
        secret_fingerprints(cluster_secret.as_ref(), objects::CLUSTER_TOKEN_KEY),
    );
    let settled = matches!(phase, Phase::Running | Phase::Hibernated)
        && tokens_settled
        && refused.is_none()
        && !decision.push_topology
        && !keeps_retired_pods
        && !restart.in_progress()
        && volumes_settled
        && hibernation
            .as_ref()
            .is_none_or(|h| matches!(h, Hibernation::Hibernated | Hibernation::Awake));
    Ok(Action::requeue(Duration::from_secs(if settled {
        60
    } else {
        5
    })))
}

/// Nothing is applied: a condition and (once per generation) an Event say
/// why; `extra` conditions are shown with it.
#[allow(clippy::too_many_arguments)]
async fn refuse(
    ctx: &Context,
    kvc: &KvCluster,
    kvcs: &Api<KvCluster>,
    previous: &KvClusterStatus,
    reason_code: &str,
    reason: &str,
    extra: Vec<Condition>,
    now: Timestamp,
) -> Result<(), Error> {
    let generation = kvc.meta().generation;
    let already = previous.observed_generation == generation
        && previous.phase == Some(Phase::Failed)
        && previous
            .conditions
            .iter()
            .any(|c| c.type_ == "Progressing" && c.reason == reason_code && c.message == reason);
    if !already {
        publish(
            ctx,
            kvc,
            EventType::Warning,
            reason_code,
            "Validate",
            reason,
        )
        .await;
    }
    let status = KvClusterStatus {
        phase: Some(Phase::Failed),
        observed_generation: generation,
        conditions: conditions_of(
            kvc,
            &previous.conditions,
            std::iter::once(cond("Progressing", false, reason_code, reason, generation))
                .chain(extra)
                .collect(),
            generation,
            now,
        ),
        ..previous.clone()
    };
    write_status(kvcs, kvc, &status).await
}

/// Whether PodMonitors can be made here (the Prometheus Operator's CRDs are
/// installed), asked of the API server's discovery at most once per
/// [`MONITORING_DISCOVERY_TTL`]. A failed question is not remembered.
async fn pod_monitors_served(ctx: &Context) -> bool {
    let Some(cache) = &ctx.pod_monitors else {
        return false;
    };
    if let Ok(c) = cache.lock()
        && let Some((at, served)) = *c
        && at.elapsed() < MONITORING_DISCOVERY_TTL
    {
        return served;
    }
    let resource = objects::pod_monitor_resource();
    let served = match ctx
        .client
        .list_api_group_resources(&resource.api_version)
        .await
    {
        Ok(list) => list.resources.iter().any(|r| r.name == resource.plural),
        Err(e) if is_not_found(&e) => false,
        Err(e) => {
            warn!(error = %e, "cannot tell whether PodMonitors are served; none made this time");
            return false;
        }
    };
    if let Ok(mut c) = cache.lock() {
        *c = Some((Instant::now(), served));
    }
    served
}

/// Grow the claims of `kvc` (those of label `selector`) to
/// `spec.storage.size` where their class allows it; the condition
/// [`volumes::CONDITION`] says how far it got (see [`volumes`]).
async fn resize_volumes(
    ctx: &Context,
    kvc: &KvCluster,
    selector: &str,
) -> Result<Condition, Error> {
    let ns = kvc.namespace().ok_or(Error::MissingNamespace)?;
    let generation = kvc.meta().generation;
    let want = &kvc.spec.storage.size;
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
    let claims = pvcs
        .list(&ListParams::default().labels(selector))
        .await?
        .items;
    let classes: Api<StorageClass> = Api::all(ctx.client.clone());
    let mut allows = BTreeMap::new();
    for class in claims.iter().filter_map(volumes::class_of) {
        if allows.contains_key(&class) {
            continue;
        }
        let allowed = get_opt(&classes, &class)
            .await?
            .and_then(|c| c.allow_volume_expansion)
            .unwrap_or(false);
        allows.insert(class, allowed);
    }
    let assessment = volumes::assess(want, &claims, &allows);
    let patch = serde_json::json!({"spec": {"resources": {"requests": {"storage": want}}}});
    for claim in &assessment.expand {
        match pvcs
            .patch(claim, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                info!(kvcluster = %kvc.name_any(), claim, size = %want, "resizing the volume claim");
            }
            // The API server's admission has the last word (e.g. a class
            // edited since it was read): say what it said.
            Err(kube::Error::Api(e)) if e.code == 403 || e.code == 422 => {
                return Ok(cond(
                    volumes::CONDITION,
                    false,
                    "ExpansionRefused",
                    &format!(
                        "the API server refused to resize {claim} to {want}: {}",
                        e.message
                    ),
                    generation,
                ));
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(cond(
        volumes::CONDITION,
        assessment.done,
        assessment.reason,
        &assessment.message,
        generation,
    ))
}

/// The plan of the last accepted spec (`status.acceptedSpec`), when the
/// current one is refused: `None` when there is none, it is the current one,
/// or it is refused as well.
fn carry_on(
    kvc: &KvCluster,
    previous: &KvClusterStatus,
    observed: &Observed,
) -> Option<(Decision, AcceptedSpec)> {
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
    let desired = planner::Desired {
        hibernate: kvc.spec.hibernation,
        ..accepted.desired()
    };
    let d = decide_for(&accepted.applied_to(kvc), &desired, observed).ok()?;
    Some((d, accepted))
}

/// Since when each node that neither runs nor reports has been unreachable
/// (ms since the Unix epoch), and the same time in `observed` for the
/// planner. Counted from the status when it already shows the node
/// unreachable; from now when the last status showed it reachable (the
/// controller reconciles on every pod change, so that is when it changed);
/// otherwise (a node the status does not list: a new cluster, a new status)
/// from the pod's own times or the StatefulSet's creation, as observed.
fn track_unreachable(observed: &mut Observed, previous: &KvClusterStatus) -> BTreeMap<u32, u64> {
    let now = observed.now_ms;
    let mut out = BTreeMap::new();
    for (&ordinal, obs) in observed.nodes.iter_mut() {
        if obs.alive() {
            continue;
        }
        let before = previous.nodes.iter().find(|n| n.ordinal == ordinal);
        obs.down_since_ms = match before {
            Some(n) => match n.unreachable_since.as_deref().and_then(parse_ms) {
                Some(t) => Some(t.min(now)),
                None => Some(now),
            },
            None => obs.down_since_ms,
        };
        if let Some(t) = obs.down_since_ms {
            out.insert(ordinal, t);
        }
    }
    out
}

/// `demo-2` of cluster `demo` → 2.
pub fn ordinal_of(cluster: &str, pod: &str) -> Option<u32> {
    pod.strip_prefix(cluster)?.strip_prefix('-')?.parse().ok()
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// A pod is alive when its kv-node container is running and has passed its
/// startup probe — independent of readiness, which only an Up node has.
pub fn observe_pod(pod: &Pod) -> NodeObservation {
    let terminating = pod.metadata.deletion_timestamp.is_some();
    let status = pod.status.as_ref();
    let alive = !terminating
        && status
            .and_then(|s| s.container_statuses.as_ref())
            .is_some_and(|cs| {
                cs.iter().any(|c| {
                    c.name == "kv-node"
                        && c.started == Some(true)
                        && c.state.as_ref().is_some_and(|s| s.running.is_some())
                })
            });
    let ms = |t: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time| {
        u64::try_from(t.0.as_millisecond()).unwrap_or(0)
    };
    let created = pod.metadata.creation_timestamp.as_ref().map(ms);
    let ready_changed = status
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .and_then(|c| c.last_transition_time.as_ref())
        .map(ms);
    NodeObservation {
        running: alive,
        down_since_ms: if alive {
            None
        } else {
            created.max(ready_changed).or(Some(0))
        },
        report: None,
    }
}

/// The Secrets holding the cluster CA and the nodes' certificate under
/// `spec.tls` (one Secret for both when Provided); none without TLS.
pub(super) async fn tls_secrets(
    secrets: &Api<Secret>,
    kvc: &KvCluster,
) -> Result<(Option<Secret>, Option<Secret>), Error> {
    Ok(match kvc.spec.tls.mode {
        TlsMode::Generated => (
            get_opt(secrets, &tls::ca_secret_name(kvc)).await?,
            get_opt(secrets, &tls::tls_secret_name(kvc)).await?,
        ),
        // The user's Secret carries the CA beside the certificate.
        TlsMode::Provided => {
            let s = get_opt(secrets, &tls::tls_secret_name(kvc)).await?;
            (s.clone(), s)
        }
        TlsMode::Disabled => (None, None),
    })
}

/// Every token a Secret's `key` holds, in its order (during a rotation it
/// holds two, in kv_net::token's format); `None` when the Secret, the key or
/// a valid token is missing.
fn secret_tokens(secret: Option<&Secret>, key: &str) -> Option<Vec<String>> {
    let raw = secret?.data.as_ref()?.get(key)?;
    let text = std::str::from_utf8(&raw.0).ok()?;
    kv_net::token::parse("token", text).ok()
}

/// The token to send from a Secret's `key`: its first line.
pub(super) fn secret_token(secret: Option<&Secret>, key: &str) -> Option<String> {
    secret_tokens(secret, key)?.into_iter().next()
}

/// The fingerprints of every token a Secret's `key` holds, in its order.
fn secret_fingerprints(secret: Option<&Secret>, key: &str) -> Option<Vec<String>> {
    secret_tokens(secret, key).map(|t| kv_net::token::fingerprints(&t))
}

/// Does every node that reported hold exactly the tokens of the Secrets,
/// one token each (no rotation under way)? A Secret that cannot be read
/// says nothing against it.
fn tokens_settled(
    held: &BTreeMap<u32, kv_core::report::TokenFingerprints>,
    client: Option<Vec<String>>,
    cluster: Option<Vec<String>>,
) -> bool {
    let one = |f: &Option<Vec<String>>| f.as_ref().is_none_or(|f| f.len() <= 1);
    one(&client)
        && one(&cluster)
        && held.values().all(|t| {
            // A node that shows no tokens (an older version) is not waited on.
            let same = |want: &Option<Vec<String>>, shown: &Vec<String>| {
                shown.is_empty() || want.as_ref().is_none_or(|w| w == shown)
            };
            same(&client, &t.client) && same(&cluster, &t.cluster)
        })
}

/// Keeps `<name>-ca` and `<name>-tls` (`spec.tls.mode: Generated`): the CA
/// made once, the certificate for pods `0..pods` issued again when
/// [`tls::reissue_reason`] says so (conditionally on the version read). A
/// CA Secret that is there but unusable is a problem for the status, never
/// replaced: certificates the nodes trust may chain to it.
async fn ensure_tls(
    kvc: &KvCluster,
    secrets: &Api<Secret>,
    ca_secret: Option<Secret>,
    tls_secret: Option<Secret>,
    pods: u32,
) -> Result<Option<String>, Error> {
    let name = kvc.name_any();
    let ca = match &ca_secret {
        Some(s) => match tls::ca_of(kvc, s) {
            Some(ca) => ca,
            None => {
                return Ok(Some(format!(
                    "Secret {} holds no usable CA ({} and {}); it is never replaced: delete it to have a new CA made",
                    tls::ca_secret_name(kvc),
                    tls::CA_CERT_KEY,
                    tls::CA_KEY_KEY
                )));
            }
        },
        None => {
            let (ca, s) = tls::new_ca(kvc).map_err(Error::Tls)?;
            secrets.create(&PostParams::default(), &s).await?;
            info!(kvcluster = %name, secret = %tls::ca_secret_name(kvc), "generated the cluster CA");
            ca
        }
    };
    let now = SystemTime::now();
    let Some(reason) = tls::reissue_reason(tls_secret.as_ref(), ca.cert_pem(), pods, now) else {
        return Ok(None);
    };
    let mut s = tls::cert_secret(kvc, &ca, pods, now).map_err(Error::Tls)?;
    match tls_secret {
        None => {
            secrets.create(&PostParams::default(), &s).await?;
        }
        Some(old) => {
            s.metadata.resource_version = old.metadata.resource_version;
            secrets
                .replace(&tls::tls_secret_name(kvc), &PostParams::default(), &s)
                .await?;
        }
    }
    info!(kvcluster = %name, secret = %tls::tls_secret_name(kvc), %reason, pods, "issued the nodes' certificate");
    Ok(None)
}

/// Write the topology ConfigMap only over the version it was planned from
/// (`stored`: `None` when there was none, then it is created): two
/// controllers overlapping across a leader change cannot both publish the
/// next epoch with different contents; the loser gets a conflict, and its
/// reconcile is retried from what the winner wrote.
async fn write_topology(
    cms: &Api<ConfigMap>,
    name: &str,
    mut cm: ConfigMap,
    stored: Option<Option<String>>,
) -> Result<(), Error> {
    match stored {
        Some(version) => {
            cm.metadata.resource_version = version;
            cms.replace(name, &PostParams::default(), &cm).await?;
        }
        None => {
            cms.create(&PostParams::default(), &cm).await?;
        }
    }
    Ok(())
}

/// The rolling restart's next step (see [`restart`]), from the pods and
/// reports this reconcile saw and the topology it planned.
#[allow(clippy::too_many_arguments)]
fn restart_step(
    kvc: &KvCluster,
    d: &Decision,
    pods: &[Pod],
    observed: &Observed,
    catching_up: &BTreeSet<u32>,
    hibernation: Option<&Hibernation>,
    now: Timestamp,
    previous: &KvClusterStatus,
) -> restart::Step {
    let mut nodes: BTreeMap<u32, restart::NodeView> = BTreeMap::new();
    for pod in pods {
        let Some(ordinal) = ordinal_of(&kvc.name_any(), &pod.name_any()) else {
            continue;
        };
        let v = nodes.entry(ordinal).or_default();
        v.pod_uid = pod.metadata.uid.clone();
        v.ready = pod_ready(pod) && pod.metadata.deletion_timestamp.is_none();
    }
    for (&ordinal, obs) in &observed.nodes {
        let v = nodes.entry(ordinal).or_default();
        v.report = obs.report.clone();
        v.store_catching_up = catching_up.contains(&ordinal);
    }
    let hold = match hibernation {
        Some(Hibernation::Hibernated) => Some("the cluster to wake up (spec.hibernation)"),
        Some(Hibernation::WakingUp(_)) => Some("the cluster to finish waking up"),
        _ if d.phase == Phase::Rebalancing || d.topology.pending.is_some() => {
            Some("the pending placement change to commit")
        }
        _ => None,
    };
    restart::step(
        restart::requested(kvc),
        previous.last_restart.as_ref(),
        &d.topology,
        &nodes,
        hold,
        &now.to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

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
