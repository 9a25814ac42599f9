//! Data routes, forwarded to a serving node round-robin; the next node is
//! tried when one fails before it could have taken effect.

use std::sync::atomic::Ordering;

use bytes::Bytes;
use kv_net::http::{Response, is_classic_path};
use serde_json::Value;
use warp::http::{HeaderMap, HeaderValue, Method, StatusCode};

use super::{Gateway, error};

/// Forwarded request headers.
const FORWARD: [&str; 5] = [
    "authorization",
    "x-consistency",
    "if-none-match",
    "content-type",
    "accept",
];

impl Gateway {
    pub(super) async fn forward(
        &self,
        method: Method,
        path: &str,
        query: &str,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Response {
        let classic = is_classic_path(path);
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
            let mut url = format!("{}://{addr}{path}", self.platform.scheme());
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
