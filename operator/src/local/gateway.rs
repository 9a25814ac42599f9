//! The `kvctl up` gateway: one address for clients.
//!
//! Data routes (v1 and classic) are forwarded to a node that is Up and
//! running, round-robin; when that node fails mid-request (connection error,
//! or it answers that it does not serve clients) the next one is tried.
//! Control routes act on the platform's desired cluster, after the planner
//! has accepted the change in a dry run, so an unsafe request is refused
//! with the planner's reason and changes nothing:
//! classic `POST /fail/<id>`, `POST /recover/<id>`, `GET /nodes`,
//! `POST /set_replication_strategy`, `GET /nodes_for_key/<key>`, and the v1
//! equivalents `GET /v1/nodes`, `POST /v1/nodes/<id>/fail`,
//! `POST /v1/nodes/<id>/recover`, `PUT /v1/replication`. `GET /metrics` (no
//! auth) serves the control-plane metrics ([`super::metrics`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use kv_core::{Consistency, Layout, Strategy, bucket_of};
use serde_json::{Value, json};
use warp::Filter;
use warp::http::{HeaderMap, HeaderValue, Method, StatusCode, header};

use super::Platform;

type Response = warp::reply::Response;

/// Largest body forwarded (values are limited by the nodes).
const MAX_BODY: usize = 8 * 1024 * 1024;

/// Forwarded request headers.
const FORWARD: [&str; 5] = [
    "authorization",
    "x-consistency",
    "if-none-match",
    "content-type",
    "accept",
];

pub struct Gateway {
    platform: Arc<Platform>,
    http: reqwest::Client,
    next: AtomicUsize,
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

fn error(status: u16, code: &str, message: impl Into<String>, classic: bool) -> Response {
    let mut body = json!({"error": code, "message": message.into()});
    if classic {
        body["status"] = json!("error");
    }
    json_response(status, &body)
}

impl Gateway {
    pub fn new(platform: Arc<Platform>) -> Arc<Gateway> {
        Arc::new(Gateway {
            platform,
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(64)
                .tcp_nodelay(true)
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap_or_default(),
            next: AtomicUsize::new(0),
        })
    }

    pub fn routes(
        self: Arc<Self>,
    ) -> impl Filter<Extract = (Response,), Error = std::convert::Infallible> + Clone {
        warp::method()
            .and(warp::path::full())
            .and(warp::query::raw().or(warp::any().map(String::new)).unify())
            .and(warp::header::headers_cloned())
            .and(warp::body::stream())
            .then(
                move |method: Method,
                      path: warp::path::FullPath,
                      query: String,
                      headers: HeaderMap,
                      body| {
                    let gw = self.clone();
                    async move {
                        let body = match read_body(&headers, body).await {
                            Ok(b) => b,
                            Err(r) => return r,
                        };
                        gw.handle(method, path.as_str(), &query, &headers, body)
                            .await
                    }
                },
            )
            .recover(|_| async {
                Ok::<_, std::convert::Infallible>(error(404, "not_found", "no such route", false))
            })
            .unify()
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        use subtle::ConstantTimeEq;
        let token = self.platform.lock().saved.token.clone();
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
            .is_some_and(|t| bool::from(t.ct_eq(token.as_bytes())))
    }

