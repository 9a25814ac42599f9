//! `kvctl rotate-token --cluster NAME`: the token rotation of
//! `kv_net::token` done on a KvCluster's token Secret.
//!
//! The pods mount the Secret's key as their token file; the kubelet copies a
//! changed Secret into the pods (a minute or more), each node reads its file
//! again every second, and kv-operator shows each node's token fingerprints
//! in `status.nodes[].tokens`. So the rotation is three writes of the
//! Secret's key, each awaited until every node that is not Failed shows that
//! content's fingerprints:
//!
//! 1. the tokens there now, then the new one: every node accepts it, still
//!    sends the old one;
//! 2. the new one first: every node sends it (clients move now);
//! 3. the new one alone: the old ones are refused.
//!
//! Every token the Secret held before stays accepted until step 3, so a
//! rotation that was interrupted (the Secret left holding two tokens) can be
//! run again without locking a client out. The operator reads the Secret on
//! every reconcile and sends its first token, so its own calls follow the
//! same steps. While the rotation runs kvctl keeps the annotation
//! [`TOKEN_ROTATION`] on the KvCluster: writing it wakes the operator at
//! once (it does not watch Secrets) and says which step is under way.

use std::time::Duration;

use k8s_openapi::ByteString;
use kv_core::NodeState;
use kv_crd::kvcluster::{KvCluster, NodeStatus, Phase};
use kv_crd::names as objects;
use serde::Serialize;
use serde_json::{Value, json};

use crate::cli::TokenArg;

/// The KvCluster annotation kvctl keeps while it rotates a token: the token
/// and the step, e.g. `client 2/3`.
pub const TOKEN_ROTATION: &str = "kvstore.dev/token-rotation";

/// Where a KvCluster's token is kept: a Secret and its key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TokenSecret {
    pub secret: String,
    pub key: &'static str,
}

/// The Secret and key of `which` token of `kvc` (the user's
/// `authSecretName` holds both keys).
pub fn token_secret(kvc: &KvCluster, which: TokenArg) -> TokenSecret {
    match which {
        TokenArg::Client => TokenSecret {
            secret: objects::auth_secret_name(kvc),
            key: objects::TOKEN_KEY,
        },
        TokenArg::Cluster => TokenSecret {
            secret: objects::cluster_auth_secret_name(kvc),
            key: objects::CLUSTER_TOKEN_KEY,
        },
    }
}

/// The three contents of the token file, from the tokens it holds now
/// (`current`, the first one sent) to `new` alone.
pub fn rotation_steps(current: &[String], new: &str) -> [Vec<String>; 3] {
    let old: Vec<String> = current.iter().filter(|t| *t != new).cloned().collect();
    let mut accept = old.clone();
    accept.push(new.to_string());
    let mut send = vec![new.to_string()];
    send.extend(old);
    [accept, send, vec![new.to_string()]]
}

/// What a node shows of `which` token, as kv-operator last saw it.
pub fn shown(n: &NodeStatus, which: TokenArg) -> Option<&[String]> {
    let t = n.tokens.as_ref()?;
    Some(match which {
        TokenArg::Client => &t.client,
        TokenArg::Cluster => &t.cluster,
    })
}

/// The nodes expected to read the file: every node in the status but the
/// Failed ones, which read it when they start.
pub fn waited_on(kvc: &KvCluster) -> impl Iterator<Item = &NodeStatus> {
    kvc.status
        .iter()
        .flat_map(|s| s.nodes.iter())
        .filter(|n| n.state != NodeState::Failed)
}

/// The nodes [`waited_on`] that do not show `expected`.
pub fn behind(kvc: &KvCluster, which: TokenArg, expected: &[String]) -> Vec<u32> {
    waited_on(kvc)
        .filter(|n| shown(n, which) != Some(expected))
        .map(|n| n.ordinal)
        .collect()
}

/// No node runs: nothing to wait for, each node reads the Secret when it starts.
pub fn nobody_runs(kvc: &KvCluster) -> bool {
    kvc.status
        .as_ref()
        .is_some_and(|s| s.phase == Some(Phase::Hibernated))
}

/// The merge patch that sets the Secret's `key` to `tokens`, one per line.
pub fn secret_patch(key: &str, tokens: &[String]) -> Value {
    let text = kv_net::token::format(&tokens.iter().map(String::as_str).collect::<Vec<_>>());
    json!({"data": {key: ByteString(text.into_bytes())}})
}

/// The merge patch that sets ([`TOKEN_ROTATION`] = `value`) or removes the
/// annotation.
pub fn rotation_annotation_patch(value: Option<&str>) -> Value {
    json!({"metadata": {"annotations": {TOKEN_ROTATION: value}}})
}

