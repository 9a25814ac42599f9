//! The node-to-node HTTP API (peer port, `/internal/v1/`).
//!
//! Every route needs the cluster token, takes and answers `X-Kv-Epoch`, and
//! is idempotent: a batch applied twice changes nothing the second time
//! (last-writer-wins). Bodies are binary batches (`kv_core::wire`).

use std::sync::Arc;

use bytes::Bytes;
use kv_core::wire;
use kv_core::{Record, Topology};
use serde_json::json;
use warp::Filter;
use warp::http::{HeaderMap, HeaderValue, Method, header};

use crate::api::{
    Incoming, Response, authorized, error_response, parse_query, percent_decode, request_filter,
};
use crate::cluster::Source;
use crate::node::{ApiError, Node};
use crate::peer::{CLOCK_HEADER, EPOCH_HEADER, NODE_HEADER};

/// Largest batch body a peer accepts.
pub fn batch_limit(max_value: usize) -> usize {
    max_value.saturating_mul(4).max(16 * 1024 * 1024)
}

pub fn routes(
    node: Arc<Node>,
) -> impl Filter<Extract = (Response,), Error = std::convert::Infallible> + Clone {
    let limit = batch_limit(node.config.max_value_bytes);
    let token = node.config.cluster_token.clone();
    request_filter(
        // No body is read for a caller without the cluster token.
        move |req: &Incoming| {
            if authorized(&req.headers, &token) {
                limit
            } else {
                0
            }
        },
        move |req, body: Result<Bytes, kv_net::http::BodyError>| {
            let node = node.clone();
            async move {
                let mut resp = serve(&node, req, body.map_err(ApiError::from)).await;
                if let Ok(v) = HeaderValue::from_str(&node.cluster.epoch().to_string()) {
                    resp.headers_mut().insert(EPOCH_HEADER, v);
                }
                if let Ok(v) = HeaderValue::from_str(&node.hlc.wall_ms().to_string()) {
                    resp.headers_mut().insert(CLOCK_HEADER, v);
                }
                resp
            }
        },
    )
}

async fn serve(node: &Arc<Node>, req: Incoming, body: Result<Bytes, ApiError>) -> Response {
    if !authorized(&req.headers, &node.config.cluster_token) {
        return error_response(
            &ApiError::new(403, "forbidden", "missing or wrong cluster token".into()),
            false,
        );
    }
    note_epoch(node, &req.headers);
    let sender_epoch = req
        .headers
        .get(EPOCH_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let result = match body {
        Ok(body) => handle(node, sender_epoch, &req.method, &req.path, &req.query, body).await,
        Err(e) => Err(e),
    };
    result.unwrap_or_else(|e| error_response(&e, false))
}

/// A caller with a higher epoch than ours: fetch its topology.
fn note_epoch(node: &Arc<Node>, headers: &HeaderMap) {
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
    };
    let (Some(epoch), Some(from)) = (get(EPOCH_HEADER), get(NODE_HEADER)) else {
        return;
    };
    let mine = node.cluster.epoch();
    if epoch == mine {
        node.cluster.confirm();
    } else if epoch > mine
        && let Ok(from) = u32::try_from(from)
    {
        let node = node.clone();
        tokio::spawn(async move { node.fetch_topology_from(from).await });
    }
}

fn binary(body: Vec<u8>) -> Response {
    let mut resp = Response::new(body.into());
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    resp
}

fn decode_err(e: wire::WireError) -> ApiError {
    ApiError::bad_request(format!("bad batch: {e}"))
}

/// A store that is new or rebuilt does not answer replica reads: a missing
/// key there means "not caught up yet", not "absent" (SPEC §3). The
/// coordinator asks another owner.
fn refuse_while_catching_up(node: &Node) -> Result<(), ApiError> {
    if node.store.catching_up() {
        return Err(ApiError::new(
            503,
            "catching_up",
            format!(
                "node {}'s store is new or rebuilt and still catching up; it serves no reads yet",
                node.me()
            ),
        ));
    }
    Ok(())
}

/// Most keys of a peer read batch served on the async worker itself.
const INLINE_READS: usize = 16;

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, crate::storage::StorageError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::new(500, "internal", e.to_string()))?
        .map_err(ApiError::storage)
}

/// A replica write from a coordinator on an older topology than ours is
/// applied but answered 409 `stale_epoch`, which the coordinator does not
/// count: it may be writing to the old placement only, and a new owner may
/// already have pulled this node's records for the new one (we serve pulls
/// only once we hold the puller's topology, [`refuse_pull_while_behind`]).
/// Checked after the write, so that either the pull sees the write or the
/// coordinator hears "stale". Requests without an epoch (tools) are not fenced.
fn fence_stale_writer(node: &Node, sender_epoch: Option<u64>) -> Result<(), ApiError> {
    let mine = node.cluster.epoch();
    match sender_epoch {
        Some(theirs) if theirs < mine => Err(ApiError::new(
            409,
            STALE_EPOCH,
            format!(
                "node {} holds topology epoch {mine}, newer than the writer's {theirs}: the write was stored but does not count; retry on the new topology",
                node.me()
            ),
        )),
        _ => Ok(()),
    }
}

