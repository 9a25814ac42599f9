//! Talking to the nodes: their reports (`/v1/cluster`) and the topology
//! pushed to their peer port, over https under `spec.tls`.

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kv_core::Topology;
use tracing::{info, warn};

use super::crd::KvCluster;
use super::objects;
use super::tls;

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

pub(super) fn scheme(kvc: &KvCluster) -> &'static str {
    if tls::enabled(kvc) { "https" } else { "http" }
}

/// The client for this cluster's nodes: [`NodeReports::http`] without TLS;
/// with TLS one trusting the cluster CA and presenting the nodes'
/// certificate, or none while those Secrets are not there (not made yet:
/// no node runs without them).
pub(super) fn node_client(
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

/// `PUT` the topology to each of `ordinals` at once. A node that refuses or
/// does not answer is logged and otherwise left alone: it reports its epoch,
/// and the planner neither commits nor removes pods while a node that
/// answers is behind.
pub(super) async fn push_topology(
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
pub(super) async fn fetch_report(
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
