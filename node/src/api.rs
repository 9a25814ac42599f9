//! The client HTTP API (docs/design.md, "Node HTTP API").
//!
//! warp hands every request to one router, [`dispatch`], that matches the
//! method and the raw path itself: that way each failure — unknown route,
//! wrong method, bad percent-encoding, missing token, oversized or malformed
//! body — gets exactly the status and JSON error shape the contract names,
//! and the whole request surface is one function that tests and property
//! tests call directly. Bodies are bounded before they are read: the
//! `Content-Length` is checked first and the stream is cut at the limit.

use std::sync::Arc;
use std::time::Instant;

use bytes::{Buf, Bytes};
use futures::{Stream, StreamExt};
use kv_core::record::{validate_key, validate_value};
use kv_core::{Consistency, NodeState, Record, bucket_of};
use serde_json::{Value, json};
use subtle::ConstantTimeEq;
use warp::Filter;
use warp::http::{HeaderMap, HeaderValue, Method, StatusCode, header};

use crate::node::{ApiError, Node};

pub type Response = warp::reply::Response;

/// Largest classic `/write` body beyond the value limit (JSON overhead).
const JSON_OVERHEAD: usize = 64 * 1024;
/// Most keys one listing page returns.
pub const MAX_LIST_LIMIT: usize = 1000;

/// A request after warp: everything the router needs, body not yet read.
pub struct Incoming {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub headers: HeaderMap,
}

/// A warp filter that hands every request to `handler` with its body read
/// up to `limit(&request)` bytes (or the 413/400 error that reading it gave).
/// Both ports use it, so each failure is answered by our own router with the
/// contract's JSON error shape.
pub fn request_filter<L, H, Fut>(
    limit: L,
    handler: H,
) -> impl Filter<Extract = (Response,), Error = std::convert::Infallible> + Clone
where
    L: Fn(&Incoming) -> usize + Clone + Send + Sync + 'static,
    H: Fn(Incoming, Result<Bytes, ApiError>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response> + Send,
{
    warp::method()
        .and(warp::path::full())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(warp::header::headers_cloned())
        .and(warp::body::stream())
        .then(
            move |method, path: warp::path::FullPath, query, headers, body| {
                let (limit, handler) = (limit.clone(), handler.clone());
                let req = Incoming {
                    method,
                    path: path.as_str().to_string(),
                    query,
                    headers,
                };
                async move {
                    let body = read_body(&req.headers, body, limit(&req)).await;
                    // A body refused (too large, unreadable) is left unread on
                    // the connection, which therefore cannot carry another
                    // request: say so, or a client would reuse it and lose
                    // its next request to the close.
                    let refused = body.is_err();
                    let mut resp = handler(req, body).await;
                    if refused {
                        resp.headers_mut()
                            .insert(header::CONNECTION, HeaderValue::from_static("close"));
                    }
                    resp
                }
            },
        )
        .recover(|_| async {
            Ok::<_, std::convert::Infallible>(error_response(
                &ApiError::new(404, "not_found", "no such route".into()),
                false,
            ))
        })
        .unify()
}

/// The warp filter serving the client API on `node`.
pub fn routes(
    node: Arc<Node>,
) -> impl Filter<Extract = (Response,), Error = std::convert::Infallible> + Clone {
    let (max_value, token) = (node.config.max_value_bytes, node.config.token.clone());
    request_filter(
        // No body is read for a request that will be refused anyway.
        move |req: &Incoming| match Route::parse(&req.method, &req.path) {
            Ok(r) if authorized(&req.headers, &token) => r.body_limit(max_value),
            _ => 0,
        },
        move |req, body| {
            let node = node.clone();
            async move { serve(&node, req, body).await }
        },
    )
}

async fn serve(node: &Arc<Node>, req: Incoming, body: Result<Bytes, ApiError>) -> Response {
    let started = Instant::now();
    let route = Route::parse(&req.method, &req.path);
    let name = route.as_ref().map_or("unknown", |r| r.name());
    let classic = route
        .as_ref()
        .map_or_else(|_| Route::is_classic_path(&req.path), Route::is_classic);
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

/// Reads at most `limit` bytes of body; more is a 413 before or while reading.
pub async fn read_body<S, B>(
    headers: &HeaderMap,
    mut body: S,
    limit: usize,
) -> Result<Bytes, ApiError>
where
    S: Stream<Item = Result<B, warp::Error>> + Send + Unpin,
    B: Buf,
{
    let too_large = || {
        ApiError::new(
            413,
            "payload_too_large",
            format!("the request body is larger than the {limit}-byte limit"),
        )
    };
    if let Some(len) = headers.get(header::CONTENT_LENGTH) {
        let len: usize = len
            .to_str()
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| ApiError::bad_request("Content-Length is not a number"))?;
        if len > limit {
            return Err(too_large());
        }
    }
    let mut out = Vec::new();
    while let Some(chunk) = body.next().await {
        let mut chunk =
            chunk.map_err(|e| ApiError::bad_request(format!("cannot read the body: {e}")))?;
        if out.len() + chunk.remaining() > limit {
            return Err(too_large());
        }
        while chunk.has_remaining() {
            let part = chunk.chunk();
            out.extend_from_slice(part);
            let n = part.len();
            chunk.advance(n);
        }
    }
    Ok(Bytes::from(out))
}

/// A route whose path ends in a key: prefix, methods, their name, constructor.
type KeyedRoute<'a> = (&'a str, &'a [Method], &'a str, fn(Vec<u8>) -> Route);

