//! The accept loop of every HTTP server we run (a node's client and peer
//! ports, the `kvctl up` gateway).

use std::time::Duration;

use tokio::sync::watch;

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
    mut stop: watch::Receiver<bool>,
) where
    F: warp::Filter + Clone + Send + Sync + 'static,
    F::Extract: warp::Reply,
{
    use hyper_util::rt::{TokioExecutor, TokioIo};
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
        let svc = hyper_util::service::TowerToHyperService::new(warp::service(filter.clone()));
        let conn = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
            .serve_connection_with_upgrades(TokioIo::new(io), svc)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                if is_client_disconnect(&*e) {
                    tracing::debug!(server, error = %e, "client went away");
                } else {
                    tracing::warn!(server, error = %e, "connection ended with an error");
                }
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
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
    use super::is_client_disconnect;

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
