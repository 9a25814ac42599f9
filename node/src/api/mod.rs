//! The client HTTP API (docs/design.md, "Node HTTP API").
//!
//! warp hands every request to one router, [`dispatch`], that matches the
//! method and the raw path itself: that way each failure — unknown route,
//! wrong method, bad percent-encoding, missing token, oversized or malformed
//! body — gets exactly the status and JSON error shape the contract names,
//! and the whole request surface is one function that tests and property
//! tests call directly. Bodies are bounded before they are read: the
//! `Content-Length` is checked first and the stream is cut at the limit.
//!
//! One module per route group: [`route`] (parsing), [`kv`] (the v1 key
//! routes), [`classic`] (the original store's routes), [`cluster`] (health,
//! metrics, the node's report, placement, digests); [`error`] turns the
//! coordinator's errors into answers. The answer shapes, the
//! bearer check, body reading and the classic-path rule are shared with the
//! `kvctl up` gateway ([`kv_net::http`]).

mod classic;
mod cluster;
mod error;
mod kv;
mod route;

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use kv_core::Consistency;
use warp::Filter;
use warp::http::{HeaderMap, HeaderValue, header};

pub use cluster::cluster_report;
pub use kv::key_json;
use kv_net::http::{BodyError, error_body};
pub use kv_net::http::{
    Incoming, Response, authorized, is_classic_path, json_response, request_filter,
};
pub use route::{Route, percent_decode};

use crate::node::{ApiError, Node};

/// Largest classic `/write` body beyond the value limit (JSON overhead).
const JSON_OVERHEAD: usize = 64 * 1024;
/// Most keys one listing page returns.
pub const MAX_LIST_LIMIT: usize = 1000;

/// The warp filter serving the client API on `node`.
pub fn routes(
    node: Arc<Node>,
) -> impl Filter<Extract = (Response,), Error = std::convert::Infallible> + Clone {
    let limits = node.clone();
    request_filter(
        move |req: &Incoming| body_limit(&limits, req),
        move |req, body: Result<Bytes, BodyError>| {
            let node = node.clone();
            async move { serve(&node, req, body.map_err(ApiError::from)).await }
        },
    )
}

/// How much of `req`'s body is read: none for a request that will be
/// refused anyway.
pub(crate) fn body_limit(node: &Node, req: &Incoming) -> usize {
    match Route::parse(&req.method, &req.path) {
        Ok(r) if authorized(&req.headers, &node.config.token) => {
            r.body_limit(node.config.max_value_bytes)
        }
        _ => 0,
    }
}

/// One client request, routed, answered and counted in the metrics.
pub(crate) async fn serve(
    node: &Arc<Node>,
    req: Incoming,
    body: Result<Bytes, ApiError>,
) -> Response {
    let started = Instant::now();
    let route = Route::parse(&req.method, &req.path);
    let name = route.as_ref().map_or("unknown", |r| r.name());
    let classic = is_classic_path(&req.path);
    let resp = match (route, body) {
        (Err(e), _) => error_response(&e, classic),
        (Ok(route), Err(e)) if route.is_open() || authorized(&req.headers, &node.config.token) => {
            error_response(&e, classic)
        }
        (Ok(route), body) => dispatch(node, &route, &req, body.unwrap_or_default()).await,
    };
    node.metrics
        .requests
        .with_label_values(&[name, resp.status().as_str()])
        .inc();
    node.metrics
        .request_duration
        .with_label_values(&[name])
        .observe(started.elapsed().as_secs_f64());
    resp
}

pub fn error_response(e: &ApiError, classic: bool) -> Response {
    let mut resp = json_response(e.status, &error_body(e.code, &e.message, classic));
    if e.status == 405
        && let Some(allowed) = e.message.strip_prefix("this route takes ")
    {
        let allowed = allowed.replace(" or ", ", ");
        if let Ok(v) = HeaderValue::from_str(&allowed) {
            resp.headers_mut().insert(header::ALLOW, v);
        }
    }
    resp
}

fn consistency(headers: &HeaderMap) -> Result<Option<Consistency>, ApiError> {
    match headers.get("x-consistency") {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.parse::<Consistency>().ok())
            .map(Some)
            .ok_or_else(|| ApiError::bad_request("X-Consistency must be one of: one, quorum, all")),
    }
}

/// Runs one routed request whose body has been read: the token check, then the route.
pub async fn dispatch(node: &Arc<Node>, route: &Route, req: &Incoming, body: Bytes) -> Response {
    let classic = is_classic_path(&req.path);
    if !route.is_open() && !authorized(&req.headers, &node.config.token) {
        return error_response(
            &ApiError::new(
                403,
                "forbidden",
                "missing or wrong bearer token (Authorization: Bearer <token>)".into(),
            ),
            classic,
        );
    }
    match handle(node, route, req, body).await {
        Ok(resp) => resp,
        Err(e) => error_response(&e, classic),
    }
}

/// The route, carried out by its group's module; this layer only maps.
async fn handle(
    node: &Arc<Node>,
    route: &Route,
    req: &Incoming,
    body: Bytes,
) -> Result<Response, ApiError> {
    let level = consistency(&req.headers)?;
    match route {
        Route::Healthz => cluster::healthz(),
        Route::Readyz => cluster::readyz(node),
        Route::Metrics => cluster::metrics(node),
        Route::Cluster => cluster::cluster(node),
        Route::Placement(key) => cluster::placement(node, key),
        Route::Digests => cluster::digests(node).await,
        Route::KvGet(key) => kv::get(node, key, level).await,
        Route::KvPut(key) => kv::put(node, key, req, body, level).await,
        Route::KvDelete(key) => kv::delete(node, key, level).await,
        Route::KvList => kv::list(node, req).await,
        Route::ClassicWrite => classic::write(node, &body, level).await,
        Route::ClassicRead(key) => classic::read(node, key, level).await,
        Route::ClassicDelete(key) => classic::delete(node, key, level).await,
        Route::ClassicNodes => classic::nodes(node),
        Route::ClassicNodesForKey(key) => classic::nodes_for_key(node, key),
        Route::ClassicControl(what) => classic::control(what),
    }
}

/// Query string to decoded byte values; bad encoding is a 400.
pub fn parse_query(q: &str) -> Result<std::collections::HashMap<String, Vec<u8>>, ApiError> {
    let mut out = std::collections::HashMap::new();
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = String::from_utf8(percent_decode(&k.replace('+', " "))?)
            .map_err(|_| ApiError::bad_request("query parameter names must be UTF-8"))?;
        let v = percent_decode(&v.replace('+', " "))?;
        out.insert(k, v);
    }
    Ok(out)
}
