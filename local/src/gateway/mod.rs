//! The `kvctl up` gateway: one address for clients.
//!
//! On Linux the Up nodes share the gateway's port (`SO_REUSEPORT`,
//! kv-node's `gateway_port`): clients reach a serving node with no hop, and
//! the control routes that reach a node are passed here, to a listener of
//! our own on another port. This process's own socket on the gateway's
//! port, bound before any node's, gets connections only while no node
//! holds the port (the nodes steer them to a node's slot), and answers
//! them as the proxy below does. Elsewhere, or with `--gateway proxy`,
//! it listens there alone and forwards data routes (v1 and classic) to a
//! node that is Up and running, round-robin; when that node fails
//! mid-request (connection error, or it answers that it does not serve
//! clients) the next one is tried.
//! Control routes act on the platform's desired cluster, after the planner
//! has accepted the change in a dry run, so an unsafe request is refused
//! with the planner's reason and changes nothing:
//! classic `POST /fail/<id>`, `POST /recover/<id>`, `GET /nodes`,
//! `POST /set_replication_strategy`, `GET /nodes_for_key/<key>`, and the v1
//! equivalents `GET /v1/nodes`, `POST /v1/nodes/<id>/fail`,
//! `POST /v1/nodes/<id>/recover`, `PUT /v1/replication`. `GET /metrics` (no
//! auth) serves the control-plane metrics ([`crate::metrics`]).

//!
//! The gateway's jobs, one module each: [`proxy`] forwards data routes to a
//! serving node, [`control`] carries out the control routes and waits for
//! their effect, [`input`] checks what a control call asks for. Bodies,
//! tokens, the JSON shapes, the classic-path rule and the accept loop are a
//! node's own ([`kv_net`]).

mod control;
mod input;
mod proxy;

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use bytes::Bytes;
use kv_net::http::{BodyError, Incoming, Response, error_body, is_classic_path, json_response};
use serde_json::json;
use warp::Filter;
use warp::http::{HeaderMap, Method};

pub use input::{DEFAULT_WAIT, ReplicationChange};

use crate::Platform;

/// Largest body forwarded (values are limited by the nodes).
const MAX_BODY: usize = 8 * 1024 * 1024;

pub struct Gateway {
    platform: Arc<Platform>,
    http: reqwest::Client,
    next: AtomicUsize,
}

fn error(status: u16, code: &str, message: impl Into<String>, classic: bool) -> Response {
    json_response(status, &error_body(code, &message.into(), classic))
}

impl Gateway {
    pub fn new(platform: Arc<Platform>) -> Arc<Gateway> {
        let http = crate::tls::client_builder(platform.tls.as_ref())
            .pool_max_idle_per_host(64)
            .tcp_nodelay(true)
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap_or_default();
        Arc::new(Gateway {
            platform,
            http,
            next: AtomicUsize::new(0),
        })
    }

    pub fn routes(
        self: Arc<Self>,
    ) -> impl Filter<Extract = (Response,), Error = std::convert::Infallible> + Clone {
        kv_net::http::request_filter(
            |_: &Incoming| MAX_BODY,
            move |req: Incoming, body: Result<Bytes, BodyError>| {
                let gw = self.clone();
                async move {
                    match body {
                        Ok(body) => {
                            gw.handle(req.method, &req.path, &req.query, &req.headers, body)
                                .await
                        }
                        Err(e) => error(e.status, e.code, e.message, is_classic_path(&req.path)),
                    }
                }
            },
        )
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        kv_net::http::authorized(headers, &self.platform.tokens.client)
    }

    async fn handle(
        &self,
        method: Method,
        path: &str,
        query: &str,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Response {
        let classic = is_classic_path(path);
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
        // A node passing on a control call it got on the shared port names
        // itself: if the call fails that very node, it must outlive the
        // answer ([`crate::Platform::kill`]).
        let relay = headers
            .get(kv_net::http::RELAY_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u32>().ok());
        let control = self.control(&method, path, query, &body, relay).await;
        if let Some(resp) = control {
            return resp;
        }
        self.forward(method, path, query, headers, body).await
    }
}

/// Serves the gateway until `stop` flips, then drains in-flight requests
/// (the nodes' accept loop: clients that go away are logged at debug).
pub async fn serve(
    gateway: Arc<Gateway>,
    listener: tokio::net::TcpListener,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let tls = gateway.platform.tls.as_ref().map(|t| t.server.clone());
    kv_net::serve_tls("gateway", gateway.routes(), listener, tls, stop).await;
}

/// A listener on the gateway's address that the Up nodes can share.
#[cfg(target_os = "linux")]
pub fn listen_shared(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::from_std(kv_net::port::bind_shared(addr)?)
}

#[cfg(not(target_os = "linux"))]
pub fn listen_shared(_: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    Err(std::io::Error::other(
        "sharing the gateway's port needs Linux (SO_REUSEPORT)",
    ))
}
