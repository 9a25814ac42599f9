//! Server plumbing that a kv-node and the `kvctl up` gateway share, so that
//! both answer the same way: the accept loop ([`serve`]), the HTTP helpers
//! ([`http`]: JSON answers, the bearer check, bodies read within a limit,
//! strict percent-decoding, which paths are the original store's), and
//! loopback ports for processes started next to us ([`free_port`]), and TLS
//! from certificate files that may be replaced while we run ([`tls`]), and
//! bearer tokens from files that may be rotated while we run ([`token`]), and
//! pooled HTTP/1.1 client connections to a plain-http server ([`h1`]).
//!
//! Nothing here knows about keys, nodes or the planner.

pub mod h1;
pub mod http;
pub mod pki;
pub mod port;
mod serve;
pub mod tls;
pub mod token;

pub use port::free_port;
pub use serve::{is_client_disconnect, refuse_before_routing, serve, serve_tls, serve_tls_until};

/// An error and its causes on one line, each cause once (reqwest's and
/// hyper's messages often repeat their source's).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        let t = src.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = src.source();
    }
    s
}