/// One step of a rotation, as it went.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RotationStep {
    /// The fingerprints the Secret's key held, in order.
    pub tokens: Vec<String>,
    /// The nodes that showed them (none when no node runs).
    pub nodes: Vec<u32>,
    pub waited_ms: u64,
}

/// What `rotate-token --cluster` did.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Rotation {
    pub cluster: String,
    pub namespace: String,
    /// `client` or `cluster`.
    pub token: &'static str,
    pub secret: String,
    pub key: &'static str,
    /// The new token's fingerprint.
    pub fingerprint: String,
    pub steps: Vec<RotationStep>,
}

/// Why a step did not finish in time; the Secret keeps that step, whose
/// tokens are all accepted.
pub fn stalled_message(which: TokenArg, step: usize, limit: Duration, nodes: &[u32]) -> String {
    format!(
        "{} token: after {} s node(s) {nodes:?} do not show step {step} of 3 in status.nodes[].tokens; the Secret keeps that step (every token in it is accepted), run the rotation again once those nodes are back (kubectl kv status shows them)",
        which.name(),
        limit.as_secs()
    )
}

/// `rotate-token --cluster`: what was done.
pub fn render_rotation(r: &Rotation) -> String {
    let mut out = String::new();
    for (i, s) in r.steps.iter().enumerate() {
        out.push_str(&format!(
            "step {} of 3: {} written, shown by nodes {:?} after {:.1} s\n",
            i + 1,
            s.tokens.join(","),
            s.nodes,
            s.waited_ms as f64 / 1000.0
        ));
    }
    out.push_str(&format!(
        "KvCluster {}/{}: {} token rotated (fingerprint {}); the old one is refused. It is in Secret {} key {}\n",
        r.namespace, r.cluster, r.token, r.fingerprint, r.secret, r.key
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|t| t.to_string()).collect()
    }

    #[test]
    fn the_three_steps_keep_every_token_accepted_until_the_last() {
        let [a, b, c] = rotation_steps(&s(&["old"]), "new");
        assert_eq!(a, s(&["old", "new"]));
        assert_eq!(b, s(&["new", "old"]));
        assert_eq!(c, s(&["new"]));
        // An interrupted rotation left two tokens: both stay accepted until step 3.
        let [a, b, c] = rotation_steps(&s(&["x", "old"]), "new");
        assert_eq!(a, s(&["x", "old", "new"]));
        assert_eq!(b, s(&["new", "x", "old"]));
        assert_eq!(c, s(&["new"]));
    }

    #[test]
    fn failed_nodes_are_not_waited_on_and_silent_ones_are() {
        let mut kvc = KvCluster::new("demo", serde_yaml::from_str("{}").expect("spec"));
        let node = |o: u32, state, client: Option<&[&str]>| NodeStatus {
            ordinal: o,
            pod: format!("demo-{o}"),
            state,
            resync_progress: None,
            unreachable_since: None,
            tokens: client.map(|c| kv_crd::kvcluster::TokenFingerprints {
                client: s(c),
                cluster: s(&["cc"]),
            }),
        };
        kvc.status = Some(kv_crd::kvcluster::KvClusterStatus {
            nodes: vec![
                node(0, NodeState::Up, Some(&["aa", "bb"])),
                node(1, NodeState::Up, Some(&["aa"])),
                node(2, NodeState::Failed, None),
                node(3, NodeState::Recovering, None),
            ],
            ..Default::default()
        });
        let want = s(&["aa", "bb"]);
        assert_eq!(behind(&kvc, TokenArg::Client, &want), [1, 3]);
        assert_eq!(behind(&kvc, TokenArg::Cluster, &s(&["cc"])), [3]);
        assert!(!nobody_runs(&kvc));
    }

    #[test]
    fn the_patches_carry_the_file_format_and_remove_the_annotation() {
        let p = secret_patch("token", &s(&["new", "old"]));
        let b64 = p["data"]["token"].as_str().expect("base64");
        let decoded: ByteString = serde_json::from_value(json!(b64)).expect("decodes");
        let tokens = kv_net::token::parse("t", std::str::from_utf8(&decoded.0).expect("utf8"))
            .expect("parses");
        assert_eq!(tokens, s(&["new", "old"]));
        let set = rotation_annotation_patch(Some("client 2/3"));
        assert_eq!(
            set["metadata"]["annotations"]["kvstore.dev/token-rotation"],
            "client 2/3"
        );
        let removed = rotation_annotation_patch(None);
        assert!(removed["metadata"]["annotations"]["kvstore.dev/token-rotation"].is_null());
        assert_eq!(
            removed["metadata"]["annotations"]
                .as_object()
                .map(|m| m.len()),
            Some(1)
        );
    }
}
