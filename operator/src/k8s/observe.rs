//! What one reconcile reads, in this order: the topology ConfigMap, the
//! StatefulSet, the node pods, the token Secrets, with `spec.tls` the CA and
//! certificate Secrets ([`tls`](super::tls)), and (in a real cluster) each
//! live node's `/v1/cluster` (over https with `spec.tls`); and how that
//! becomes the planner's [`Observed`].
//!
//! Failure detection: a node is unreachable when it neither runs nor reports;
//! `status.nodes[].unreachableSince` keeps since when (across reconciles and
//! operator restarts), and the planner makes it Failed once that is
//! `spec.failureDetectionSeconds` ago.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, ListParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use kv_control::Observation;
use kv_control::planner::{NodeObservation, NodeProgress, Observed};
use kv_core::{NodeState, Topology};
use tracing::warn;

use super::controller::{Error, get_opt};
use super::crd::{KvCluster, KvClusterStatus, Phase, TlsMode};
use super::events::{publish, warn_invalid_annotation};
use super::nodes::{adopt, fetch_report, node_client};
use super::round::Round;
use super::status::parse_ms;
use super::{apply, hibernation, objects, tls};

/// What was read of the cluster, kept for the rest of the reconcile.
pub(super) struct Seen {
    pub cm_name: String,
    /// Ordinals whose pods may be waiting fenced on the held list they read
    /// at start (see the release in [`apply::converge`]).
    pub was_held: BTreeSet<u32>,
    /// The ConfigMap's version read, for a conditional write: a topology is
    /// written only over the ConfigMap it was planned from.
    pub stored_version: Option<Option<String>>,
    pub sts: Option<StatefulSet>,
    /// The label selector of the cluster's pods and claims.
    pub selector: String,
    pub pods: Vec<Pod>,
    pub secret: Option<Secret>,
    pub cluster_secret: Option<Secret>,
    pub ca_secret: Option<Secret>,
    pub tls_secret: Option<Secret>,
    /// The client the nodes are asked with (their CA with `spec.tls`).
    pub node_http: Option<reqwest::Client>,
    /// Whether each pod is Ready.
    pub ready: BTreeMap<u32, bool>,
    /// Nodes whose store is new or rebuilt (a wiped or replaced volume):
    /// they serve nothing until they have pulled their buckets.
    pub catching_up: BTreeSet<u32>,
    pub tokens_held: BTreeMap<u32, kv_core::report::TokenFingerprints>,
    /// Since when each node that neither runs nor reports has been
    /// unreachable (ms since the Unix epoch).
    pub unreachable: BTreeMap<u32, u64>,
    /// Waking up from hibernation, and the nodes not back yet.
    pub waking: bool,
    pub not_back: BTreeSet<u32>,
    /// Nodes whose pods run: those a topology is pushed to.
    pub running: Vec<u32>,
}