/// The routes of the client port.
#[derive(Debug, PartialEq)]
pub enum Route {
    Healthz,
    Readyz,
    Metrics,
    KvGet(Vec<u8>),
    KvPut(Vec<u8>),
    KvDelete(Vec<u8>),
    KvList,
    Cluster,
    Placement(Vec<u8>),
    Digests,
    ClassicWrite,
    ClassicRead(Vec<u8>),
    ClassicDelete(Vec<u8>),
    ClassicNodes,
    ClassicNodesForKey(Vec<u8>),
    ClassicControl(&'static str),
}

fn method_not_allowed(allowed: &str) -> ApiError {
    ApiError::new(
        405,
        "method_not_allowed",
        format!("this route takes {allowed}"),
    )
}

/// Strict percent-decoding: `%` must start two hex digits.
pub fn percent_decode(s: &str) -> Result<Vec<u8>, ApiError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = |c: u8| (c as char).to_digit(16);
            match (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            ) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                }
                _ => {
                    return Err(ApiError::bad_request(
                        "bad percent-encoding in the path (a % must start two hex digits)",
                    ));
                }
            }
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Ok(out)
}

fn key_of(raw: &str) -> Result<Vec<u8>, ApiError> {
    let key = percent_decode(raw)?;
    validate_key(&key).map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(key)
}

