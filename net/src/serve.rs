//! The accept loop of every HTTP server we run (a node's client and peer
//! ports, the `kvctl up` gateway), plaintext or TLS.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use warp::http::{HeaderMap, HeaderValue, header};

use crate::http::{Response, error_body, is_classic_path, json_response};
use crate::tls::ServerTls;

/// Serves a warp filter until `stop` flips, then drains in-flight requests.
///
/// A connection that ends with an error is logged by what it was: a client
/// that went away (closed or reset the connection, mid-request or
/// mid-answer) is an ordinary event and logged at debug, anything else as a
/// warning. warp's own loop logs every one at ERROR, so 500 clients that
/// time out made 500 ERROR lines. `server` names the server in those lines.
pub async fn serve<F>(
    server: &'static str,
    filter: F,
    listener: tokio::net::TcpListener,
    stop: watch::Receiver<bool>,
) where
    F: warp::Filter + Clone + Send + Sync + 'static,
    F::Extract: warp::Reply,
{
    serve_tls(server, filter, listener, None, stop).await
}

/// How long a client has to complete its TLS handshake: a connection that
/// never does holds no more than a task and a socket for that long.
const HANDSHAKE_WITHIN: Duration = Duration::from_secs(10);

/// [`serve`], over TLS when `tls` is given: each connection's handshake uses
/// the configuration of that moment, so certificate files replaced on disk
/// are served from the next connection on. A failed handshake (a client
/// that does not trust our certificate, or without a certificate the client
/// CA issued) is logged at debug and the connection closed.
pub async fn serve_tls<F>(
    server: &'static str,
    filter: F,
    listener: tokio::net::TcpListener,
    tls: Option<Arc<ServerTls>>,
    stop: watch::Receiver<bool>,
) where
    F: warp::Filter + Clone + Send + Sync + 'static,
    F::Extract: warp::Reply,
{
    serve_tls_until(server, filter, listener, tls, stop, None).await
}

/// [`serve_tls`], telling `closed` as soon as the listener is closed once
/// `stop` flipped (before in-flight requests are drained): from then on no
/// new connection can reach this server.
pub async fn serve_tls_until<F>(
    server: &'static str,
    filter: F,
    listener: tokio::net::TcpListener,
    tls: Option<Arc<ServerTls>>,
    mut stop: watch::Receiver<bool>,
    closed: Option<tokio::sync::oneshot::Sender<()>>,
) where
    F: warp::Filter + Clone + Send + Sync + 'static,
    F::Extract: warp::Reply,
{
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
                tracing::warn!(server, error = %e, "cannot accept a connection; retrying in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let (filter, watcher) = (filter.clone(), graceful.watcher());
        match &tls {
            None => {
                tokio::spawn(serve_connection(server, filter, io, watcher));
            }
            Some(tls) => {
                let acceptor = tokio_rustls::TlsAcceptor::from(tls.config());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_WITHIN, acceptor.accept(io)).await {
                        Ok(Ok(io)) => serve_connection(server, filter, io, watcher).await,
                        Ok(Err(e)) => {
                            tracing::debug!(server, error = %e, "TLS handshake refused")
                        }
                        Err(_) => tracing::debug!(server, "TLS handshake timed out"),
                    }
                });
            }
        }
    }
    drop(listener);
    if let Some(closed) = closed {
        let _ = closed.send(());
    }
    graceful.shutdown().await;
}

/// One connection's requests, each checked by [`refuse_before_routing`]
/// before the filter sees it.
async fn serve_connection<F, I>(
    server: &'static str,
    filter: F,
    io: I,
    watcher: hyper_util::server::graceful::Watcher,
) where
    F: warp::Filter + Clone + Send + Sync + 'static,
    F::Extract: warp::Reply,
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let warp_svc = hyper_util::service::TowerToHyperService::new(warp::service(filter));
    let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        use futures::future::{Either, ready};
        use hyper::service::Service;
        match refuse_before_routing(&req) {
            Some(resp) => Either::Left(ready(Ok(resp))),
            None => Either::Right(warp_svc.call(req)),
        }
    });
    let conn = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
        .serve_connection_with_upgrades(TokioIo::new(io), svc)
        .into_owned();
    if let Err(e) = watcher.watch(conn).await {
        if is_client_disconnect(&*e) {
            tracing::debug!(server, error = %e, "client went away");
        } else {
            tracing::warn!(server, error = %e, "connection ended with an error");
        }
    }
}

