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
        let classic = !path.starts_with("/v1/");
        let change = match (method.clone(), segs.as_slice()) {
            (Method::GET, ["nodes"]) => return Some(self.nodes_classic()),
            (Method::GET, ["v1", "nodes"]) | (Method::GET, ["v1", "cluster"]) => {
                return Some(json_response(200, &self.cluster_view()));
            }
            (Method::GET, ["nodes_for_key", key]) => return Some(self.nodes_for_key(key)),
            (Method::POST, ["fail", id]) | (Method::POST, ["v1", "nodes", id, "fail"]) => {
                ControlQuery::parse(query, true).and_then(|q| self.hold(id, true, q))
            }
            (Method::POST, ["recover", id]) | (Method::POST, ["v1", "nodes", id, "recover"]) => {
                ControlQuery::parse(query, false).and_then(|q| self.hold(id, false, q))
            }
            (Method::POST, ["set_replication_strategy"]) | (Method::PUT, ["v1", "replication"]) => {
                ControlQuery::parse(query, false).and_then(|q| self.set_strategy(body, q))
            }
            (_, ["nodes"] | ["fail", _] | ["recover", _] | ["set_replication_strategy"]) => {
                return Some(error(
                    405,
                    "method_not_allowed",
                    "wrong method for this control route",
                    true,
                ));
            }
            _ => return None,
        };
        Some(match change {
            Ok((effect, wait)) => self.settle(effect, wait, classic).await,
            Err(Refused::Bad(m)) => error(400, "bad_request", m, classic),
            Err(Refused::NotFound(m)) => error(404, "not_found", m, classic),
            Err(Refused::Conflict(m)) => error(409, "conflict", m, classic),
        })
    }

    /// Answers a control call once its effect is visible (`/nodes`,
    /// `/v1/cluster`, `/nodes_for_key` show it), or past the call's bound
    /// with 202 and its progress; at once with `wait=false`.
    async fn settle(&self, effect: Effect, wait: Option<Duration>, classic: bool) -> Response {
        let started = std::time::Instant::now();
        let (status, done, message, progress) = match wait {
            None => (200, false, effect.accepted(), Value::Null),
            Some(limit) => loop {
                let view = self.cluster_view();
                match effect.check(&view) {
                    Ok(message) => break (200, true, message, Value::Null),
                    Err(progress) if started.elapsed() >= limit => {
                        let message = effect.pending(limit, &progress);
                        break (202, false, message, progress);
                    }
                    Err(_) => tokio::time::sleep(WAIT_POLL).await,
                }
            },
        };
        let mut body = json!({"message": message, "done": done});
        if classic {
            body["status"] = json!(if status == 200 { "success" } else { "accepted" });
        }
        if !progress.is_null() {
            body["progress"] = progress;
        }
        if let Effect::Placement {
            strategy, factor, ..
        } = effect
        {
            // what holds now when done; otherwise what is asked for
            let fields = json!({"strategy": strategy, "replication_factor": factor});
            if done {
                body["strategy"] = fields["strategy"].clone();
                body["replication_factor"] = fields["replication_factor"].clone();
            } else {
                body["desired"] = fields;
            }
        }
        json_response(status, &body)
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

    fn hold(
        &self,
        id: &str,
        down: bool,
        q: ControlQuery,
    ) -> Result<(Effect, Option<Duration>), Refused> {
        let Ok(o) = id.parse::<u32>() else {
            return Err(Refused::Bad(format!("node id {id:?} is not a number")));
        };
        let replicas = self.platform.lock().saved.replicas;
        if o >= replicas {
            return Err(Refused::NotFound(format!(
                "node {o} does not exist (the cluster has nodes 0..{replicas})"
            )));
        }
        self.platform
            .change(|d| {
                d.force = q.force;
                if down {
                    d.failed_nodes.insert(o);
                } else {
                    d.failed_nodes.remove(&o);
                }
            })
            .map_err(Refused::Conflict)?;
        let effect = if down {
            Effect::Failed(o)
        } else {
            Effect::Up(o)
        };
        Ok((effect, q.wait))
    }

    fn set_strategy(
        &self,
        body: &Bytes,
        q: ControlQuery,
    ) -> Result<(Effect, Option<Duration>), Refused> {
        let v: Value = serde_json::from_slice(body)
            .map_err(|e| Refused::Bad(format!("body is not valid JSON: {e}")))?;
        let (replicas, current) = {
            let inner = self.platform.lock();
            (inner.saved.replicas, inner.saved.desired())
        };
        let change =
            ReplicationChange::parse(&v, current.strategy, replicas).map_err(Refused::Bad)?;
        let d = self
            .platform
            .change(|d| {
                if let Some(s) = change.strategy {
                    d.strategy = s;
                    if s == Strategy::Full {
                        d.factor = d.replicas;
                    }
                }
                if let Some(f) = change.factor {
                    d.factor = f;
                }
                if let Some(r) = change.read {
                    d.read_consistency = r;
                }
                if let Some(w) = change.write {
                    d.write_consistency = w;
                }
            })
            .map_err(Refused::Conflict)?;
        Ok((
            Effect::Placement {
                strategy: d.strategy,
                factor: d.factor,
                read: d.read_consistency,
                write: d.write_consistency,
            },
            q.wait,
        ))
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

/// How often a waiting control call looks at the platform's view.
const WAIT_POLL: Duration = Duration::from_millis(50);
/// How long a control call waits for its effect unless told (`?timeout=`).
pub const DEFAULT_WAIT: Duration = Duration::from_secs(30);
/// The longest `?timeout=` accepted.
const MAX_WAIT: Duration = Duration::from_secs(3600);

/// Why a control call changed nothing.
enum Refused {
    /// 400: the request itself is wrong.
    Bad(String),
    /// 404: no such node.
    NotFound(String),
    /// 409: the planner refuses the change now.
    Conflict(String),
}

/// A control call's query: `force=true|false` (fail only),
/// `wait=true|false`, `timeout=SECONDS`.
struct ControlQuery {
    force: bool,
    /// `None`: answer as soon as the change is accepted (`wait=false`).
    wait: Option<Duration>,
}

impl ControlQuery {
    fn parse(query: &str, force_allowed: bool) -> Result<ControlQuery, Refused> {
        let flag = |name: &str, v: &str| match v {
            "true" | "1" | "" => Ok(true),
            "false" | "0" => Ok(false),
            _ => Err(Refused::Bad(format!(
                "{name} must be true or false, not {v:?}"
            ))),
        };
        let (mut force, mut wait, mut timeout) = (false, true, None);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            match name {
                "force" if force_allowed => force = flag(name, value)?,
                "wait" => wait = flag(name, value)?,
                "timeout" => {
                    let secs = value
                        .strip_suffix('s')
                        .unwrap_or(value)
                        .parse::<f64>()
                        .ok()
                        .filter(|s| s.is_finite() && *s > 0.0 && *s <= MAX_WAIT.as_secs_f64())
                        .ok_or_else(|| {
                            Refused::Bad(format!(
                                "timeout must be a number of seconds in (0, {}], not {value:?}",
                                MAX_WAIT.as_secs()
                            ))
                        })?;
                    timeout = Some(Duration::from_secs_f64(secs));
                }
                _ => {
                    let known = if force_allowed {
                        "force, wait, timeout"
                    } else {
                        "wait, timeout"
                    };
                    return Err(Refused::Bad(format!(
                        "unknown query parameter {name:?} (this route takes {known})"
                    )));
                }
            }
        }
        Ok(ControlQuery {
            force,
            wait: wait.then(|| timeout.unwrap_or(DEFAULT_WAIT)),
        })
    }
}

/// A replication change as `/set_replication_strategy` and `PUT
/// /v1/replication` take it: `{"strategy": "full"|"consistent",
/// "replication_factor": N, "readConsistency": .., "writeConsistency": ..}`
/// (`factor` is accepted for `replication_factor`). Every mistake is refused
/// with a message naming it; nothing is half-applied.
#[derive(Debug, Default, PartialEq)]
pub struct ReplicationChange {
    pub strategy: Option<Strategy>,
    pub factor: Option<u32>,
    pub read: Option<Consistency>,
    pub write: Option<Consistency>,
}

impl ReplicationChange {
    /// Checks `v` against a cluster of `replicas` nodes whose strategy is
    /// `current`.
    pub fn parse(v: &Value, current: Strategy, replicas: u32) -> Result<ReplicationChange, String> {
        const FIELDS: &str = "strategy, replication_factor, readConsistency, writeConsistency";
        let Some(obj) = v.as_object() else {
            return Err(format!(
                "the body must be a JSON object such as {{\"strategy\": \"consistent\", \"replication_factor\": 2}}, not {}",
                kind_of(v)
            ));
        };
        if let Some(k) = obj.keys().find(|k| {
            !matches!(
                k.as_str(),
                "strategy"
                    | "replication_factor"
                    | "factor"
                    | "readConsistency"
                    | "writeConsistency"
            )
        }) {
            return Err(format!("unknown field {k:?} (the fields are {FIELDS})"));
        }
        if obj.contains_key("replication_factor") && obj.contains_key("factor") {
            return Err("give replication_factor or factor, not both".into());
        }
        let mut change = ReplicationChange::default();
        match obj.get("strategy") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => {
                change.strategy =
                    Some(s.parse::<Strategy>().map_err(|_| {
                        format!("unknown strategy {s:?} (\"full\" or \"consistent\")")
                    })?)
            }
            Some(other) => {
                return Err(format!(
                    "strategy must be a string, \"full\" or \"consistent\", not {}",
                    kind_of(other)
                ));
            }
        }
        match obj.get("replication_factor").or_else(|| obj.get("factor")) {
            None | Some(Value::Null) => {}
            Some(Value::Number(n)) => {
                let f = match (n.as_i64(), n.as_u64()) {
                    (_, Some(f)) => f,
                    (Some(f), None) => {
                        return Err(format!("replication_factor must be at least 1, not {f}"));
                    }
                    (None, None) => {
                        return Err(format!(
                            "replication_factor must be a whole number, not {n}"
                        ));
                    }
                };
                if f == 0 {
                    return Err("replication_factor must be at least 1, not 0".into());
                }
                change.factor = Some(u32::try_from(f).map_err(|_| {
                    format!("replication_factor {f} is larger than the cluster ({replicas} nodes)")
                })?);
            }
            Some(other) => {
                return Err(format!(
                    "replication_factor must be a whole number, not {}",
                    kind_of(other)
                ));
            }
        }
        for (name, slot) in [
            ("readConsistency", &mut change.read),
            ("writeConsistency", &mut change.write),
        ] {
            match obj.get(name) {
                None | Some(Value::Null) => {}
                Some(Value::String(s)) => {
                    *slot = Some(
                        s.parse()
                            .map_err(|_| format!("{name} must be One, Quorum or All, not {s:?}"))?,
                    )
                }
                Some(other) => {
                    return Err(format!(
                        "{name} must be a string, One, Quorum or All, not {}",
                        kind_of(other)
                    ));
                }
            }
        }
        if change == ReplicationChange::default() {
            return Err(format!("nothing to change: give at least one of {FIELDS}"));
        }
        // Full keeps every key on every node: a factor means something only
        // with consistent hashing.
        let strategy = change.strategy.unwrap_or(current);
        if let (Strategy::Full, Some(f)) = (strategy, change.factor)
            && f != replicas
        {
            return Err(format!(
                "replication_factor applies only to consistent hashing: Full keeps every key on all {replicas} nodes (give \"strategy\": \"consistent\" with a factor)"
            ));
        }
        Ok(change)
    }
}