impl Route {
    pub fn parse(method: &Method, path: &str) -> Result<Route, ApiError> {
        let m = |allowed: &[Method], name: &str| -> Result<(), ApiError> {
            if allowed.contains(method) {
                Ok(())
            } else {
                Err(method_not_allowed(name))
            }
        };
        let get = [Method::GET, Method::HEAD];
        match path {
            "/healthz" => m(&get, "GET").map(|_| Route::Healthz),
            "/readyz" => m(&get, "GET").map(|_| Route::Readyz),
            "/metrics" => m(&get, "GET").map(|_| Route::Metrics),
            "/v1/kv" | "/v1/kv/" => m(&get, "GET").map(|_| Route::KvList),
            "/v1/cluster" => m(&get, "GET").map(|_| Route::Cluster),
            "/v1/digests" => m(&get, "GET").map(|_| Route::Digests),
            "/write" => m(&[Method::POST], "POST").map(|_| Route::ClassicWrite),
            "/nodes" => m(&get, "GET").map(|_| Route::ClassicNodes),
            "/set_replication_strategy" => m(&[Method::POST], "POST")
                .map(|_| Route::ClassicControl("set_replication_strategy")),
            _ => {
                if let Some(raw) = path.strip_prefix("/v1/kv/") {
                    let key = key_of(raw)?;
                    return match *method {
                        Method::GET | Method::HEAD => Ok(Route::KvGet(key)),
                        Method::PUT => Ok(Route::KvPut(key)),
                        Method::DELETE => Ok(Route::KvDelete(key)),
                        _ => Err(method_not_allowed("GET, PUT or DELETE")),
                    };
                }
                let prefixed: [KeyedRoute<'_>; 4] = [
                    ("/v1/placement/", &get, "GET", Route::Placement),
                    ("/read/", &get, "GET", Route::ClassicRead),
                    (
                        "/delete/",
                        &[Method::DELETE],
                        "DELETE",
                        Route::ClassicDelete,
                    ),
                    ("/nodes_for_key/", &get, "GET", Route::ClassicNodesForKey),
                ];
                for (prefix, allowed, name, make) in prefixed {
                    if let Some(raw) = path.strip_prefix(prefix) {
                        m(allowed, name)?;
                        return Ok(make(key_of(raw)?));
                    }
                }
                for (prefix, name) in [("/fail/", "fail"), ("/recover/", "recover")] {
                    if path.strip_prefix(prefix).is_some_and(|id| !id.is_empty()) {
                        m(&[Method::POST], "POST")?;
                        return Ok(Route::ClassicControl(name));
                    }
                }
                Err(ApiError::new(404, "not_found", format!("no route {path}")))
            }
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Route::Healthz => "healthz",
            Route::Readyz => "readyz",
            Route::Metrics => "metrics",
            Route::KvGet(_) => "kv_get",
            Route::KvPut(_) => "kv_put",
            Route::KvDelete(_) => "kv_delete",
            Route::KvList => "kv_list",
            Route::Cluster => "cluster",
            Route::Placement(_) => "placement",
            Route::Digests => "digests",
            Route::ClassicWrite => "classic_write",
            Route::ClassicRead(_) => "classic_read",
            Route::ClassicDelete(_) => "classic_delete",
            Route::ClassicNodes => "classic_nodes",
            Route::ClassicNodesForKey(_) => "classic_nodes_for_key",
            Route::ClassicControl(_) => "classic_control",
        }
    }

    pub fn is_classic(&self) -> bool {
        self.name().starts_with("classic_")
    }

    /// A path of the original store's API even when it does not parse (a bad
    /// key, a wrong method): its errors carry `"status": "error"` too.
    pub fn is_classic_path(path: &str) -> bool {
        matches!(path, "/write" | "/nodes" | "/set_replication_strategy")
            || [
                "/read/",
                "/delete/",
                "/nodes_for_key/",
                "/fail/",
                "/recover/",
            ]
            .iter()
            .any(|p| path.starts_with(p))
    }

    fn is_open(&self) -> bool {
        matches!(self, Route::Healthz | Route::Readyz | Route::Metrics)
    }

    fn body_limit(&self, max_value: usize) -> usize {
        match self {
            Route::KvPut(_) => max_value,
            // JSON escapes can inflate a value up to six times.
            Route::ClassicWrite => max_value.saturating_mul(6).saturating_add(JSON_OVERHEAD),
            Route::ClassicControl(_) => JSON_OVERHEAD,
            _ => 0,
        }
    }
}