/// The answer to a request that must not reach warp, if it is one:
///
/// - a target that is not a path (authority form `GET host:80`, asterisk
///   form `*`) is a 400: warp 0.4's path filter panics on the authority form
///   inside the connection task, which then closes unanswered;
/// - a transfer coding other than `chunked` alone (`gzip, chunked`) is a 501
///   (RFC 9112 §6.1): hyper removes the chunked framing and would hand us a
///   body still in a coding we do not decode, which would be stored as is.
///
/// Both close the connection: an unread body may follow on it.
pub fn refuse_before_routing<B>(req: &hyper::Request<B>) -> Option<Response> {
    let uri = req.uri();
    let refused = if uri.path_and_query().is_none() || !uri.path().starts_with('/') {
        json_response(
            400,
            &error_body(
                "bad_request",
                "the request target must be a path (origin form, /...)",
                false,
            ),
        )
    } else if let Some(coding) = unsupported_transfer_coding(req.headers()) {
        json_response(
            501,
            &error_body(
                "not_implemented",
                &format!(
                    "transfer coding {coding:?} is not supported; send the body with Content-Length or Transfer-Encoding: chunked alone"
                ),
                is_classic_path(uri.path()),
            ),
        )
    } else {
        return None;
    };
    let mut refused = refused;
    refused
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    Some(refused)
}

/// The request's transfer codings, unless they are `chunked` alone or none.
fn unsupported_transfer_coding(headers: &HeaderMap) -> Option<String> {
    let codings: Vec<String> = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| {
            String::from_utf8_lossy(v.as_bytes())
                .split(',')
                .map(|c| c.trim().to_ascii_lowercase())
                .collect::<Vec<_>>()
        })
        .filter(|c| !c.is_empty())
        .collect();
    match codings.as_slice() {
        [] => None,
        [only] if only == "chunked" => None,
        _ => Some(codings.join(", ")),
    }
}

/// A connection error that only means the client went away: it closed the
/// connection before its request was complete or before the answer was
/// written, reset it, or stopped reading.
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
    use super::{is_client_disconnect, refuse_before_routing};

    fn status_of(target: &str, te: &[&str]) -> Option<u16> {
        let mut req = hyper::Request::builder().uri(target);
        for v in te {
            req = req.header("transfer-encoding", *v);
        }
        let req = req.body(()).expect("a request");
        refuse_before_routing(&req).map(|r| r.status().as_u16())
    }

    #[test]
    fn targets_that_are_not_paths_are_refused_before_warp() {
        assert_eq!(status_of("127.0.0.1:80", &[]), Some(400));
        assert_eq!(
            status_of("http://host", &[]),
            None,
            "an absolute form means /"
        );
        assert_eq!(status_of("*", &[]), Some(400));
        assert_eq!(status_of("/v1/kv/a", &[]), None);
        assert_eq!(status_of("http://host/v1/kv/a?x=1", &[]), None);
    }

    #[test]
    fn only_chunked_alone_is_an_accepted_transfer_coding() {
        assert_eq!(status_of("/v1/kv/a", &["chunked"]), None);
        assert_eq!(status_of("/v1/kv/a", &["Chunked"]), None);
        assert_eq!(status_of("/v1/kv/a", &["gzip, chunked"]), Some(501));
        assert_eq!(status_of("/v1/kv/a", &["gzip", "chunked"]), Some(501));
        assert_eq!(status_of("/v1/kv/a", &["chunked, chunked"]), Some(501));
        assert_eq!(status_of("/write", &["identity"]), Some(501));
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