    async fn handle(
        &self,
        method: Method,
        path: &str,
        query: &str,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Response {
        let classic = !path.starts_with("/v1/");
        match (method.clone(), path) {
            (Method::GET, "/healthz") => return json_response(200, &json!({"status": "ok"})),
            // The control plane's metrics (local::metrics), not a node's.
            (Method::GET, "/metrics") => return self.platform.metrics.response(),
            (Method::GET, "/readyz") => {
                return if self.platform.serving_nodes().is_empty() {
                    error(503, "unavailable", "no node is Up yet", false)
                } else {
                    json_response(200, &json!({"status": "ready"}))
                };
            }
            _ => {}
        }
        if !self.authorized(headers) {
            return error(
                403,
                "forbidden",
                "missing or wrong bearer token (Authorization: Bearer <token>)",
                classic,
            );
        }
        let control = self.control(&method, path, query, &body).await;
        if let Some(resp) = control {
            return resp;
        }
        self.forward(method, path, query, headers, body).await
    }

    /// Control routes; `None` for data routes.
    async fn control(
        &self,
        method: &Method,
        path: &str,
        query: &str,
        body: &Bytes,
    ) -> Option<Response> {
        let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let force = query
            .split('&')
            .any(|p| p == "force=true" || p == "force=1");
        let resp = match (method.clone(), segs.as_slice()) {
            (Method::GET, ["nodes"]) => self.nodes_classic(),
            (Method::GET, ["v1", "nodes"]) | (Method::GET, ["v1", "cluster"]) => {
                json_response(200, &self.cluster_view())
            }
            (Method::POST, ["fail", id]) => self.hold(id, true, force, true),
            (Method::POST, ["recover", id]) => self.hold(id, false, false, true),
            (Method::POST, ["v1", "nodes", id, "fail"]) => self.hold(id, true, force, false),
            (Method::POST, ["v1", "nodes", id, "recover"]) => self.hold(id, false, false, false),
            (Method::POST, ["set_replication_strategy"]) => self.set_strategy(body, true),
            (Method::PUT, ["v1", "replication"]) => self.set_strategy(body, false),
            (Method::GET, ["nodes_for_key", key]) => self.nodes_for_key(key),
            (_, ["nodes"] | ["fail", _] | ["recover", _] | ["set_replication_strategy"]) => error(
                405,
                "method_not_allowed",
                "wrong method for this control route",
                true,
            ),
            _ => return None,
        };
        Some(resp)
    }

    fn nodes_classic(&self) -> Response {
        let view = self.cluster_view();
        let nodes: Vec<Value> = view["nodes"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|n| {
                let alive = n["state"] == "Up" && n["running"] == true;
                json!({
                    "node_id": n["ordinal"],
                    "status": if alive { "alive" } else { "dead" },
                    "port": n["port"],
                    "state": n["state"],
                })
            })
            .collect();
        json_response(200, &json!({"status": "success", "nodes": nodes}))
    }

    /// The cluster as the platform sees it.
    pub fn cluster_view(&self) -> Value {
        let inner = self.platform.lock();
        let nodes: Vec<Value> = inner
            .topology
            .iter()
            .flat_map(|t| t.nodes.iter())
            .map(|n| {
                let report = inner.reports.get(&n.ordinal);
                let port = n
                    .address
                    .rsplit_once(':')
                    .and_then(|(_, p)| p.parse::<u16>().ok());
                // a store still catching up serves no reads and its
                // acknowledgements do not count: Recovering, whatever the
                // topology says (SPEC §3)
                let state = if n.state == kv_core::NodeState::Up
                    && inner.catching_up.contains(&n.ordinal)
                {
                    kv_core::NodeState::Recovering
                } else {
                    n.state
                };
                json!({
                    "ordinal": n.ordinal,
                    "address": n.address,
                    "port": port,
                    "state": state,
                    "storeCatchingUp": inner.catching_up.contains(&n.ordinal),
                    "running": inner.procs.contains_key(&n.ordinal),
                    "heldDown": inner.saved.failed_nodes.contains(&n.ordinal),
                    "syncedEpoch": report.map(|r| r.synced_epoch),
                    "resyncProgress": report.map(|r| r.resync_progress),
                })
            })
            .collect();
        let plan = inner.last_plan.as_ref();
        json!({
            "clusterId": inner.saved.cluster_id,
            "topology": inner.topology,
            "phase": plan.map(|p| format!("{:?}", p.phase)),
            "refusal": plan.and_then(|p| p.refusal.as_ref()).map(|r| r.reason.clone()),
            "desired": {
                "replicas": inner.saved.replicas,
                "strategy": inner.saved.strategy,
                "factor": inner.saved.factor,
                "readConsistency": inner.saved.read_consistency,
                "writeConsistency": inner.saved.write_consistency,
                "failedNodes": inner.saved.failed_nodes,
            },
            "nodes": nodes,
        })
    }

    fn hold(&self, id: &str, down: bool, force: bool, classic: bool) -> Response {
        let Ok(o) = id.parse::<u32>() else {
            return error(
                400,
                "bad_request",
                format!("node id {id:?} is not a number"),
                classic,
            );
        };
        let replicas = self.platform.lock().saved.replicas;
        if o >= replicas {
            return error(
                404,
                "not_found",
                format!("node {o} does not exist (the cluster has nodes 0..{replicas})"),
                classic,
            );
        }
        let r = self.platform.change(|d| {
            d.force = force;
            if down {
                d.failed_nodes.insert(o);
            } else {
                d.failed_nodes.remove(&o);
            }
        });
        match r {
            Ok(_) if down => json_response(
                200,
                &json!({"status": "success", "message": format!("Node {o} failed: its process is killed and it is held down until recovered")}),
            ),
            Ok(_) => json_response(
                200,
                &json!({"status": "success", "message": format!("Node {o} recovering: it restarts, catches up, and serves again once Up")}),
            ),
            Err(reason) => error(409, "conflict", reason, classic),
        }
    }

    fn set_strategy(&self, body: &Bytes, classic: bool) -> Response {
        let v: Value = match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => {
                return error(
                    400,
                    "bad_request",
                    format!("body is not valid JSON: {e}"),
                    classic,
                );
            }
        };
        let strategy = match v.get("strategy").and_then(Value::as_str) {
            Some(s) => match s.parse::<Strategy>() {
                Ok(s) => Some(s),
                Err(_) => {
                    return error(
                        400,
                        "bad_request",
                        format!("unknown strategy {s:?} (full or consistent)"),
                        classic,
                    );
                }
            },
            None => None,
        };
        let factor = match v.get("replication_factor").or_else(|| v.get("factor")) {
            None | Some(Value::Null) => None,
            Some(f) => match f.as_u64().and_then(|f| u32::try_from(f).ok()) {
                Some(f) => Some(f),
                None => {
                    return error(
                        400,
                        "bad_request",
                        "replication_factor must be a positive integer",
                        classic,
                    );
                }
            },
        };
        let level = |name: &str| -> Result<Option<Consistency>, String> {
            match v.get(name).and_then(Value::as_str) {
                None => Ok(None),
                Some(s) => s
                    .parse()
                    .map(Some)
                    .map_err(|_| format!("{name} must be One, Quorum or All")),
            }
        };
        let (read, write) = match (level("readConsistency"), level("writeConsistency")) {
            (Ok(r), Ok(w)) => (r, w),
            (Err(e), _) | (_, Err(e)) => return error(400, "bad_request", e, classic),
        };
        if strategy.is_none() && factor.is_none() && read.is_none() && write.is_none() {
            return error(
                400,
                "bad_request",
                "nothing to change: give strategy and/or replication_factor",
                classic,
            );
        }
        let r = self.platform.change(|d| {
            if let Some(s) = strategy {
                d.strategy = s;
                if s == Strategy::Full && factor.is_none() {
                    d.factor = d.replicas;
                }
            }
            if let Some(f) = factor {
                d.factor = f;
            }
            if let Some(r) = read {
                d.read_consistency = r;
            }
            if let Some(w) = write {
                d.write_consistency = w;
            }
        });
        match r {
            Ok(d) => json_response(
                200,
                &json!({
                    "status": "success",
                    "message": format!("Replication set to {} with factor {}; data is rebalanced in the background", d.strategy, d.factor),
                    "strategy": d.strategy,
                    "replication_factor": d.factor,
                }),
            ),
            Err(reason) => error(409, "conflict", reason, classic),
        }
    }