/// The error code of [`fence_stale_writer`]'s refusal.
pub const STALE_EPOCH: &str = "stale_epoch";

/// The error code of [`refuse_pull_while_behind`]'s refusal.
pub const BEHIND: &str = "behind";

/// A node pulling buckets for a topology we do not hold yet is answered 409
/// until we do (we are fetching it: `note_epoch`); from then on we refuse
/// to count writes from coordinators still on the older one.
fn refuse_pull_while_behind(node: &Node, sender_epoch: Option<u64>) -> Result<(), ApiError> {
    let mine = node.cluster.epoch();
    match sender_epoch {
        Some(theirs) if theirs > mine => Err(ApiError::new(
            409,
            BEHIND,
            format!(
                "node {} holds topology epoch {mine}, older than the caller's {theirs}; it is fetching the new one, retry",
                node.me()
            ),
        )),
        _ => Ok(()),
    }
}

async fn handle(
    node: &Arc<Node>,
    sender_epoch: Option<u64>,
    method: &Method,
    path: &str,
    query: &str,
    body: Bytes,
) -> Result<Response, ApiError> {
    let route = path
        .strip_prefix("/internal/v1/")
        .ok_or_else(|| ApiError::new(404, "not_found", format!("no route {path}")))?;
    match (method.clone(), route) {
        (Method::POST, "apply") => {
            let records = wire::decode_records(&body).map_err(decode_err)?;
            for r in &records {
                if r.value
                    .as_ref()
                    .is_some_and(|v| v.len() > node.config.max_value_bytes)
                {
                    return Err(ApiError::new(
                        413,
                        "payload_too_large",
                        "a value in the batch is over this node's limit".into(),
                    ));
                }
            }
            if let Some(max) = records.iter().map(|r| r.version).max() {
                node.hlc.observe(max);
            }
            let outcomes = node.store.apply(records).await.map_err(ApiError::storage)?;
            for o in &outcomes {
                if let kv_core::Applied::Newer(v) = o {
                    node.hlc.observe(*v);
                }
            }
            fence_stale_writer(node, sender_epoch)?;
            Ok(binary(wire::encode_apply_answer(&wire::ApplyAnswer {
                catching_up: node.store.catching_up(),
                outcomes,
            })))
        }
        (Method::POST, "create") => {
            let q = parse_query(query)?;
            let level = q
                .get("consistency")
                .and_then(|v| {
                    std::str::from_utf8(v)
                        .ok()?
                        .parse::<kv_core::Consistency>()
                        .ok()
                })
                .ok_or_else(|| {
                    ApiError::bad_request("consistency must be one of: one, quorum, all")
                })?;
            let mut records = wire::decode_records(&body).map_err(decode_err)?;
            let record = match (records.pop(), records.is_empty()) {
                (Some(r), true) => r,
                _ => return Err(ApiError::bad_request("a create carries exactly one record")),
            };
            kv_core::record::validate_key(&record.key)
                .map_err(|e| ApiError::bad_request(e.to_string()))?;
            let Some(value) = record.value else {
                return Err(ApiError::bad_request("a create carries a value"));
            };
            if value.len() > node.config.max_value_bytes {
                return Err(ApiError::new(
                    413,
                    "payload_too_large",
                    "the value is over this node's limit".into(),
                ));
            }
            let stored = node
                .coordinator()
                .create_as_leader(record.key, value, level)
                .await?;
            Ok(binary(wire::encode_records([&stored])))
        }
        (Method::POST, r @ ("promise" | "accept")) => {
            let mut records = wire::decode_records(&body).map_err(decode_err)?;
            let record = match (records.pop(), records.is_empty()) {
                (Some(r), true) => r,
                _ => {
                    return Err(ApiError::bad_request(
                        "a create step carries exactly one record",
                    ));
                }
            };
            kv_core::record::validate_key(&record.key)
                .map_err(|e| ApiError::bad_request(e.to_string()))?;
            node.hlc.observe(record.version);
            let vote = if r == "promise" {
                node.store.promise(record.key, record.version).await
            } else {
                match &record.value {
                    None => return Err(ApiError::bad_request("an accept carries a value")),
                    Some(v) if v.len() > node.config.max_value_bytes => {
                        return Err(ApiError::new(
                            413,
                            "payload_too_large",
                            "the value is over this node's limit".into(),
                        ));
                    }
                    Some(_) => {}
                }
                node.store.accept(record).await
            }
            .map_err(ApiError::storage)?;
            fence_stale_writer(node, sender_epoch)?;
            if let Some(v) = vote.seen() {
                node.hlc.observe(v);
            }
            Ok(binary(wire::encode_create_answer(&wire::CreateAnswer {
                catching_up: node.store.catching_up(),
                vote,
            })))
        }
        (Method::GET, "clock") => Ok(binary(Vec::new())),
        (Method::POST, "read") => {
            refuse_while_catching_up(node)?;
            let keys = wire::decode_keys(&body).map_err(decode_err)?;
            let key_count = keys.len();
            let store = node.store.clone();
            let read_all = move || {
                let mut out = Vec::new();
                for k in keys {
                    if let Some(r) = store.get(&k)? {
                        out.push(r);
                    }
                }
                Ok(out)
            };
            // A few point reads take microseconds each: done here, as the
            // client API's reads are, rather than paying a hand-off to the
            // blocking pool; a large batch goes there.
            let found: Vec<Record> = if key_count <= INLINE_READS {
                read_all().map_err(ApiError::storage)?
            } else {
                blocking(read_all).await?
            };
            Ok(binary(wire::encode_records(&found)))
        }
        (Method::GET, "store-digests") => {
            refuse_pull_while_behind(node, sender_epoch)?;
            let catching_up = node.store.catching_up();
            let store = node.store.clone();
            let d = blocking(move || store.bucket_digests()).await?;
            let mut body = vec![u8::from(catching_up)];
            body.extend(wire::encode_digests(&d));
            Ok(binary(body))
        }
        (Method::GET, "digests") => {
            refuse_pull_while_behind(node, sender_epoch)?;
            let store = node.store.clone();
            let d = blocking(move || store.bucket_digests()).await?;
            Ok(binary(wire::encode_digests(&d)))
        }
        (Method::GET, "scan") => {
            refuse_while_catching_up(node)?;
            let q = parse_query(query)?;
            let prefix = q.get("prefix").cloned().unwrap_or_default();
            let after = q.get("after").cloned();
            let limit = q
                .get("limit")
                .and_then(|v| std::str::from_utf8(v).ok()?.parse::<usize>().ok())
                .filter(|n| (1..=10_000).contains(n))
                .ok_or_else(|| ApiError::bad_request("limit must be 1..=10000"))?;
            let store = node.store.clone();
            let records = blocking(move || store.scan(&prefix, after.as_deref(), limit)).await?;
            Ok(binary(wire::encode_records(&records)))
        }
        (Method::GET, "topology") => {
            let t = node.cluster.view().topology.clone();
            let mut resp = Response::new(serde_json::to_vec(&t).unwrap_or_default().into());
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            Ok(resp)
        }
        (Method::PUT, "topology") => {
            let t = Topology::from_json(&body)
                .map_err(|e| ApiError::bad_request(format!("bad topology: {e}")))?;
            match node.install_topology(t, Source::Push) {
                Ok(changed) => {
                    let mut resp = Response::new(
                        json!({"installed": changed, "epoch": node.cluster.epoch()})
                            .to_string()
                            .into(),
                    );
                    resp.headers_mut().insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    );
                    Ok(resp)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "topology push rejected");
                    Err(ApiError::new(
                        409,
                        "conflict",
                        format!("topology rejected: {e}"),
                    ))
                }
            }
        }
        (Method::POST, "buckets") => {
            refuse_pull_while_behind(node, sender_epoch)?;
            let buckets = wire::decode_buckets(&body).map_err(decode_err)?;
            if buckets.len() > 256 {
                return Err(ApiError::bad_request("at most 256 buckets per request"));
            }
            let store = node.store.clone();
            let records = blocking(move || {
                let mut out = Vec::new();
                for b in buckets {
                    out.extend(store.bucket_records(b)?);
                }
                Ok(out)
            })
            .await?;
            Ok(binary(wire::encode_records(&records)))
        }
        (Method::GET, r) if r.starts_with("bucket/") => {
            refuse_pull_while_behind(node, sender_epoch)?;
            let b: u32 = r["bucket/".len()..]
                .parse()
                .ok()
                .filter(|b| *b < kv_core::BUCKETS)
                .ok_or_else(|| ApiError::bad_request("bucket must be 0..4096"))?;
            let store = node.store.clone();
            let records = blocking(move || store.bucket_records(b)).await?;
            Ok(binary(wire::encode_records(&records)))
        }
        (
            _,
            r @ ("apply" | "read" | "digests" | "store-digests" | "scan" | "topology" | "buckets"
            | "create" | "clock" | "promise" | "accept"),
        ) => {
            // error_response turns "this route takes ..." into the Allow header a 405 needs.
            let allowed = match r {
                "apply" | "read" | "buckets" | "create" | "promise" | "accept" => "POST",
                "topology" => "GET or PUT",
                _ => "GET",
            };
            Err(ApiError::new(
                405,
                "method_not_allowed",
                format!("this route takes {allowed}"),
            ))
        }
        _ => {
            let _ = percent_decode(route)?;
            Err(ApiError::new(404, "not_found", format!("no route {path}")))
        }
    }
}
