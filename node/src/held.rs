//! Held down by the control plane (`spec.faultInjection.failedNodes`).
//!
//! On Kubernetes a held-down node's pod cannot stay deleted: its StatefulSet
//! recreates it within a second. So the operator lists held ordinals in a
//! file the pod mounts (`--held-file`, a key of the topology ConfigMap) and
//! deletes the pod once; the new pod finds its ordinal there and waits,
//! fenced, before it opens its store or its peer port. While it waits the
//! client port answers `/healthz` (so the kubelet does not restart it) and
//! 503 `held_down` to everything else, so it is never Ready and serves no
//! client or peer. When the file stops listing it, the node starts normally.
//! (A mounted ConfigMap changes only at the kubelet's next sync, a minute or
//! more; the operator deletes the pod again at release so that the new one
//! reads the current list at once.)

use std::collections::BTreeSet;
use std::future::Future;
use std::path::Path;
use std::time::Duration;

use kv_net::http::{Incoming, request_filter};
use warp::http::StatusCode;
use warp::reply::Response;

use crate::config::Config;
use crate::node::NodeError;

/// How often the held list is read again while held.
const POLL: Duration = Duration::from_secs(1);

/// The ordinals a held-down file lists ([`kv_core::topology::parse_held`]).
/// A missing file lists none; an entry that is not an ordinal is logged and
/// skipped (it cannot name this node).
pub fn held_ordinals(path: &Path) -> BTreeSet<u32> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return BTreeSet::new(),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the held-down list; taking it as empty");
            return BTreeSet::new();
        }
    };
    let (held, bad) = kv_core::topology::parse_held(&text);
    for entry in bad {
        tracing::warn!(path = %path.display(), entry, "not an ordinal in the held-down list; skipped");
    }
    held
}

/// Waits while `config.held_file` lists this node, answering only health
/// checks on the client port. `Ok(true)`: released (or never held), go on
/// starting; `Ok(false)`: `shutdown` came first.
pub async fn wait_while_held(
    config: &Config,
    shutdown: &mut (impl Future<Output = ()> + Unpin),
) -> Result<bool, NodeError> {
    let Some(path) = config.held_file.as_deref() else {
        return Ok(true);
    };
    let me = config.node_id;
    if !held_ordinals(path).contains(&me) {
        return Ok(true);
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| NodeError::Listen {
            addr: config.listen,
            source,
        })?;
    tracing::warn!(
        node = me,
        file = %path.display(),
        "held down by the control plane: the store stays closed and nothing is served until released"
    );
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    // The same protocol as the node's client port will speak once it runs.
    let tls = config.tls.as_ref().map(|t| t.client.clone());
    let server = tokio::spawn(kv_net::serve_tls("client", routes(me), listener, tls, stop));
    let released = loop {
        tokio::select! {
            _ = &mut *shutdown => break false,
            _ = tokio::time::sleep(POLL) => {
                if !held_ordinals(path).contains(&me) {
                    break true;
                }
            }
        }
    };
    let _ = stop_tx.send(true);
    let _ = server.await;
    if released {
        tracing::info!(node = me, "released from the hold-down: starting");
    }
    Ok(released)
}

/// `/healthz` answers 200; everything else 503 `held_down`.
fn routes(
    me: u32,
) -> impl warp::Filter<Extract = (Response,), Error = std::convert::Infallible> + Clone {
    request_filter(
        |_: &Incoming| 0,
        move |req: Incoming, _body| async move { answer(me, &req) },
    )
}

fn answer(me: u32, req: &Incoming) -> Response {
    let (status, body) = if req.path == "/healthz" {
        (StatusCode::OK, "held down\n".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({
                "error": "held_down",
                "message": format!(
                    "node {me} is held down by the control plane (faultInjection.failedNodes); it serves nothing until released"
                ),
            })
            .to_string(),
        )
    };
    let mut resp = Response::new(body.into());
    *resp.status_mut() = status;
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_takes_whitespace_and_commas_and_skips_what_is_not_an_ordinal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("held-down");
        assert!(held_ordinals(&path).is_empty(), "a missing file holds none");
        std::fs::write(&path, "1\n3, 7\tx -2\n").expect("write");
        assert_eq!(held_ordinals(&path), BTreeSet::from([1, 3, 7]));
        std::fs::write(&path, "").expect("write");
        assert!(held_ordinals(&path).is_empty());
    }
}