    fn nodes_for_key(&self, raw: &str) -> Response {
        let key = match percent_decode(raw) {
            Some(k) if !k.is_empty() && k.len() <= kv_core::record::MAX_KEY_BYTES => k,
            _ => return error(400, "bad_request", "bad key in the path", true),
        };
        let inner = self.platform.lock();
        let Some(t) = &inner.topology else {
            return error(503, "unavailable", "the cluster has no topology yet", true);
        };
        let owners = Layout::of(t).read_owners(bucket_of(&key)).to_vec();
        json_response(
            200,
            &json!({
                "status": "success",
                "message": format!("Nodes for key '{}'", String::from_utf8_lossy(&key)),
                "key": String::from_utf8_lossy(&key),
                "nodes": owners,
            }),
        )
    }

    async fn forward(
        &self,
        method: Method,
        path: &str,
        query: &str,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Response {
        let classic = !path.starts_with("/v1/");
        let nodes = self.platform.serving_nodes();
        if nodes.is_empty() {
            return error(
                503,
                "unavailable",
                "no node is Up: nothing can serve this request now",
                classic,
            );
        }
        // A create or a delete that may have reached a node is not sent to
        // another: a second try would answer "exists" / "not found" for the
        // first try's own effect. Its outcome is then unknown (503).
        let once = method == Method::DELETE
            || (method == Method::POST && path == "/write")
            || headers.contains_key("if-none-match");
        let unknown = |o: &u32, e: &dyn std::fmt::Display| {
            error(
                503,
                "unavailable",
                format!(
                    "node {o} failed while it had the request ({e}); it may or may not have taken effect"
                ),
                classic,
            )
        };
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut last_error = String::new();
        for i in 0..nodes.len() {
            let (o, addr) = &nodes[(start + i) % nodes.len()];
            let mut url = format!("http://{addr}{path}");
            if !query.is_empty() {
                url.push('?');
                url.push_str(query);
            }
            let mut req = self.http.request(method.clone(), &url).body(body.clone());
            for name in FORWARD {
                if let Some(v) = headers.get(name) {
                    req = req.header(name, v.clone());
                }
            }
            match req.send().await {
                Ok(resp) => {
                    let status = resp.status();
                    let resp_headers = resp.headers().clone();
                    let bytes = match resp.bytes().await {
                        Ok(b) => b,
                        Err(e) if once => return unknown(o, &e),
                        Err(e) => {
                            last_error = format!("node {o}: {e}");
                            continue;
                        }
                    };
                    if status == StatusCode::SERVICE_UNAVAILABLE && not_serving(&bytes) {
                        last_error = format!("node {o} is not serving");
                        continue;
                    }
                    let mut out = Response::new(bytes.into());
                    *out.status_mut() = status;
                    for name in ["content-type", "x-kv-version", "allow"] {
                        if let Some(v) = resp_headers.get(name) {
                            out.headers_mut().insert(name, v.clone());
                        }
                    }
                    if let Ok(v) = HeaderValue::from_str(&o.to_string()) {
                        out.headers_mut().insert("x-kv-node", v);
                    }
                    return out;
                }
                Err(e) if once && !e.is_connect() => return unknown(o, &e),
                Err(e) => last_error = format!("node {o}: {e}"),
            }
        }
        error(
            503,
            "unavailable",
            format!("no node could serve the request (last: {last_error})"),
            classic,
        )
    }
}

/// The node answered that it does not serve clients (not Up, or not yet
/// confirmed): another node may.
fn not_serving(body: &[u8]) -> bool {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| {
            v["message"]
                .as_str()
                .map(|m| m.contains("try another node"))
        })
        .unwrap_or(false)
}

fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = |c: u8| (c as char).to_digit(16);
            let h = b.get(i + 1).copied().and_then(hex)?;
            let l = b.get(i + 2).copied().and_then(hex)?;
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

async fn read_body<S, B>(headers: &HeaderMap, mut body: S) -> Result<Bytes, Response>
where
    S: futures::Stream<Item = Result<B, warp::Error>> + Unpin,
    B: warp::Buf,
{
    let too_large = || {
        error(
            413,
            "payload_too_large",
            format!("the request body is larger than {MAX_BODY} bytes"),
            false,
        )
    };
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse::<usize>().ok())
        && len > MAX_BODY
    {
        return Err(too_large());
    }
    let mut out = Vec::new();
    while let Some(chunk) = body.next().await {
        let mut chunk = chunk.map_err(|e| {
            error(
                400,
                "bad_request",
                format!("cannot read the body: {e}"),
                false,
            )
        })?;
        if out.len() + chunk.remaining() > MAX_BODY {
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

/// Serves the gateway until `stop` flips, then drains in-flight requests.
///
/// A connection that ends because its client went away is logged at debug,
/// any other connection error as a warning (warp's own loop logs both at
/// ERROR); the nodes serve the same way (`kv_node::node::serve`).
pub async fn serve(
    gateway: Arc<Gateway>,
    listener: tokio::net::TcpListener,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let routes = gateway.routes();
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => break,
        };
        let io = match accepted {
            Ok((io, _)) => io,
            Err(e) if is_disconnect_kind(e.kind()) => continue,
            Err(e) => {
                // out of file descriptors, most likely: wait for some to close
                tracing::warn!(error = %e, "gateway: cannot accept a connection; retrying in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let svc = hyper_util::service::TowerToHyperService::new(warp::service(routes.clone()));
        let conn = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
            .serve_connection_with_upgrades(TokioIo::new(io), svc)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                if is_client_disconnect(&*e) {
                    tracing::debug!(error = %e, "gateway: client went away");
                } else {
                    tracing::warn!(error = %e, "gateway: connection ended with an error");
                }
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// A connection error that only means the client went away (closed the
/// connection mid-request or mid-answer, reset it, stopped reading).
pub fn is_client_disconnect(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(h) = err.downcast_ref::<hyper::Error>()
            && (h.is_incomplete_message() || h.is_canceled() || h.is_closed() || h.is_timeout())
        {
            return true;
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && is_disconnect_kind(io.kind())
        {
            return true;
        }
        cur = err.source();
    }
    false
}

fn is_disconnect_kind(kind: std::io::ErrorKind) -> bool {
    use std::io::ErrorKind as K;
    matches!(
        kind,
        K::ConnectionReset
            | K::ConnectionAborted
            | K::BrokenPipe
            | K::UnexpectedEof
            | K::NotConnected
            | K::TimedOut
    )
}
