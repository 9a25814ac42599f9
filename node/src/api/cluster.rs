//! Cluster and operations routes: `/healthz`, `/readyz`, `/metrics`,
//! `GET /v1/cluster` (the node's report), `/v1/placement/{key}` and
//! `/v1/digests`.

use kv_core::{NodeState, bucket_of};
use serde_json::{Value, json};
use warp::http::{HeaderValue, header};

use super::{Response, json_response, key_json};
use crate::node::{ApiError, Node};

pub(super) fn healthz() -> Result<Response, ApiError> {
    Ok(json_response(200, &json!({"status": "ok"})))
}

pub(super) fn readyz(node: &Node) -> Result<Response, ApiError> {
    let state = node.cluster.my_state();
    if node.cluster.confirmed() && state == Some(NodeState::Up) && !node.store.catching_up() {
        Ok(json_response(
            200,
            &json!({"status": "ready", "state": "Up"}),
        ))
    } else {
        let reason = match state {
            _ if !node.cluster.confirmed() => "topology not yet confirmed since start".to_string(),
            Some(NodeState::Up) if node.store.catching_up() => {
                "the store is new or rebuilt and still catching up".to_string()
            }
            Some(s) => format!("node is {s}"),
            None => "node is not in the topology".to_string(),
        };
        Err(ApiError::new(
            503,
            "unavailable",
            format!("not ready: {reason}"),
        ))
    }
}

pub(super) fn metrics(node: &Node) -> Result<Response, ApiError> {
    let mut resp = Response::new(node.metrics.render().into());
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    Ok(resp)
}

pub(super) fn cluster(node: &Node) -> Result<Response, ApiError> {
    serde_json::to_value(cluster_report(node))
        .map(|v| json_response(200, &v))
        .map_err(|e| ApiError::new(500, "internal", e.to_string()))
}

pub(super) fn placement(node: &Node, key: &[u8]) -> Result<Response, ApiError> {
    let view = node.cluster.view();
    let b = bucket_of(key);
    let describe = |owners: &[u32]| -> Vec<Value> {
        owners
            .iter()
            .map(|o| match view.topology.node(*o) {
                Some(n) => json!({"ordinal": o, "address": n.address, "state": n.state}),
                None => json!({"ordinal": o}),
            })
            .collect()
    };
    Ok(json_response(
        200,
        &json!({
            "key": key_json(key),
            "bucket": b,
            "owners": describe(view.layout.current.owners(b)),
            "pendingOwners": view.layout.pending.as_ref().map(|p| describe(p.owners(b))),
        }),
    ))
}

pub(super) async fn digests(node: &Node) -> Result<Response, ApiError> {
    let store = node.store.clone();
    let digests = tokio::task::spawn_blocking(move || store.bucket_digests())
        .await
        .map_err(|e| ApiError::new(500, "internal", e.to_string()))?
        .map_err(ApiError::storage)?;
    let buckets: serde_json::Map<String, Value> = digests
        .iter()
        .enumerate()
        .filter(|(_, d)| d.count != 0 || d.sum != 0)
        .map(|(b, d)| {
            (
                b.to_string(),
                json!({"digest": format!("{:032x}", d.sum), "count": d.count}),
            )
        })
        .collect();
    Ok(json_response(
        200,
        &json!({"nodeId": node.me(), "epoch": node.cluster.epoch(), "buckets": buckets}),
    ))
}

/// What `GET /v1/cluster` answers (and the control plane and `kvctl nodes` read).
pub fn cluster_report(node: &Node) -> kv_core::NodeReport {
    let view = node.cluster.view();
    let resync = node.cluster.resync();
    let hints: u64 = node
        .store
        .pending_hints()
        .map(|h| h.values().sum())
        .unwrap_or(0);
    kv_core::NodeReport {
        node_id: node.me(),
        state: view.state_of(node.me()),
        confirmed: node.cluster.confirmed(),
        topology: view.topology.clone(),
        synced_epoch: node.cluster.synced_epoch(),
        resync_progress: resync_progress(node, &resync),
        store_catching_up: node.store.catching_up(),
        clock_skew_ms: node.skew.skew_ms(),
        resync,
        hints_pending: hints,
        uptime_seconds: node.started.elapsed().as_secs(),
        tokens: kv_core::report::TokenFingerprints {
            client: node.config.token.fingerprints(),
            cluster: node.config.cluster_token.fingerprints(),
        },
        on_gateway_port: node.gateway_port.listening(),
    }
}

/// 1 once synced at the current epoch; the pull's progress while it runs;
/// 0 before the pull for the current epoch has started.
fn resync_progress(node: &Node, resync: &crate::cluster::Resync) -> f64 {
    let epoch = node.cluster.epoch();
    if node.cluster.synced_epoch() >= epoch {
        1.0
    } else if resync.epoch == epoch {
        resync.progress().min(0.999)
    } else {
        0.0
    }
}
