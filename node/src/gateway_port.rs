//! `kvctl up`'s gateway port, shared by the Up nodes.
//!
//! A gateway that forwards every request is a second HTTP hop that costs
//! about as much CPU as the node behind it (issue 16 measured half the
//! throughput). Instead every node that serves clients also listens on the
//! gateway's address with `SO_REUSEPORT`, and a node that is killed, held
//! down or not Up has no socket there, so it gets no new connection. The
//! port's group of sockets starts with `kvctl up`'s own (slot 0), and the
//! nodes attach a BPF program that hands every new connection to slot 1, a
//! node: one node coordinates the gateway's clients, which on one machine is
//! cheaper than spreading them (fewer, fuller peer batches; measured by
//! `bench/gateway.sh`). When that node leaves, the kernel moves another
//! into slot 1; when no node is left, the group has no slot 1 and `kvctl
//! up`'s socket takes the connections, to answer control calls and say that
//! nothing serves. Data routes are the node's own; the control plane's
//! routes (fail, recover, replication, the cluster view, tokens, its
//! metrics and readiness) are passed to the control plane's address
//! unchanged.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use kv_net::http::{BodyError, Incoming, Response, error_body, is_classic_path, json_response};
use tokio::sync::watch;
use warp::Filter;
use warp::http::{HeaderValue, StatusCode};

use crate::config::GatewayPort;
use crate::node::{ApiError, Node};
use crate::peer::NODE_HEADER;

/// How often the node checks whether it should be listening.
const CHECK_EVERY: Duration = Duration::from_millis(50);
/// Largest control-call body passed on (a replication change is a few bytes).
const CONTROL_BODY: usize = 64 * 1024;
/// A control call may wait for its effect up to an hour (`timeout=`).
const CONTROL_TIMEOUT: Duration = Duration::from_secs(3700);
/// Request headers a control call is passed on with.
const FORWARD: [&str; 3] = ["authorization", "content-type", "accept"];

/// Routes the control plane answers, not a node.
pub fn is_control_path(path: &str) -> bool {
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    matches!(
        segs.as_slice(),
        ["nodes"]
            | ["nodes_for_key", ..]
            | ["fail", ..]
            | ["recover", ..]
            | ["set_replication_strategy"]
            | ["v1", "nodes", ..]
            | ["v1", "cluster"]
            | ["v1", "replication"]
            | ["v1", "tokens", ..]
            | ["metrics"]
            | ["readyz"]
    )
}

/// Whether `req` is a control call that fails node `me`.
fn fails(req: &Incoming, me: u32) -> bool {
    let segs: Vec<&str> = req.path.trim_start_matches('/').split('/').collect();
    let id = match segs.as_slice() {
        ["fail", id] | ["v1", "nodes", id, "fail"] => id,
        _ => return false,
    };
    req.method == warp::http::Method::POST && id.parse::<u32>().ok() == Some(me)
}

/// Whether this node serves clients now: Up in a topology it has confirmed
/// (the same rule as the coordinator's).
fn serving(node: &Node) -> bool {
    node.cluster.confirmed()
        && node
            .cluster
            .my_state()
            .is_some_and(|s| s.serves_client_reads())
}

/// Whether the node listens on the gateway's port, and the way its request
/// handlers make it leave.
#[derive(Debug, Default)]
pub struct PortState {
    listening: AtomicBool,
    /// Set for good once the node passed on the call that fails it.
    leaving: AtomicBool,
    wake: tokio::sync::Notify,
}

impl PortState {
    /// It listens on the gateway's port now (its report's `onGatewayPort`).
    pub fn listening(&self) -> bool {
        self.listening.load(Ordering::Acquire)
    }