/// Read the cluster. `None` (nothing to plan) for a KvCluster being deleted
/// or whose spec is invalid; the latter is shown in its status.
pub(super) async fn observe(r: &mut Round<'_>) -> Result<Option<Observation>, Error> {
    let kvc = r.kvc;
    let ctx = r.ctx;
    let name = kvc.name_any();
    if kvc.meta().deletion_timestamp.is_some() {
        // Owner references let Kubernetes delete what the cluster owns.
        ctx.metrics.forget_cluster(&r.key);
        r.requeue = Action::await_change();
        return Ok(None);
    }
    if let Err(reason) = kvc.spec.validate() {
        warn!(kvcluster = %name, %reason, "invalid spec");
        apply::refuse(
            ctx,
            kvc,
            &r.kvcs,
            &r.previous,
            "InvalidSpec",
            &reason,
            vec![],
            r.now,
        )
        .await?;
        ctx.metrics
            .observe_cluster(&r.key, Phase::Failed, vec![], 0);
        r.requeue = Action::await_change();
        return Ok(None);
    }

    warn_invalid_annotation(ctx, kvc, &r.previous).await;

    let cm_name = objects::topology_configmap_name(kvc);
    let stored = get_opt(&r.cms, &cm_name).await?;
    let was_held: BTreeSet<u32> = stored
        .as_ref()
        .and_then(|cm| cm.data.as_ref()?.get(objects::HELD_KEY))
        .map(|list| kv_core::topology::parse_held(list).0)
        .unwrap_or_default();
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
    let sts = get_opt(&r.stss, &objects::statefulset_name(kvc)).await?;
    let selector = objects::selector_labels(kvc)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let pod_list = r
        .pods
        .list(&ListParams::default().labels(&selector))
        .await?;
    let secret_name = objects::auth_secret_name(kvc);
    let secret = get_opt(&r.secrets, &secret_name).await?;
    let cluster_secret_name = objects::cluster_auth_secret_name(kvc);
    let cluster_secret = if cluster_secret_name == secret_name {
        secret.clone()
    } else {
        get_opt(&r.secrets, &cluster_secret_name).await?
    };
    let (ca_secret, tls_secret) = tls_secrets(&r.secrets, kvc).await?;
    let node_http = ctx
        .node_reports
        .as_ref()
        .and_then(|n| node_client(n, kvc, ca_secret.as_ref(), tls_secret.as_ref()));

    // The KvCluster's UID names the cluster: a KvCluster deleted and made
    // again under the same name is another cluster, and nodes on volumes it
    // retained do not serve the old data as the new cluster's (a node
    // refuses a topology of another cluster id). Clusters made before the
    // UID was used keep the `namespace/name` their topology carries.
    let legacy_id = r.key.clone();
    let mut observed = Observed {
        cluster_id: kvc.uid().unwrap_or_else(|| r.key.clone()),
        topology,
        epoch_floor: r.previous.topology_epoch,
        now_ms: u64::try_from(r.now.as_millisecond()).unwrap_or(0),
        ..Observed::default()
    };
    let sts_created = sts
        .as_ref()
        .and_then(|s| s.metadata.creation_timestamp.as_ref())
        .and_then(|t| u64::try_from(t.0.as_millisecond()).ok());
    let mut ready = BTreeMap::new();
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
    let mut unreachable = track_unreachable(&mut observed, &r.previous);
    // Waking up from hibernation: nodes whose pods are not back yet were
    // stopped on request, not lost (see `hibernation`).
    let waking = hibernation::waking(kvc, &r.previous, r.now);
    let not_back = hibernation::not_back(&observed, &ready, reporting);
    if waking {
        hibernation::spare_waking_nodes(&mut observed, &mut unreachable);
    }
    observed.epoch_floor = observed
        .nodes
        .values()
        .filter_map(|o| o.report.as_ref().map(|r| r.epoch))
        .fold(observed.epoch_floor, u64::max);
    let running = observed
        .nodes
        .iter()
        .filter(|(_, o)| o.running)
        .map(|(&o, _)| o)
        .collect();
    r.seen = Some(Seen {
        cm_name,
        was_held,
        stored_version,
        sts,
        selector,
        pods: pod_list.items,
        secret,
        cluster_secret,
        ca_secret,
        tls_secret,
        node_http,
        ready,
        catching_up,
        tokens_held,
        unreachable,
        waking,
        not_back,
        running,
    });
    Ok(Some(Observation {
        desired: kvc.desired(),
        observed,
        config: kvc.planner_config(),
    }))
}

/// Since when each node that neither runs nor reports has been unreachable
/// (ms since the Unix epoch), and the same time in `observed` for the
/// planner. Counted from the status when it already shows the node
/// unreachable; from now when the last status showed it reachable (the
/// controller reconciles on every pod change, so that is when it changed);
/// otherwise (a node the status does not list: a new cluster, a new status)
/// from the pod's own times or the StatefulSet's creation, as observed.
pub(super) fn track_unreachable(
    observed: &mut Observed,
    previous: &KvClusterStatus,
) -> BTreeMap<u32, u64> {
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

pub(super) fn pod_ready(pod: &Pod) -> bool {
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
pub(super) fn secret_fingerprints(secret: Option<&Secret>, key: &str) -> Option<Vec<String>> {
    secret_tokens(secret, key).map(|t| kv_net::token::fingerprints(&t))
}