/// A JSON value's kind, for messages.
fn kind_of(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the string {s:?}"),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

/// What a control call waits for.
#[derive(Clone, Copy, Debug)]
enum Effect {
    /// The node's process is gone and it is listed Failed (classic `dead`).
    Failed(u32),
    /// The node runs, caught up, and is listed Up (classic `alive`).
    Up(u32),
    /// The placement is committed (nothing pending) with this strategy and
    /// factor, and these consistency levels are in the topology.
    Placement {
        strategy: Strategy,
        factor: u32,
        read: Consistency,
        write: Consistency,
    },
}

impl Effect {
    /// `Ok(message)` when the effect is visible in the platform's view
    /// ([`Gateway::cluster_view`]); otherwise the progress so far.
    fn check(&self, view: &Value) -> Result<String, Value> {
        let node = |o: u32| {
            view["nodes"]
                .as_array()
                .and_then(|ns| ns.iter().find(|n| n["ordinal"] == o))
                .cloned()
                .unwrap_or(Value::Null)
        };
        match *self {
            Effect::Failed(o) => {
                let n = node(o);
                if n["state"] == "Failed" && n["running"] == false {
                    Ok(format!(
                        "Node {o} failed: its process is killed and it is held down (Failed) until recovered"
                    ))
                } else {
                    Err(json!({"node": o, "state": n["state"], "running": n["running"]}))
                }
            }
            Effect::Up(o) => {
                let n = node(o);
                if n["state"] == "Up" && n["running"] == true && !n["syncedEpoch"].is_null() {
                    Ok(format!("Node {o} recovered: it has caught up and is Up"))
                } else {
                    Err(json!({
                        "node": o,
                        "state": n["state"],
                        "running": n["running"],
                        "resyncProgress": n["resyncProgress"],
                    }))
                }
            }
            Effect::Placement {
                strategy,
                factor,
                read,
                write,
            } => {
                let t = &view["topology"];
                let p = &t["placement"];
                let committed = t["pending"].is_null()
                    && p["strategy"] == json!(strategy)
                    && (strategy == Strategy::Full || p["factor"] == factor)
                    && t["readConsistency"] == json!(read)
                    && t["writeConsistency"] == json!(write);
                if committed {
                    Ok(format!(
                        "Replication is {} (epoch {}, reads {read}, writes {write}): the placement is committed and every key has its new owners",
                        describe(
                            strategy,
                            factor,
                            p["members"].as_array().map_or(0, Vec::len)
                        ),
                        t["epoch"]
                    ))
                } else {
                    let syncing: Vec<Value> = view["nodes"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|n| json!({"node": n["ordinal"], "state": n["state"], "resyncProgress": n["resyncProgress"]}))
                        .collect();
                    Err(json!({
                        "epoch": t["epoch"],
                        "committed": p,
                        "pending": t["pending"],
                        "nodes": syncing,
                    }))
                }
            }
        }
    }

    /// The answer with `wait=false`: the change is accepted, not yet visible.
    fn accepted(&self) -> String {
        match *self {
            Effect::Failed(o) => format!(
                "Node {o} is held down: its process is killed and it is listed Failed within a moment (not waited for)"
            ),
            Effect::Up(o) => format!(
                "Node {o} is released: it restarts, catches up (Recovering) and serves again once Up (not waited for)"
            ),
            Effect::Placement {
                strategy, factor, ..
            } => format!(
                "Replication will be {}: the new placement is streamed and committed in the background (not waited for; GET /v1/cluster shows it pending until then)",
                describe(strategy, factor, factor as usize)
            ),
        }
    }

    /// The answer past the bound: still in progress, and how far.
    fn pending(&self, waited: Duration, progress: &Value) -> String {
        let secs = waited.as_secs_f64();
        match *self {
            Effect::Failed(o) => format!(
                "Node {o} is held down but not yet listed Failed after {secs:.1} s (state {}); it will be",
                progress["state"]
            ),
            Effect::Up(o) => {
                let pct = progress["resyncProgress"]
                    .as_f64()
                    .map(|p| format!(", caught up {:.0}%", p * 100.0))
                    .unwrap_or_default();
                format!(
                    "Node {o} is not Up yet after {secs:.1} s (state {}{pct}); GET /nodes lists it until it is",
                    progress["state"]
                )
            }
            Effect::Placement {
                strategy, factor, ..
            } => format!(
                "Replication is changing to {} but the new placement is not committed after {secs:.1} s; keys keep their old owners until it is (progress in this answer and GET /v1/cluster)",
                describe(strategy, factor, factor as usize)
            ),
        }
    }
}

/// `Full (every key on all N nodes)` or `ConsistentHashing with factor F`.
fn describe(strategy: Strategy, factor: u32, members: usize) -> String {
    match strategy {
        Strategy::Full => format!("Full (every key on all {members} nodes)"),
        Strategy::ConsistentHashing => format!("ConsistentHashing with factor {factor}"),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str, current: Strategy) -> Result<ReplicationChange, String> {
        ReplicationChange::parse(&serde_json::from_str(body).unwrap(), current, 3)
    }

    #[test]
    fn each_kind_of_replication_mistake_is_named() {
        use Strategy::{ConsistentHashing as Ch, Full};
        for (body, current, says) in [
            (r#"{"strategy":1}"#, Full, "strategy must be a string"),
            (r#"{"strategy":true}"#, Full, "not the boolean true"),
            ("[]", Full, "not an array"),
            ("null", Full, "not null"),
            (r#"{"strategy":"ring"}"#, Full, "unknown strategy \"ring\""),
            (
                r#"{"replication_factor":-1,"strategy":"consistent"}"#,
                Full,
                "at least 1, not -1",
            ),
            (
                r#"{"replication_factor":0,"strategy":"consistent"}"#,
                Full,
                "at least 1, not 0",
            ),
            (r#"{"replication_factor":2.5}"#, Ch, "whole number, not 2.5"),
            (
                r#"{"replication_factor":"2"}"#,
                Ch,
                "whole number, not the string",
            ),
            (
                r#"{"replication_factor":5000000000}"#,
                Ch,
                "larger than the cluster",
            ),
            (r#"{"replication_factor":2,"factor":2}"#, Ch, "not both"),
            (
                r#"{"strategy":"full","replication_factor":1}"#,
                Full,
                "only to consistent",
            ),
            (
                r#"{"strategy":"full","replication_factor":2}"#,
                Ch,
                "only to consistent",
            ),
            (r#"{"replication_factor":2}"#, Full, "only to consistent"),
            (
                r#"{"readConsistency":"most"}"#,
                Full,
                "One, Quorum or All, not \"most\"",
            ),
            (
                r#"{"writeConsistency":[]}"#,
                Full,
                "writeConsistency must be a string",
            ),
            (r#"{"replicas":5}"#, Full, "unknown field \"replicas\""),
            ("{}", Full, "nothing to change"),
            (r#"{"strategy":null}"#, Full, "nothing to change"),
        ] {
            match parse(body, current) {
                Ok(c) => panic!("{body} was accepted as {c:?}"),
                Err(m) => assert!(m.contains(says), "{body}: {m:?} does not say {says:?}"),
            }
        }
    }

    #[test]
    fn valid_replication_changes_are_read_as_given() {
        let c = parse(
            r#"{"strategy":"consistent","replication_factor":2}"#,
            Strategy::Full,
        );
        assert_eq!(
            c,
            Ok(ReplicationChange {
                strategy: Some(Strategy::ConsistentHashing),
                factor: Some(2),
                ..Default::default()
            })
        );
        // Full with its own factor (every node) is true, so accepted.
        let c = parse(
            r#"{"strategy":"full","replication_factor":3}"#,
            Strategy::ConsistentHashing,
        );
        assert_eq!(c.map(|c| c.factor), Ok(Some(3)));
        let c = parse(r#"{"factor":1}"#, Strategy::ConsistentHashing);
        assert_eq!(c.map(|c| c.factor), Ok(Some(1)));
        let c = parse(r#"{"writeConsistency":"all"}"#, Strategy::Full);
        assert_eq!(c.map(|c| c.write), Ok(Some(Consistency::All)));
    }

    #[test]
    fn control_queries_bound_the_wait() {
        let q = |s: &str| ControlQuery::parse(s, true).map(|q| (q.force, q.wait));
        assert!(matches!(q(""), Ok((false, Some(DEFAULT_WAIT)))));
        assert!(matches!(q("wait=false"), Ok((false, None))));
        assert!(
            matches!(q("force=true&timeout=2.5"), Ok((true, Some(d))) if d == Duration::from_millis(2500))
        );
        assert!(matches!(q("timeout=5s"), Ok((false, Some(d))) if d == Duration::from_secs(5)));
        for bad in [
            "timeout=0",
            "timeout=-1",
            "timeout=x",
            "timeout=99999",
            "wait=maybe",
            "forse=true",
        ] {
            assert!(q(bad).is_err(), "{bad} accepted");
        }
        assert!(ControlQuery::parse("force=true", false).is_err());
    }

    #[test]
    fn disconnects_are_told_apart_from_other_errors() {
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(is_client_disconnect(&reset));
        let pipe = std::io::Error::new(std::io::ErrorKind::BrokenPipe, "write");
        assert!(is_client_disconnect(&pipe));
        let other = std::io::Error::other("no space left");
        assert!(!is_client_disconnect(&other));
    }
}
