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
//! Failure detection: a node is unreachable when it neither runs nor reports;
//! `status.nodes[].unreachableSince` keeps since when (across reconciles and
//! operator restarts), and the planner makes it Failed once that is
//! `spec.failureDetectionSeconds` ago.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Resource, ResourceExt};
use kv_core::{NodeState, Topology};
use serde::Serialize;
use tracing::{info, warn};

use super::crd::{
    AcceptedSpec, Condition, FORCE_FAULT_INJECTION, KvCluster, KvClusterStatus, NodeStatus, Phase,
};
use super::hibernation::{self, Hibernation};
use super::metrics::Metrics;
use super::objects;
use super::restart;
use super::tls;
use crate::planner::{
    self, Desired, NodeObservation, NodeProgress, Observed, PlannerConfig, Rebalance,
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
            Error::Kube(_) => "kube",
            Error::Serialization(..) => "serialization",
            Error::MissingNamespace => "missing_namespace",
            Error::Tls(_) => "tls",
        }
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
}

/// The report URL of one node of a cluster.
pub type ReportUrl = Box<dyn Fn(&KvCluster, u32) -> String + Send + Sync>;

/// How long the operator waits for a node's answer.
pub const NODE_CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// Where and how the controller talks to nodes: their reports, and the
/// topology it pushes to them.
pub struct NodeReports {
    /// For clusters without TLS; a cluster with `spec.tls` is called with a
    /// client built from its Secrets at each reconcile ([`tls::client_config`]).
    pub http: reqwest::Client,
    /// The report URL of a node: `http://<pod>.<name>-peers.<ns>.svc:7400/v1/cluster`
    /// in a cluster (`https://` with `spec.tls`); tests point it at a local server.
    pub url: ReportUrl,
    /// Where a node takes a new topology (peer port, cluster token):
    /// `http://<pod>.<name>-peers.<ns>.svc:7401/internal/v1/topology`.
    pub topology_url: ReportUrl,
}

impl NodeReports {
    /// Reports from the nodes' stable DNS names, with a short timeout so that
    /// one dead node does not stall a reconcile.
    pub fn in_cluster() -> Option<NodeReports> {
        Some(NodeReports {
            // Plain HTTP to the nodes, with a TLS setup that needs no
            // system CA certificates: the operator image has none, and
            // reqwest's default setup cannot build a client without them
            // (node reports and pushes would then be silently off).
            http: reqwest::Client::builder()
                .timeout(NODE_CALL_TIMEOUT)
                .tls_backend_preconfigured(kv_net::tls::plaintext_client_config().ok()?)
                .build()
                .ok()?,
            url: Box::new(|kvc, ordinal| {
                format!(
                    "{}://{}:{}/v1/cluster",
                    scheme(kvc),
                    objects::pod_host(kvc, ordinal),
                    objects::CLIENT_PORT
                )
            }),
            topology_url: Box::new(|kvc, ordinal| {
                format!(
                    "{}://{}:{}/internal/v1/topology",
                    scheme(kvc),
                    objects::pod_host(kvc, ordinal),
                    objects::PEER_PORT
                )
            }),
        })
    }
}

fn scheme(kvc: &KvCluster) -> &'static str {
    if tls::enabled(kvc) { "https" } else { "http" }
}

/// The client for this cluster's nodes: [`NodeReports::http`] without TLS;
/// with TLS one trusting the cluster CA and presenting the nodes'
/// certificate, or none while those Secrets are not there (not made yet:
/// no node runs without them).
fn node_client(
    reports: &NodeReports,
    kvc: &KvCluster,
    ca_secret: Option<&Secret>,
    tls_secret: Option<&Secret>,
) -> Option<reqwest::Client> {
    if !tls::enabled(kvc) {
        return Some(reports.http.clone());
    }
    let config = match tls::client_config(ca_secret?, tls_secret?) {
        Ok(c) => c,
        Err(e) => {
            warn!(kvcluster = %kvc.name_any(), error = %e, "cannot call the nodes over TLS");
            return None;
        }
    };
    reqwest::Client::builder()
        .timeout(NODE_CALL_TIMEOUT)
        .tls_backend_preconfigured(config)
        .build()
        .inspect_err(|e| warn!(kvcluster = %kvc.name_any(), error = %e, "cannot build the TLS client for the nodes"))
        .ok()
}

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
        }
    }

    /// The operator runs in `namespace` (see [`Context::operator_namespace`]).
    pub fn with_operator_namespace(mut self, namespace: Option<String>) -> Context {
        self.operator_namespace = namespace;
        self
    }
}

