//! `kvctl restart --cluster NAME`: the annotation `kvstore.dev/restartedAt`
//! set to now asks kv-operator for a rolling restart (one pod at a time,
//! each node Up and caught up before the next); `status.lastRestart` shows
//! how far it got and when it finished.

use std::time::Duration;

use kv_crd::kvcluster::{KvCluster, RESTARTED_AT};
use serde::Serialize;
use serde_json::{Value, json};

/// What `restart` wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RestartOutcome {
    pub cluster: String,
    pub namespace: String,
    /// The annotation's value as the API server stored it.
    pub requested_at: String,
    /// spec.replicas: the nodes to restart.
    pub nodes: u32,
}

/// What the status shows of the restart asked for, at the last look.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RestartEffect {
    pub requested_at: String,
    /// The operator finished it: every node restarted.
    pub in_effect: bool,
    /// Nodes restarted and back, in order (empty until the operator took
    /// up this request).
    pub restarted: Vec<u32>,
    /// The node being restarted now.
    pub restarting: Option<u32>,
    /// What the operator waits for before the next pod.
    pub waiting_for: Option<String>,
    pub waited_ms: u64,
}

/// The merge patch that asks for the restart `at`.
pub fn restart_patch(at: &str) -> Value {
    json!({"metadata": {"annotations": {RESTARTED_AT: at}}})
}

/// The restart `at` as `kvc`'s status shows it, after `waited`.
pub fn restart_effect(kvc: &KvCluster, at: &str, waited: Duration) -> RestartEffect {
    let last = kvc
        .status
        .as_ref()
        .and_then(|s| s.last_restart.as_ref())
        .filter(|r| r.requested_at == at);
    RestartEffect {
        requested_at: at.to_string(),
        in_effect: last.is_some_and(|r| r.finished_at.is_some()),
        restarted: last.map(|r| r.restarted.clone()).unwrap_or_default(),
        restarting: last.and_then(|r| r.restarting.as_ref().map(|n| n.ordinal)),
        waiting_for: last.and_then(|r| r.waiting_for.clone()),
        waited_ms: u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
    }
}

/// `kvctl restart --cluster NAME`: what was asked.
pub fn render_restart(o: &RestartOutcome) -> String {
    format!(
        "KvCluster {}/{}: annotation {RESTARTED_AT}={:?} set: kv-operator restarts its {} nodes one at a time, each Up and caught up before the next\n",
        o.namespace, o.cluster, o.requested_at, o.nodes
    )
}

/// What came of it after the wait.
pub fn render_restart_effect(e: &RestartEffect, nodes: u32) -> String {
    let secs = e.waited_ms as f64 / 1000.0;
    if e.in_effect {
        return format!(
            "in effect: nodes {:?} restarted ({secs:.1} s)\n",
            e.restarted
        );
    }
    let doing = match (&e.waiting_for, e.restarting) {
        (Some(w), _) => format!("waiting for {w}"),
        (None, Some(o)) => format!("restarting node {o}"),
        (None, None) => "not taken up by kv-operator yet".to_string(),
    };
    format!(
        "in progress: {} of {nodes} nodes restarted after {secs:.1} s; {doing} (kvctl nodes --cluster shows it)\n",
        e.restarted.len()
    )
}