fn json_response(status: u16, body: &Value) -> Response {
    let mut resp = Response::new(body.to_string().into());
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

pub fn error_response(e: &ApiError, classic: bool) -> Response {
    let mut body = json!({"error": e.code, "message": e.message});
    if classic {
        body["status"] = json!("error");
    }
    let mut resp = json_response(e.status, &body);
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

/// `Authorization: Bearer <token>`, compared in constant time.
pub fn authorized(headers: &HeaderMap, token: &str) -> bool {
    let Some(given) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
    else {
        return false;
    };
    bool::from(given.ct_eq(token.as_bytes()))
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

/// A key as JSON: the string itself when it is UTF-8, else
/// `{"base64": "..."}` (standard alphabet, padded), so every listed name
/// addresses exactly one key (a percent-encoded form would collide with a
/// UTF-8 key spelled with `%`).
pub fn key_json(key: &[u8]) -> Value {
    use base64::Engine;
    match std::str::from_utf8(key) {
        Ok(s) => Value::String(s.to_string()),
        Err(_) => json!({"base64": base64::engine::general_purpose::STANDARD.encode(key)}),
    }
}

/// A key in a human sentence (error messages): UTF-8 as is, else percent-encoded.
fn key_text(key: &[u8]) -> String {
    match std::str::from_utf8(key) {
        Ok(s) => s.to_string(),
        Err(_) => {
            percent_encoding::percent_encode(key, percent_encoding::NON_ALPHANUMERIC).to_string()
        }
    }
}

/// Runs one routed request whose body has been read: the token check, then the route.
pub async fn dispatch(node: &Arc<Node>, route: &Route, req: &Incoming, body: Bytes) -> Response {
    let classic = route.is_classic();
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

async fn handle(
    node: &Arc<Node>,
    route: &Route,
    req: &Incoming,
    body: Bytes,
) -> Result<Response, ApiError> {
    let level = consistency(&req.headers)?;
    match route {
        Route::Healthz => Ok(json_response(200, &json!({"status": "ok"}))),
        Route::Readyz => {
            let state = node.cluster.my_state();
            if node.cluster.confirmed() && state == Some(NodeState::Up) && !node.store.catching_up()
            {
                Ok(json_response(
                    200,
                    &json!({"status": "ready", "state": "Up"}),
                ))
            } else {
                let reason = match state {
                    _ if !node.cluster.confirmed() => {
                        "topology not yet confirmed since start".to_string()
                    }
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
        Route::Metrics => {
            let mut resp = Response::new(node.metrics.render().into());
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            Ok(resp)
        }
        Route::KvGet(key) => match node.read(key, level).await? {
            Some(Record {
                value: Some(v),
                version,
                ..
            }) => {
                let mut resp = Response::new(v.into());
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/octet-stream"),
                );
                if let Ok(h) = HeaderValue::from_str(&version.to_string()) {
                    resp.headers_mut().insert("x-kv-version", h);
                }
                Ok(resp)
            }
            _ => Err(ApiError::new(
                404,
                "not_found",
                format!("key {:?} not found", key_text(key)),
            )),
        },
        Route::KvPut(key) => {
            validate_value(&body, node.config.max_value_bytes)
                .map_err(|e| ApiError::new(413, "payload_too_large", e.to_string()))?;
            let create_only = match req.headers.get(header::IF_NONE_MATCH) {
                None => false,
                Some(v) if v.as_bytes() == b"*" => true,
                Some(_) => {
                    return Err(ApiError::bad_request("If-None-Match supports only *"));
                }
            };
            let r = node
                .write(key.clone(), Some(body.to_vec()), level, create_only, false)
                .await?;
            let mut resp = json_response(
                200,
                &json!({"key": key_json(key), "version": r.version.to_string()}),
            );
            if let Ok(h) = HeaderValue::from_str(&r.version.to_string()) {
                resp.headers_mut().insert("x-kv-version", h);
            }
            Ok(resp)
        }
        Route::KvDelete(key) => {
            let r = node.write(key.clone(), None, level, false, true).await?;
            Ok(json_response(
                200,
                &json!({"key": key_json(key), "version": r.version.to_string()}),
            ))
        }
        Route::KvList => {
            let q = parse_query(&req.query)?;
            let prefix = q.get("prefix").cloned().unwrap_or_default();
            let after = match (q.get("after"), q.get("after_base64")) {
                (Some(_), Some(_)) => {
                    return Err(ApiError::bad_request(
                        "give either after or after_base64, not both",
                    ));
                }
                (Some(a), None) => Some(a.clone()),
                (None, Some(b)) => {
                    use base64::Engine;
                    Some(
                        base64::engine::general_purpose::STANDARD
                            .decode(b)
                            .map_err(|e| {
                                ApiError::bad_request(format!("after_base64 is not base64: {e}"))
                            })?,
                    )
                }
                (None, None) => None,
            };
            let limit = match q.get("limit") {
                None => 100,
                Some(v) => std::str::from_utf8(v)
                    .ok()
                    .and_then(|s| s.parse::<usize>().ok())
                    .filter(|n| (1..=MAX_LIST_LIMIT).contains(n))
                    .ok_or_else(|| {
                        ApiError::bad_request(format!("limit must be 1..={MAX_LIST_LIMIT}"))
                    })?,
            };
            let page = node.list(&prefix, after.as_deref(), limit).await?;
            let keys: Vec<Value> = page.keys.iter().map(|k| key_json(k)).collect();
            Ok(json_response(
                200,
                &json!({"keys": keys, "next": page.next.as_deref().map(key_json)}),
            ))
        }
        Route::Cluster => serde_json::to_value(cluster_report(node))
            .map(|v| json_response(200, &v))
            .map_err(|e| ApiError::new(500, "internal", e.to_string())),
        Route::Placement(key) => {
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
        Route::Digests => {
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
        Route::ClassicWrite => {
            let v: Value = serde_json::from_slice(&body)
                .map_err(|e| ApiError::bad_request(format!("body is not valid JSON: {e}")))?;
            let key = match v.get("key") {
                Some(Value::String(k)) => k.clone(),
                _ => return Err(ApiError::bad_request("body needs \"key\" (a string)")),
            };
            let value = match v.get("value") {
                Some(Value::String(s)) => s.clone().into_bytes(),
                Some(Value::Null) | None => {
                    return Err(ApiError::bad_request("body needs \"value\""));
                }
                Some(other) => other.to_string().into_bytes(),
            };
            validate_key(key.as_bytes()).map_err(|e| ApiError::bad_request(e.to_string()))?;
            validate_value(&value, node.config.max_value_bytes)
                .map_err(|e| ApiError::new(413, "payload_too_large", e.to_string()))?;
            match node
                .write(key.clone().into_bytes(), Some(value), level, true, false)
                .await
            {
                Ok(_) => Ok(json_response(
                    200,
                    &json!({"status": "success", "message": format!("Key '{key}' written")}),
                )),
                Err(e) if e.status == 412 => Err(ApiError::new(
                    409,
                    "conflict",
                    format!("Key '{key}' already exists"),
                )),
                Err(e) => Err(e),
            }
        }
        Route::ClassicRead(key) => match node.read(key, level).await? {
            Some(Record { value: Some(v), .. }) => Ok(json_response(
                200,
                &json!({
                    "status": "success",
                    "message": "Key found",
                    "key": key_json(key),
                    "value": String::from_utf8_lossy(&v),
                }),
            )),
            _ => Err(ApiError::new(
                404,
                "not_found",
                format!("Key '{}' not found", key_text(key)),
            )),
        },
        Route::ClassicDelete(key) => {
            match node.write(key.clone(), None, level, false, true).await {
                Ok(_) => Ok(json_response(
                    200,
                    &json!({"status": "success", "message": format!("Key '{}' deleted", key_text(key))}),
                )),
                Err(e) if e.status == 404 => Err(ApiError::new(
                    404,
                    "not_found",
                    format!("Key '{}' not found", key_text(key)),
                )),
                Err(e) => Err(e),
            }
        }
        Route::ClassicNodes => {
            let view = node.cluster.view();
            let nodes: Vec<Value> = view
                .topology
                .nodes
                .iter()
                .map(|n| {
                    let port = n
                        .address
                        .rsplit_once(':')
                        .and_then(|(_, p)| p.parse::<u16>().ok());
                    json!({
                        "node_id": n.ordinal,
                        "status": if n.state.serves_client_reads() { "alive" } else { "dead" },
                        "port": port,
                        "state": n.state,
                    })
                })
                .collect();
            Ok(json_response(
                200,
                &json!({"status": "success", "nodes": nodes}),
            ))
        }
        Route::ClassicNodesForKey(key) => {
            let view = node.cluster.view();
            let owners = view.layout.current.owners(bucket_of(key)).to_vec();
            Ok(json_response(
                200,
                &json!({
                    "status": "success",
                    "message": format!("Nodes for key '{}'", key_text(key)),
                    "key": key_json(key),
                    "nodes": owners,
                }),
            ))
        }
        Route::ClassicControl(what) => Err(ApiError::new(
            501,
            "not_implemented",
            format!(
                "/{what} is a control route: a node cannot fail, recover or re-place itself; send it to the control plane (the `kvctl up` gateway, or edit the KvCluster on Kubernetes)"
            ),
        )),
    }
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