fn apply_params() -> PatchParams {
    PatchParams::apply(objects::MANAGER).force()
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

async fn get_opt<K>(api: &Api<K>, name: &str) -> Result<Option<K>, Error>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.get(name).await {
        Ok(o) => Ok(Some(o)),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

async fn apply<K>(api: &Api<K>, name: &str, obj: &K) -> Result<(), Error>
where
    K: Clone + Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.patch(name, &apply_params(), &Patch::Apply(obj)).await?;
    Ok(())
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

/// Retry delay after `failures` consecutive failed reconciles: 5 s doubling
/// up to 5 minutes, so that a failing API server is not hammered. A watch
/// event still triggers a reconcile at once.
pub fn backoff(failures: u32) -> Duration {
    let secs = 5u64.saturating_mul(1u64 << failures.saturating_sub(1).min(6));
    Duration::from_secs(secs.min(300))
}

pub fn error_policy(kvc: Arc<KvCluster>, error: &Error, ctx: Arc<Context>) -> Action {
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
        ctx.metrics.observe_cluster(&key, Phase::Failed, vec![]);
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
    let (ca_secret, tls_secret) = if tls::enabled(kvc) {
        (
            get_opt(&secrets, &tls::ca_secret_name(kvc)).await?,
            get_opt(&secrets, &tls::tls_secret_name(kvc)).await?,
        )
    } else {
        (None, None)
    };
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
    let all_back = hibernation::all_back(&observed);
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
                    ctx.metrics.observe_cluster(&key, Phase::Failed, vec![]);
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
        problems.push(format!(
            "Secret {secret_name} is missing or lacks the keys token and cluster-token"
        ));
    }
    if tls::enabled(kvc) {
        let pods = decision.pods.max(kvc.spec.replicas);
        problems.extend(ensure_tls(kvc, &secrets, ca_secret, tls_secret, pods).await?);
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
    apply(
        &stss,
        &objects::statefulset_name(kvc),
        &objects::statefulset(kvc, decision.pods),
    )
    .await?;
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(ctx.client.clone(), &ns);
    match objects::pdb(kvc) {
        Some(pdb) => apply(&pdbs, &objects::pdb_name(kvc), &pdb).await?,
        None => match pdbs
            .delete(&objects::pdb_name(kvc), &DeleteParams::default())
            .await
        {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(e.into()),
        },
    }
    let nps: Api<NetworkPolicy> = Api::namespaced(ctx.client.clone(), &ns);
    match objects::network_policy(kvc, ctx.operator_namespace.as_deref()) {
        Some(np) => apply(&nps, &objects::network_policy_name(kvc), &np).await?,
        None => match nps
            .delete(&objects::network_policy_name(kvc), &DeleteParams::default())
            .await
        {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(e.into()),
        },
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
        all_back,
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
        now,
    );
    for n in &mut status.nodes {
        n.unreachable_since = unreachable.get(&n.ordinal).map(|&ms| rfc3339(ms));
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
    show_restart(&mut status, &restart, generation, now);
    status.last_restart = restart.status.clone();
    status.accepted_spec = Some(accepted);
    write_status(&kvcs, &name, &status).await?;
    let phase = status.phase.unwrap_or(decision.phase);
    ctx.metrics.observe_cluster(
        &key,
        phase,
        decision.topology.nodes.iter().map(|n| n.state).collect(),
    );
    info!(kvcluster = %name, phase = ?phase, epoch = decision.topology.epoch, "reconciled");

    // Look again soon while anything is moving or a refused spec waits;
    // node reports are polled, not watched.
    let in_topology = decision.topology.nodes.last().map_or(0, |n| n.ordinal + 1);
    let keeps_retired_pods = decision.pods > in_topology;
    let settled = matches!(phase, Phase::Running | Phase::Hibernated)
        && refused.is_none()
        && !decision.push_topology
        && !keeps_retired_pods
        && !restart.in_progress()
        && hibernation
            .as_ref()
            .is_none_or(|h| matches!(h, Hibernation::Hibernated | Hibernation::Awake));
    Ok(Action::requeue(Duration::from_secs(if settled {
        60
    } else {
        5
    })))
}

/// A Warning Event `InvalidAnnotation` when the force annotation has a value
/// other than `"true"` or `"false"`, once: not again while the status
/// already shows that value as invalid (an annotation edit does not change
/// the generation, so the condition's message is what tells them apart).
async fn warn_invalid_annotation(ctx: &Context, kvc: &KvCluster, previous: &KvClusterStatus) {
    let Some(c) = force_condition(kvc, kvc.meta().generation).filter(|c| c.status == "False")
    else {
        return;
    };
    let shown = previous
        .conditions
        .iter()
        .any(|p| p.type_ == FORCE_CONDITION && p.reason == c.reason && p.message == c.message);
    if !shown {
        warn!(kvcluster = %kvc.name_any(), message = %c.message, "invalid annotation");
        publish(
            ctx,
            kvc,
            EventType::Warning,
            "InvalidAnnotation",
            "Validate",
            &c.message,
        )
        .await;
    }
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
    write_status(kvcs, &kvc.name_any(), &status).await
}

async fn write_status(
    api: &Api<KvCluster>,
    name: &str,
    status: &KvClusterStatus,
) -> Result<(), Error> {
    let patch = serde_json::json!({
        "apiVersion": "kvstore.dev/v1alpha1",
        "kind": "KvCluster",
        "status": status,
    });
    api.patch_status(name, &apply_params(), &Patch::Apply(&patch))
        .await?;
    Ok(())
}

/// The condition of a spec the planner refuses.
pub const SPEC_REFUSED: &str = "SpecRefused";

/// `SpecRefused` True with the planner's reason, and which generation is
/// carried out meanwhile (`carried`; `None` when none is).
fn spec_refused(reason: &str, carried: Option<Option<i64>>, generation: Option<i64>) -> Condition {
    let message = match carried {
        Some(Some(g)) => format!("{reason} (still carrying out the spec of generation {g})"),
        Some(None) => format!("{reason} (still carrying out the last accepted spec)"),
        None => format!("{reason} (no accepted spec to carry out meanwhile)"),
    };
    cond(SPEC_REFUSED, true, "PlannerRefused", &message, generation)
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

fn parse_ms(rfc3339: &str) -> Option<u64> {
    let t: Timestamp = rfc3339.parse().ok()?;
    u64::try_from(t.as_millisecond()).ok()
}

fn rfc3339(ms: u64) -> String {
    i64::try_from(ms)
        .ok()
        .and_then(|ms| Timestamp::from_millisecond(ms).ok())
        .unwrap_or(Timestamp::UNIX_EPOCH)
        .to_string()
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

/// The token to send from a Secret's `key`: its first line (during a
/// rotation the key holds two, in kv_net::token's format); `None` when the
/// Secret, the key or a valid token is missing.
fn secret_token(secret: Option<&Secret>, key: &str) -> Option<String> {
    let raw = secret?.data.as_ref()?.get(key)?;
    let text = std::str::from_utf8(&raw.0).ok()?;
    kv_net::token::parse("token", text).ok()?.into_iter().next()
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

/// `PUT` the topology to each of `ordinals` at once. A node that refuses or
/// does not answer is logged and otherwise left alone: it reports its epoch,
/// and the planner neither commits nor removes pods while a node that
/// answers is behind.
async fn push_topology(
    links: &NodeReports,
    http: &reqwest::Client,
    kvc: &KvCluster,
    ordinals: &[u32],
    topology: &Topology,
    cluster_token: &str,
) {
    let body = match serde_json::to_vec(topology) {
        Ok(b) => b,
        Err(e) => {
            warn!(error = %e, "cannot serialise the topology to push");
            return;
        }
    };
    let pushes = ordinals.iter().map(|&ordinal| {
        let url = (links.topology_url)(kvc, ordinal);
        let request = http
            .put(url)
            .bearer_auth(cluster_token)
            .header("x-kv-epoch", topology.epoch)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.clone());
        async move { (ordinal, request.send().await) }
    });
    for (ordinal, result) in futures::future::join_all(pushes).await {
        match result.map(|r| r.status()) {
            Ok(status) if status.is_success() => {}
            Ok(status) => {
                warn!(kvcluster = %kvc.name_any(), ordinal, %status, epoch = topology.epoch, "node refused the topology")
            }
            Err(e) => {
                info!(kvcluster = %kvc.name_any(), ordinal, error = %e, epoch = topology.epoch, "topology push failed; the node is pushed to again while it reports an older epoch")
            }
        }
    }
}

/// Ask a node for its own view (`GET /v1/cluster`, a [`kv_core::NodeReport`]);
/// an unreachable node or a body that is not a report gives no report
/// (never a guess).
async fn fetch_report(
    http: &reqwest::Client,
    url: &str,
    token: &str,
) -> Option<kv_core::NodeReport> {
    let report: kv_core::NodeReport = http
        .get(url)
        .bearer_auth(token)
        .send()
        .await
        .ok()?
        .error_for_status()
        .ok()?
        .json()
        .await
        .ok()?;
    Some(report)
}

/// The newest valid topology of this cluster (one of `ids`) among those
/// the nodes hold.
pub fn adopt(held: Vec<Topology>, ids: &[&str]) -> Option<Topology> {
    held.into_iter()
        .filter(|t| ids.contains(&t.cluster_id.as_str()) && t.validate().is_ok())
        .max_by_key(|t| t.epoch)
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

async fn publish(
    ctx: &Context,
    kvc: &KvCluster,
    type_: EventType,
    reason: &str,
    action: &str,
    note: &str,
) {
    let event = Event {
        type_,
        reason: reason.to_string(),
        note: Some(note.chars().take(1000).collect()),
        action: action.to_string(),
        secondary: None,
    };
    // An Event that cannot be written is logged, never a reason to fail a reconcile.
    if let Err(e) = ctx.recorder.publish(&event, &kvc.object_ref(&())).await {
        warn!(kvcluster = %kvc.name_any(), error = %e, reason, "could not publish event");
    }
}

/// An Event when the hibernation state changes from what the last status
/// showed (a deferral's reason is shown once per reason).
async fn publish_hibernation(
    ctx: &Context,
    kvc: &KvCluster,
    now: Option<&Hibernation>,
    previous: &KvClusterStatus,
) {
    let Some(h) = now else { return };
    let shown = previous
        .conditions
        .iter()
        .find(|c| c.type_ == hibernation::CONDITION)
        .map(|c| c.reason.as_str());
    if shown == Some(h.reason()) {
        return;
    }
    let (type_, note) = match h {
        Hibernation::Hibernated => (
            EventType::Normal,
            "hibernating: the StatefulSet goes to 0 pods; volumes and topology are kept"
                .to_string(),
        ),
        Hibernation::Deferred(reason) => (EventType::Warning, reason.clone()),
        Hibernation::WakingUp => (
            EventType::Normal,
            "waking up: the pods start again on their volumes".to_string(),
        ),
        Hibernation::Awake => (
            EventType::Normal,
            "awake: every node runs again".to_string(),
        ),
    };
    publish(ctx, kvc, type_, h.reason(), "Hibernation", &note).await;
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
        Some(Hibernation::WakingUp) => Some("the cluster to finish waking up"),
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

/// While a rolling restart is under way and nothing else is progressing,
/// Progressing says so.
fn show_restart(
    status: &mut KvClusterStatus,
    step: &restart::Step,
    generation: Option<i64>,
    now: Timestamp,
) {
    let Some(r) = step.status.as_ref().filter(|_| step.in_progress()) else {
        return;
    };
    let idle = status
        .conditions
        .iter()
        .any(|c| c.type_ == "Progressing" && c.reason == "Reconciled");
    if !idle {
        return;
    }
    let doing = match (&r.restarting, &r.waiting_for) {
        (_, Some(w)) => format!("waiting for {w}"),
        (Some(n), None) => format!("restarting node {}", n.ordinal),
        (None, None) => "starting".to_string(),
    };
    let message = format!(
        "rolling restart {}: {} of {} nodes done; {doing}",
        r.requested_at,
        r.restarted.len(),
        status.nodes.len()
    );
    status.conditions = merge_conditions(
        &status.conditions,
        vec![cond(
            "Progressing",
            true,
            "Restarting",
            &message,
            generation,
        )],
        generation,
        now,
    );
}

async fn publish_transitions(ctx: &Context, kvc: &KvCluster, d: &Decision) {
    for t in &d.transitions {
        let pod = objects::pod_name(kvc, t.ordinal);
        let (type_, reason) = match (t.from, t.to) {
            (Some(_), NodeState::Failed) => (EventType::Warning, "NodeFailed"),
            (Some(NodeState::Failed), NodeState::Recovering) => {
                (EventType::Normal, "NodeRecovering")
            }
            (Some(NodeState::Recovering), NodeState::Up) => (EventType::Normal, "NodeRecovered"),
            _ => continue,
        };
        let note = format!("node {} ({pod}) is now {}", t.ordinal, t.to);
        publish(ctx, kvc, type_, reason, "UpdateTopology", &note).await;
    }
    match d.rebalance {
        Some(step @ (Rebalance::Started | Rebalance::Replaced)) => {
            let note = format!(
                "moving to placement {:?} (epoch {})",
                d.topology.pending.as_ref().map(|p| &p.members),
                d.topology.epoch
            );
            let reason = if step == Rebalance::Started {
                "RebalanceStarted"
            } else {
                "RebalanceRestarted"
            };
            publish(ctx, kvc, EventType::Normal, reason, "UpdateTopology", &note).await;
        }
        Some(Rebalance::Cancelled) => {
            let note = format!(
                "placement change cancelled: back to {:?} (epoch {})",
                d.topology.placement.members, d.topology.epoch
            );
            publish(
                ctx,
                kvc,
                EventType::Normal,
                "RebalanceCancelled",
                "UpdateTopology",
                &note,
            )
            .await;
        }
        Some(Rebalance::Committed) => {
            let note = format!(
                "placement {:?} committed (epoch {})",
                d.topology.placement.members, d.topology.epoch
            );
            publish(
                ctx,
                kvc,
                EventType::Normal,
                "RebalanceCommitted",
                "UpdateTopology",
                &note,
            )
            .await;
        }
        None => {}
    }
}

fn cond(
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
) -> Condition {
    Condition {
        type_: type_.to_string(),
        status: if status { "True" } else { "False" }.to_string(),
        observed_generation: generation,
        last_transition_time: None,
        reason: reason.to_string(),
        message: message.to_string(),
    }
}

/// The condition that shows the [`FORCE_FAULT_INJECTION`] annotation.
pub const FORCE_CONDITION: &str = "ForceFaultInjection";

/// The `ForceFaultInjection` condition, present only while the annotation
/// asks for something: True (reason `Annotated`) while it is `"true"` and the
/// planner carries out hold-downs that leave keys short of W live owners;
/// False (reason `InvalidAnnotation`) for a value other than `"true"` or
/// `"false"`, which is planned without force. `None` (the condition is
/// removed) when the annotation is absent or `"false"`.
pub fn force_condition(kvc: &KvCluster, generation: Option<i64>) -> Option<Condition> {
    match kvc.force_fault_injection() {
        Ok(false) => None,
        Ok(true) => Some(cond(
            FORCE_CONDITION,
            true,
            "Annotated",
            &format!(
                "{FORCE_FAULT_INJECTION} is \"true\": nodes in faultInjection.failedNodes are held down even when some keys are left with fewer live owners than writes need"
            ),
            generation,
        )),
        Err(value) => Some(cond(
            FORCE_CONDITION,
            false,
            "InvalidAnnotation",
            &format!(
                "{FORCE_FAULT_INJECTION} is {value:?}; only \"true\" or \"false\" are understood, so the cluster is planned without force"
            ),
            generation,
        )),
    }
}

/// `merge_conditions` with `new` plus the annotation's condition, which is
/// dropped from the status when the annotation no longer asks for anything.
fn conditions_of(
    kvc: &KvCluster,
    previous: &[Condition],
    mut new: Vec<Condition>,
    generation: Option<i64>,
    now: Timestamp,
) -> Vec<Condition> {
    let force = force_condition(kvc, generation);
    let drop_force = force.is_none();
    new.extend(force);
    let mut merged = merge_conditions(previous, new, generation, now);
    if drop_force {
        merged.retain(|c| c.type_ != FORCE_CONDITION);
    }
    merged
}

/// Replace conditions by type, keeping `lastTransitionTime` when the status did not change.
fn merge_conditions(
    previous: &[Condition],
    new: Vec<Condition>,
    generation: Option<i64>,
    now: Timestamp,
) -> Vec<Condition> {
    let mut out: Vec<Condition> = previous
        .iter()
        .filter(|p| !new.iter().any(|n| n.type_ == p.type_))
        .cloned()
        .collect();
    for mut c in new {
        let old = previous.iter().find(|p| p.type_ == c.type_);
        c.last_transition_time = match old {
            Some(o) if o.status == c.status => o.last_transition_time.clone(),
            _ => Some(now.to_string()),
        };
        c.observed_generation = generation;
        out.push(c);
    }
    out.sort_by(|a, b| a.type_.cmp(&b.type_));
    out
}

fn status_of(
    kvc: &KvCluster,
    d: &Decision,
    ready: &BTreeMap<u32, bool>,
    sts: Option<&StatefulSet>,
    previous: &KvClusterStatus,
    problems: Vec<String>,
    now: Timestamp,
) -> KvClusterStatus {
    let generation = kvc.meta().generation;
    let t = &d.topology;
    let is_ready = |o: u32| ready.get(&o).copied().unwrap_or(false);
    let ready_replicas = t.nodes.iter().filter(|n| is_ready(n.ordinal)).count();

    // A new cluster stays Creating until every node meant to run is Ready
    // once; after that, readiness no longer decides the phase.
    let expected_ready = t
        .nodes
        .iter()
        .filter(|n| n.state != NodeState::Failed)
        .count();
    let was_creating = matches!(previous.phase, None | Some(Phase::Creating));
    let phase = if was_creating
        && !matches!(d.phase, Phase::Rebalancing | Phase::Hibernated)
        && ready_replicas < expected_ready
    {
        Phase::Creating
    } else {
        d.phase
    };

    // Available: every key keeps W live owners, i.e. at most factor − W members are down.
    let members = &t.placement.members;
    let factor = t.placement.effective_factor();
    let slack = factor.saturating_sub(t.write_consistency.required(factor));
    let down = members
        .iter()
        .filter(|&&o| !(t.state_of(o).is_some_and(|s| s.counts_in_quorum()) && is_ready(o)))
        .count();
    let available = if d.phase == Phase::Hibernated {
        cond(
            "Available",
            false,
            "Hibernated",
            "every pod is stopped (spec.hibernation)",
            generation,
        )
    } else if members.is_empty() || down > slack {
        cond(
            "Available",
            false,
            "QuorumLost",
            &format!(
                "{down} of {} nodes not Up and Ready; writes at {} tolerate {slack}",
                members.len(),
                t.write_consistency
            ),
            generation,
        )
    } else {
        cond(
            "Available",
            true,
            "QuorumAvailable",
            &format!("{ready_replicas} of {} nodes Ready", t.nodes.len()),
            generation,
        )
    };

    let catching_up: Vec<u32> = t
        .nodes
        .iter()
        .filter(|n| matches!(n.state, NodeState::Joining | NodeState::Recovering))
        .map(|n| n.ordinal)
        .collect();
    let rollout_incomplete = sts.and_then(|s| s.status.as_ref()).is_some_and(|s| {
        s.updated_replicas.unwrap_or(0) < s.replicas
            || s.current_revision.is_some() && s.current_revision != s.update_revision
    });
    let progressing = if let Some(p) = &problems.first() {
        cond("Progressing", false, "AuthSecretMissing", p, generation)
    } else if d.phase == Phase::Hibernated {
        cond(
            "Progressing",
            false,
            "Hibernated",
            "nothing runs until spec.hibernation is false",
            generation,
        )
    } else if t.pending.is_some() {
        cond(
            "Progressing",
            true,
            "Rebalancing",
            "new owners are streaming their buckets in",
            generation,
        )
    } else if phase == Phase::Creating {
        cond(
            "Progressing",
            true,
            "Creating",
            "the nodes are starting",
            generation,
        )
    } else if !catching_up.is_empty() {
        cond(
            "Progressing",
            true,
            "CatchingUp",
            &format!("nodes {catching_up:?} are catching up"),
            generation,
        )
    } else if rollout_incomplete {
        let prev = previous
            .conditions
            .iter()
            .find(|c| c.type_ == "Progressing");
        let since = prev
            .filter(|c| {
                c.status == "True"
                    && c.reason == "RollingOut"
                    && c.observed_generation == generation
            })
            .and_then(|c| c.last_transition_time.as_ref())
            .and_then(|s| s.parse::<Timestamp>().ok());
        match since {
            Some(s) if now.as_second() - s.as_second() > ROLLOUT_DEADLINE_SECONDS => cond(
                "Progressing",
                false,
                "RolloutStuck",
                "the StatefulSet rollout has not completed; edit the spec to fix it",
                generation,
            ),
            _ => cond(
                "Progressing",
                true,
                "RollingOut",
                "the StatefulSet is rolling out",
                generation,
            ),
        }
    } else {
        cond(
            "Progressing",
            false,
            "Reconciled",
            "nothing is changing",
            generation,
        )
    };

    let not_up: Vec<String> = t
        .nodes
        .iter()
        .filter(|n| n.state != NodeState::Up)
        .map(|n| format!("{}={}", n.ordinal, n.state))
        .collect();
    let degraded = if !not_up.is_empty() {
        cond(
            "Degraded",
            true,
            "NodesNotUp",
            &format!("nodes not Up: {}", not_up.join(", ")),
            generation,
        )
    } else if objects::max_unavailable(kvc).is_none() {
        cond(
            "Degraded",
            true,
            "NoDisruptionBudget",
            "factor − W is 0: no PodDisruptionBudget protects the nodes, so a drain can make keys unwritable",
            generation,
        )
    } else {
        cond(
            "Degraded",
            false,
            "AllNodesUp",
            "every node is Up",
            generation,
        )
    };

    KvClusterStatus {
        phase: Some(phase),
        observed_generation: generation,
        ready_replicas: u32::try_from(ready_replicas).unwrap_or(u32::MAX),
        topology_epoch: t.epoch,
        // Every node's pod name, also of a node whose pod does not exist now.
        nodes: d.nodes.clone(),
        accepted_spec: previous.accepted_spec.clone(),
        last_restart: previous.last_restart.clone(),
        conditions: conditions_of(
            kvc,
            &previous.conditions,
            vec![available, progressing, degraded],
            generation,
            now,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            t0,
        );
        assert_eq!(progressing(&start).reason, "RollingOut");
        let soon = status_of(&kvc, &d, &ready, Some(&sts), &start, vec![], t0);
        assert_eq!(progressing(&soon).reason, "RollingOut");
        let stuck = status_of(&kvc, &d, &ready, Some(&sts), &start, vec![], late);
        assert_eq!(progressing(&stuck).status, "False");
        assert_eq!(progressing(&stuck).reason, "RolloutStuck");

        // Editing the spec (a new generation) starts a new rollout clock.
        let (kvc3, d3, sts3) = rolling_out(3, 1);
        let edited = status_of(&kvc3, &d3, &ready, Some(&sts3), &stuck, vec![], late);
        assert_eq!(progressing(&edited).reason, "RollingOut");
        assert_eq!(progressing(&edited).observed_generation, Some(3));

        // A finished rollout is simply reconciled.
        let (kvc, d, done) = rolling_out(3, 3);
        let fine = status_of(&kvc, &d, &ready, Some(&done), &edited, vec![], late);
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