    /// Closes the listener for good and returns once it is closed (bounded):
    /// no new connection reaches this node there afterwards.
    async fn leave(&self) {
        self.leaving.store(true, Ordering::Release);
        self.wake.notify_one();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        while self.listening() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// Listens on the gateway's port while this node serves clients, and
/// closes it when it stops, until `stop` flips; then drains its requests.
pub async fn share(node: Arc<Node>, port: GatewayPort, mut stop: watch::Receiver<bool>) {
    let control = Arc::new(Control::new(&node, port.control.clone()));
    let state = &node.gateway_port;
    let mut open: Option<Open> = None;
    // Servers of a listener closed earlier that may still be answering (the
    // node's shutdown waits for them too).
    let mut closing: Vec<tokio::task::JoinHandle<()>> = Vec::new();
    let mut bind_failed = false;
    loop {
        let want = serving(&node) && !state.leaving.load(Ordering::Acquire);
        match (want, open.is_some()) {
            (true, false) => match listen(port.listen) {
                Ok(listener) => {
                    let (stop, rx) = watch::channel(false);
                    let (closed_tx, closed) = tokio::sync::oneshot::channel();
                    let tls = node.config.tls.as_ref().map(|t| t.client.clone());
                    let server = kv_net::serve_tls_until(
                        "gateway",
                        routes(node.clone(), control.clone()),
                        listener,
                        tls,
                        rx,
                        Some(closed_tx),
                    );
                    let server = tokio::spawn(server);
                    open = Some(Open {
                        stop,
                        closed,
                        server,
                    });
                    state.listening.store(true, Ordering::Release);
                    bind_failed = false;
                    tracing::info!(addr = %port.listen, "serving clients on the gateway's port");
                }
                Err(e) if !bind_failed => {
                    bind_failed = true;
                    tracing::warn!(addr = %port.listen, error = %e, "cannot listen on the gateway's port; retrying");
                }
                Err(_) => {}
            },
            (false, true) => {
                if let Some(o) = open.take() {
                    closing.retain(|s| !s.is_finished());
                    closing.push(o.close().await);
                }
                state.listening.store(false, Ordering::Release);
                tracing::info!(addr = %port.listen, "left the gateway's port: not serving clients");
            }
            _ => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(CHECK_EVERY) => {}
            _ = state.wake.notified() => {}
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    if let Some(o) = open {
        closing.push(o.close().await);
    }
    state.listening.store(false, Ordering::Release);
    for server in closing {
        let _ = server.await;
    }
}

/// A listener on the gateway's port and its server.
struct Open {
    stop: watch::Sender<bool>,
    closed: tokio::sync::oneshot::Receiver<()>,
    server: tokio::task::JoinHandle<()>,
}

impl Open {
    /// Closes the listener (in-flight requests go on) and returns the
    /// server, which ends once they are answered.
    async fn close(self) -> tokio::task::JoinHandle<()> {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(1), self.closed).await;
        self.server
    }
}

#[cfg(target_os = "linux")]
fn listen(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let l = kv_net::port::bind_shared(addr)?;
    // Slot 0 is `kvctl up`'s own listener, bound first; slot 1 is a node.
    // One coordinator is the cheapest on one machine: fewer, fuller peer
    // batches (bench/gateway.sh: 0.96x of node 0 direct steered, 0.54-0.66x
    // spread by hash over three nodes).
    kv_net::port::steer_to_slot(&l, 1)?;
    tokio::net::TcpListener::from_std(l)
}

#[cfg(not(target_os = "linux"))]
fn listen(_: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    Err(std::io::Error::other(
        "sharing a port between processes needs Linux (SO_REUSEPORT)",
    ))
}

/// The gateway port's requests: control routes to the control plane, the
/// rest served here, marked with this node's ordinal.
fn routes(
    node: Arc<Node>,
    control: Arc<Control>,
) -> impl Filter<Extract = (Response,), Error = std::convert::Infallible> + Clone {
    let limits = node.clone();
    kv_net::http::request_filter(
        move |req: &Incoming| match is_control_path(&req.path) {
            true => CONTROL_BODY,
            false => crate::api::body_limit(&limits, req),
        },
        move |req: Incoming, body: Result<Bytes, BodyError>| {
            let (node, control) = (node.clone(), control.clone());
            async move {
                if is_control_path(&req.path) {
                    let fails_me = fails(&req, node.me());
                    let resp = control.pass(req, body, node.me()).await;
                    if fails_me && resp.status() == StatusCode::OK {
                        // The control plane has listed this node as failed
                        // and waits for it to stop. It leaves the port
                        // first, so that no client connects to it after
                        // this answer, then stops the way a signal stops
                        // it, so that this answer is written.
                        node.gateway_port.leave().await;
                        node.exit.notify_one();
                    }
                    return resp;
                }
                let mut resp = crate::api::serve(&node, req, body.map_err(ApiError::from)).await;
                if let Ok(v) = HeaderValue::from_str(&node.me().to_string()) {
                    resp.headers_mut().insert(NODE_HEADER, v);
                }
                resp
            }
        },
    )
}

/// The control plane's address and a client for it (over TLS, trusting the
/// cluster CA, when the node runs TLS).
struct Control {
    url: String,
    http: reqwest::Client,
}

impl Control {
    fn new(node: &Node, url: String) -> Control {
        let mut http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .timeout(CONTROL_TIMEOUT);
        let tls = match &node.config.tls {
            Some(t) => Some(t.peer_client.clone()),
            None => kv_net::tls::plaintext_client_config().ok(),
        };
        if let Some(tls) = tls {
            http = http.tls_backend_preconfigured(tls);
        }
        let http = http.build().unwrap_or_else(|e| {
            tracing::error!(error = %e, "cannot build the control-plane client");
            reqwest::Client::default()
        });
        Control { url, http }
    }

    /// Passes a control call on and its answer back, unchanged.
    async fn pass(&self, req: Incoming, body: Result<Bytes, BodyError>, me: u32) -> Response {
        let classic = is_classic_path(&req.path);
        let error = |status: u16, code: &str, message: &str| {
            json_response(status, &error_body(code, message, classic))
        };
        let body = match body {
            Ok(b) => b,
            Err(e) => return error(e.status, e.code, &e.message),
        };
        let mut url = format!("{}{}", self.url, req.path);
        if !req.query.is_empty() {
            url.push('?');
            url.push_str(&req.query);
        }
        let mut call = self
            .http
            .request(req.method, &url)
            .header(kv_net::http::RELAY_HEADER, me)
            .body(body);
        for name in FORWARD {
            if let Some(v) = req.headers.get(name) {
                call = call.header(name, v.clone());
            }
        }
        let answer = match call.send().await {
            Ok(a) => a,
            Err(e) => {
                let why = kv_net::error_chain(&e);
                return error(
                    503,
                    "unavailable",
                    &format!("the control plane cannot be reached: {why}"),
                );
            }
        };
        let (status, headers) = (answer.status(), answer.headers().clone());
        let bytes = match answer.bytes().await {
            Ok(b) => b,
            Err(e) => {
                let why = kv_net::error_chain(&e);
                return error(
                    503,
                    "unavailable",
                    &format!("the control plane's answer was cut: {why}"),
                );
            }
        };
        let mut out = Response::new(bytes.into());
        *out.status_mut() =
            StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
        for name in ["content-type", "allow"] {
            if let Some(v) = headers.get(name) {
                out.headers_mut().insert(name, v.clone());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::is_control_path;

    #[test]
    fn control_paths_are_the_control_planes_and_data_paths_the_nodes() {
        for p in [
            "/nodes",
            "/nodes_for_key/a",
            "/fail/1",
            "/recover/1",
            "/set_replication_strategy",
            "/v1/nodes",
            "/v1/nodes/1/fail",
            "/v1/cluster",
            "/v1/replication",
            "/v1/tokens/client/rotate",
            "/metrics",
            "/readyz",
        ] {
            assert!(is_control_path(p), "{p}");
        }
        for p in [
            "/v1/kv/a",
            "/v1/kv",
            "/read/a",
            "/write",
            "/healthz",
            "/v1/digests",
            "/v1/kv/nodes",
        ] {
            assert!(!is_control_path(p), "{p}");
        }
    }
}
