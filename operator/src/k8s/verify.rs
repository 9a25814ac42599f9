//! Verification on request: the annotation `kvstore.dev/verifyRequestedAt`
//! (any new value; `kvctl verify --cluster` writes the time) makes the
//! operator compare every bucket's digests across its owners, as `kvctl
//! verify` does against an endpoint, and write what it found to
//! `status.lastVerify`. The operator is what reaches every node through the
//! Kubernetes API: kvctl outside the cluster reaches none of them.

use std::collections::BTreeMap;

use kv_core::verify::{DigestsResponse, NodeDigests, compare};
use kv_core::{NodeState, Topology};

use super::crd::KvCluster;
use super::nodes::NodeReports;

pub use kv_crd::verify::*;

/// Divergent buckets shown in the status (all are counted).
const SHOWN: usize = 5;

/// The value of the annotation when it asks for a verification the status
/// has not answered yet.
pub fn requested(kvc: &KvCluster, previous: Option<&VerifyStatus>) -> Option<String> {
    let at = kvc
        .metadata
        .annotations
        .as_ref()?
        .get(VERIFY_REQUESTED_AT)?;
    (previous.is_none_or(|p| &p.requested_at != at)).then(|| at.clone())
}

/// A node's digests URL: the sibling of its report URL (`.../v1/cluster`).
pub fn digests_url(report_url: &str) -> String {
    match report_url.strip_suffix("/v1/cluster") {
        Some(base) => format!("{base}/v1/digests"),
        None => format!("{}/v1/digests", report_url.trim_end_matches('/')),
    }
}

/// Asks every node of `topology` that is not Failed for its digests and
/// compares them.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    reports: &NodeReports,
    http: &reqwest::Client,
    kvc: &KvCluster,
    topology: &Topology,
    token: &str,
    requested_at: String,
    now: String,
) -> VerifyStatus {
    let mut not_checked: Vec<(u32, String)> = topology
        .nodes
        .iter()
        .filter(|n| n.state == NodeState::Failed)
        .map(|n| (n.ordinal, "Failed".to_string()))
        .collect();
    let asks = topology
        .nodes
        .iter()
        .filter(|n| n.state != NodeState::Failed)
        .map(|n| {
            let url = digests_url(&(reports.url)(kvc, n.ordinal));
            async move { (n.ordinal, digests(http, &url, token, n.ordinal).await) }
        });
    let mut held: BTreeMap<u32, NodeDigests> = BTreeMap::new();
    for (ordinal, answer) in futures::future::join_all(asks).await {
        match answer {
            Ok(d) => {
                held.insert(ordinal, d);
            }
            Err(why) => not_checked.push((ordinal, why)),
        }
    }
    not_checked.sort();
    let report = compare(topology, &held);
    VerifyStatus {
        requested_at,
        finished_at: now,
        epoch: topology.epoch,
        buckets_compared: report.buckets_compared,
        divergent_buckets: u32::try_from(report.divergent.len()).unwrap_or(u32::MAX),
        divergent: report
            .divergent
            .iter()
            .take(SHOWN)
            .map(|d| {
                let owners: Vec<String> = d
                    .owners
                    .iter()
                    .map(|(o, g)| format!("node {o} holds {} records ({:032x})", g.count, g.sum))
                    .collect();
                format!("bucket {}: {}", d.bucket, owners.join(", "))
            })
            .collect(),
        // a Failed node is left out, as by kvctl verify; one that did not
        // answer leaves its buckets unverified
        consistent: report.consistent() && not_checked.iter().all(|(_, why)| why == "Failed"),
        not_checked: not_checked
            .into_iter()
            .map(|(o, why)| format!("node {o}: {why}"))
            .collect(),
    }
}

/// One node's digests, checked to come from that node.
async fn digests(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    ordinal: u32,
) -> Result<NodeDigests, String> {
    let answer = http
        .get(url)
        .bearer_auth(token)
        .send()
        .await
        .map_err(|e| format!("no answer ({e})"))?;
    if !answer.status().is_success() {
        return Err(format!("answered {}", answer.status()));
    }
    let d: DigestsResponse = answer
        .json()
        .await
        .map_err(|e| format!("not a digests answer ({e})"))?;
    if d.node_id != ordinal {
        return Err(format!("answered as node {}", d.node_id));
    }
    d.parse().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_annotation_value_asks_and_an_answered_one_does_not() {
        let mut kvc = KvCluster::new("demo", serde_yaml::from_str("{}").expect("spec"));
        assert_eq!(requested(&kvc, None), None);
        kvc.metadata.annotations = Some(
            [(VERIFY_REQUESTED_AT.to_string(), "t1".to_string())]
                .into_iter()
                .collect(),
        );
        assert_eq!(requested(&kvc, None).as_deref(), Some("t1"));
        let answered = VerifyStatus {
            requested_at: "t1".into(),
            ..VerifyStatus::default()
        };
        assert_eq!(requested(&kvc, Some(&answered)), None);
        let older = VerifyStatus {
            requested_at: "t0".into(),
            ..VerifyStatus::default()
        };
        assert_eq!(requested(&kvc, Some(&older)).as_deref(), Some("t1"));
    }

    #[test]
    fn the_digests_url_is_the_report_urls_sibling() {
        assert_eq!(
            digests_url("https://demo-0.demo-peers.ns.svc:7400/v1/cluster"),
            "https://demo-0.demo-peers.ns.svc:7400/v1/digests"
        );
        assert_eq!(
            digests_url("http://127.0.0.1:9/2/v1/cluster"),
            "http://127.0.0.1:9/2/v1/digests"
        );
    }
}
