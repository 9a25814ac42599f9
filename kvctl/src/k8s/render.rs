//! What `kvctl nodes --cluster`, `fail` and `recover` print, from the
//! KvCluster's status and a write's [`Outcome`].

use std::fmt::Write as _;

use kv_core::NodeState;
use kv_crd::kvcluster::KvCluster;
use serde_json::{Value, json};

use kube::ResourceExt;
use kv_crd::kvcluster::{FORCE_FAULT_INJECTION, RestartStatus};

use super::change::cluster_id;
use super::{Outcome, status_topology};
use crate::output::{self, NodeRow};

/// The rows of `kvctl nodes`, from the status: the operator's view of each
/// node. A Failed node shows as unreachable, as it does locally.
pub fn node_rows(kvc: &KvCluster) -> Vec<NodeRow> {
    let mut rows: Vec<NodeRow> = kvc
        .status
        .as_ref()
        .map(|s| s.nodes.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|n| NodeRow {
            ordinal: n.ordinal,
            address: kvc.node_info(n.ordinal, n.state).address,
            state: n.state,
            reachable: n.state != NodeState::Failed,
            resync_progress: n.resync_progress,
            synced_epoch: None,
            hints_pending: None,
            error: None,
        })
        .collect();
    rows.sort_by_key(|r| r.ordinal);
    rows
}

fn ordinals(list: &[u32]) -> String {
    let items: Vec<String> = list.iter().map(u32::to_string).collect();
    format!("[{}]", items.join(", "))
}

/// `kvctl nodes --cluster NAME`: the local table, with the KvCluster's
/// phase, held-down nodes and conditions.
pub fn render_nodes(kvc: &KvCluster) -> String {
    let status = kvc.status.clone().unwrap_or_default();
    let mut out = String::new();
    let phase = status.phase.map_or("(none yet)", |p| p.as_str());
    let _ = writeln!(
        out,
        "KvCluster {}  phase {phase}  ready {}/{}  failedNodes {}",
        cluster_id(kvc),
        status.ready_replicas,
        kvc.spec.replicas,
        ordinals(&kvc.spec.fault_injection.failed_nodes)
    );
    if let Some(note) = staleness(kvc) {
        let _ = writeln!(out, "{note}");
    }
    out.push_str(&output::render_nodes(
        &status_topology(kvc),
        &node_rows(kvc),
    ));
    if status.nodes.is_empty() {
        out.push_str("(the status lists no nodes yet)\n");
    }
    if let Some(r) = &status.last_restart {
        let _ = writeln!(out, "{}", restart_line(r));
    }
    if let Some(b) = &status.bootstrap {
        let _ = writeln!(
            out,
            "bootstrap from {}: {:?}{}{}",
            b.source,
            b.phase,
            b.finished_at
                .as_ref()
                .map_or(String::new(), |at| format!(" at {at}")),
            b.message
                .as_ref()
                .map_or(String::new(), |m| format!(" ({m})"))
        );
    }
    if !status.conditions.is_empty() {
        let cells: Vec<Vec<String>> = status
            .conditions
            .iter()
            .map(|c| {
                vec![
                    format!("  {}={}", c.type_, c.status),
                    c.reason.clone(),
                    c.message.clone(),
                ]
            })
            .collect();
        out.push_str("conditions:\n");
        out.push_str(&output::table(&cells));
    }
    out
}

/// The last rolling restart (`status.lastRestart`) on one line.
fn restart_line(r: &RestartStatus) -> String {
    let done = ordinals(&r.restarted);
    match (&r.finished_at, &r.restarting, &r.waiting_for) {
        (Some(at), _, _) => format!(
            "restart {}: finished at {at}, nodes {done} restarted",
            r.requested_at
        ),
        (None, _, Some(w)) => format!(
            "restart {}: nodes {done} restarted; waiting for {w}",
            r.requested_at
        ),
        (None, Some(n), None) => format!(
            "restart {}: nodes {done} restarted; restarting node {}",
            r.requested_at, n.ordinal
        ),
        (None, None, None) => format!("restart {}: nodes {done} restarted", r.requested_at),
    }
}

