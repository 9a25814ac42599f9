//! The control routes: hold a node down or bring it back, change the
//! replication, list nodes and a key's owners, rotate a token; each answers
//! once its effect is visible in the platform's view, or past its bound.

use std::time::Duration;

use bytes::Bytes;
use kv_core::{Consistency, Layout, Strategy, bucket_of};
use kv_net::http::{Response, is_classic_path, json_response};
use serde_json::{Value, json};
use warp::http::Method;

use super::input::{ControlQuery, Refused, ReplicationChange};
use super::{Gateway, error};

/// How often a waiting control call looks at the platform's view.
const WAIT_POLL: Duration = Duration::from_millis(50);
impl Gateway {
    /// Control routes; `None` for data routes.
    pub(super) async fn control(
        &self,
        method: &Method,
        path: &str,
        query: &str,
        body: &Bytes,
        relay: Option<u32>,
    ) -> Option<Response> {
        let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let classic = is_classic_path(path);
        let change = match (method.clone(), segs.as_slice()) {
            (Method::GET, ["nodes"]) => return Some(self.nodes_classic()),
            (Method::GET, ["v1", "nodes"]) | (Method::GET, ["v1", "cluster"]) => {
                return Some(json_response(200, &self.cluster_view()));
            }
            (Method::GET, ["nodes_for_key", key]) => return Some(self.nodes_for_key(key)),
            (Method::POST, ["fail", id]) | (Method::POST, ["v1", "nodes", id, "fail"]) => {
                let relayed = relay.filter(|r| id.parse::<u32>().ok() == Some(*r));
                let _relaying = relayed.map(|o| self.platform.relaying(o));
                let change = ControlQuery::parse(query, true).and_then(|q| self.hold(id, true, q));
                return Some(self.answer(change, classic).await);
            }
            (Method::POST, ["recover", id]) | (Method::POST, ["v1", "nodes", id, "recover"]) => {
                ControlQuery::parse(query, false).and_then(|q| self.hold(id, false, q))
            }
            (Method::POST, ["v1", "tokens", which, "rotate"]) => {
                return Some(self.rotate_token(which, query).await);
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
        Some(self.answer(change, classic).await)
    }

    async fn answer(
        &self,
        change: Result<(Effect, Option<Duration>), Refused>,
        classic: bool,
    ) -> Response {
        match change {
            Ok((effect, wait)) => self.settle(effect, wait, classic).await,
            Err(Refused::Bad(m)) => error(400, "bad_request", m, classic),
            Err(Refused::NotFound(m)) => error(404, "not_found", m, classic),
            Err(Refused::Conflict(m)) => error(409, "conflict", m, classic),
        }
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

    /// `POST /v1/tokens/{client|cluster}/rotate[?timeout=S]`: the whole
    /// rotation ([`crate::Platform::rotate_token`]), each of its three
    /// steps awaited for at most the call's bound. Answers the new client
    /// token (the caller holds the old one); never the cluster token.
    async fn rotate_token(&self, which: &str, query: &str) -> Response {
        use crate::tokens::{RotateError, TokenKind};
        let kind = match which {
            "client" => TokenKind::Client,
            "cluster" => TokenKind::Cluster,
            _ => return error(404, "not_found", "no such token: client or cluster", false),
        };
        let limit = match ControlQuery::parse(query, false) {
            Ok(q) => q.wait.unwrap_or(super::input::DEFAULT_WAIT),
            Err(Refused::Bad(m)) => return error(400, "bad_request", m, false),
            Err(_) => return error(400, "bad_request", "bad query", false),
        };
        match self.platform.rotate_token(kind, limit).await {
            Ok(r) => {
                let mut body = json!({
                    "message": format!("{} rotated on nodes {:?}; the old one is refused", kind.name(), r.nodes),
                    "done": true,
                    "fingerprint": kv_net::token::fingerprint(&r.token),
                });
                if kind == TokenKind::Client {
                    body["token"] = json!(r.token);
                }
                json_response(200, &body)
            }
            Err(e @ RotateError::Busy(_)) => error(409, "conflict", e.to_string(), false),
            Err(e @ RotateError::Timeout { .. }) => error(503, "unavailable", e.to_string(), false),
            Err(e @ RotateError::Write { .. }) => error(500, "internal", e.to_string(), false),
        }
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
        let key = match kv_net::http::percent_decode(raw) {
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