/// A note when the status predates the spec (the operator has not
/// reconciled the last change yet).
fn staleness(kvc: &KvCluster) -> Option<String> {
    let generation = kvc.metadata.generation?;
    let observed = kvc.status.as_ref().and_then(|s| s.observed_generation);
    match observed {
        Some(o) if o >= generation => None,
        Some(o) => Some(format!(
            "the status is from generation {o}, the spec is at generation {generation}: kv-operator has not reconciled the last change yet"
        )),
        None => Some(format!(
            "kv-operator has not written a status for generation {generation} yet"
        )),
    }
}

/// `kvctl nodes --cluster NAME -o json`: the local command's keys, plus the
/// KvCluster's phase, held-down nodes and conditions.
pub fn nodes_json(kvc: &KvCluster) -> Value {
    let status = kvc.status.clone().unwrap_or_default();
    let mut out = crate::output::nodes_json(&status_topology(kvc), &node_rows(kvc));
    let extra = json!({
        "kvcluster": kvc.name_any(),
        "namespace": kvc.namespace(),
        "phase": status.phase,
        "replicas": kvc.spec.replicas,
        "readyReplicas": status.ready_replicas,
        "failedNodes": kvc.spec.fault_injection.failed_nodes,
        "generation": kvc.metadata.generation,
        "observedGeneration": status.observed_generation,
        "conditions": status.conditions,
        "lastRestart": status.last_restart,
        "bootstrap": status.bootstrap,
    });
    if let (Some(fields), Value::Object(extra)) = (out.as_object_mut(), extra) {
        fields.extend(extra);
    }
    out
}

/// `kvctl fail|recover N --cluster NAME`: what changed and the resulting list.
pub fn render_outcome(o: &Outcome) -> String {
    let who = format!("KvCluster {}/{}", o.namespace, o.cluster);
    let list = ordinals(&o.failed_nodes);
    let what = match (o.action, o.changed) {
        ("fail", true) => format!(
            "node {} added to spec.faultInjection.failedNodes: kv-operator deletes its pod and holds it Failed until recovered",
            o.node
        ),
        ("fail", false) => format!(
            "node {} is already held down (in spec.faultInjection.failedNodes); nothing changed",
            o.node
        ),
        (_, true) => format!(
            "node {} removed from spec.faultInjection.failedNodes: it restarts, catches up (Recovering), then is Up",
            o.node
        ),
        (_, false) => format!(
            "node {} is not held down (not in spec.faultInjection.failedNodes); nothing changed",
            o.node
        ),
    };
    let mut out = format!("{who}: {what}\nfailedNodes: {list}\n");
    let removal = format!(
        "kubectl annotate kvc {} -n {} {FORCE_FAULT_INJECTION}-",
        o.cluster, o.namespace
    );
    match (&o.force_annotation_before, &o.force_annotation) {
        (before, Some(v)) if before != &o.force_annotation => {
            let _ = writeln!(
                out,
                "annotation {FORCE_FAULT_INJECTION}={v:?} set: kv-operator plans this KvCluster with force and holds nodes down even when some keys are left with fewer live owners than writes need; recovering the last held-down node removes it (or: {removal})"
            );
        }
        (Some(_), None) => {
            let _ = writeln!(
                out,
                "annotation {FORCE_FAULT_INJECTION} removed: no node is held down, kv-operator plans without force again"
            );
        }
        (_, Some(v)) => {
            let _ = writeln!(
                out,
                "annotation {FORCE_FAULT_INJECTION}={v:?} remains until the last held-down node is recovered; remove it now with: {removal}"
            );
        }
        (None, None) => {}
    }
    if o.attempts > 1 {
        let _ = writeln!(
            out,
            "(the resource changed while kvctl wrote it; read it again and retried {} time(s))",
            o.attempts - 1
        );
    }
    out
}

/// kv-operator's verification (`status.lastVerify`), as `kvctl verify` prints its own.
pub fn render_verify_status(v: &kv_crd::verify::VerifyStatus) -> String {
    let mut out = String::new();
    for n in &v.not_checked {
        let _ = writeln!(out, "{n}: not checked");
    }
    for d in &v.divergent {
        let _ = writeln!(out, "{d}");
    }
    let shown = v.divergent.len() as u32;
    if v.divergent_buckets > shown {
        let _ = writeln!(out, "(and {} more buckets)", v.divergent_buckets - shown);
    }
    let _ = writeln!(
        out,
        "{} buckets compared, {} differ (kv-operator, epoch {}, at {})",
        v.buckets_compared, v.divergent_buckets, v.epoch, v.finished_at
    );
    out
}
