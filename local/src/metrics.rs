//! The local platform's control-plane metrics, served on the gateway's
//! `GET /metrics` (no auth), with the same names and labels as the
//! Kubernetes operator's ([`kv_control::metrics`], docs/design.md "Metrics"):
//! `kv_operator_reconciles_total{result}`,
//! `kv_operator_reconcile_duration_seconds`, `kv_operator_clusters{phase}`
//! and `kv_operator_nodes{state}`.
//!
//! Each supervisor tick is one reconcile of the one local cluster: result
//! `ok`, or `refused` when the planner refused the desired cluster.

use std::time::Instant;

use prometheus::{Encoder, Registry, TextEncoder};

use kv_control::metrics::Metrics;
use kv_control::planner::Plan;

/// The key the one local cluster is recorded under.
const CLUSTER: &str = "local";

pub struct LocalMetrics {
    registry: Registry,
    metrics: Option<Metrics>,
}

impl Default for LocalMetrics {
    fn default() -> Self {
        LocalMetrics::new()
    }
}

impl LocalMetrics {
    pub fn new() -> LocalMetrics {
        let registry = Registry::new();
        let metrics = match Metrics::new(&registry) {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::error!(error = %e, "cannot register the control-plane metrics");
                None
            }
        };
        LocalMetrics { registry, metrics }
    }

    /// Records one supervisor tick: its result, duration, the cluster's
    /// phase and its nodes' states after the plan.
    pub fn record_tick(&self, started: Instant, plan: &Plan, held: usize) {
        let Some(m) = &self.metrics else {
            return;
        };
        let result = if plan.refusal.is_some() {
            "refused"
        } else {
            "ok"
        };
        m.record(started, result);
        m.observe_cluster(
            CLUSTER,
            plan.phase,
            plan.nodes.iter().map(|n| n.state).collect(),
            held,
        );
    }

    /// Counts a tick that could not be carried out.
    pub fn record_error(&self, started: Instant) {
        if let Some(m) = &self.metrics {
            m.record(started, "error");
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> (String, String) {
        let encoder = TextEncoder::new();
        let mut buf = Vec::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "cannot encode the control-plane metrics");
        }
        (
            encoder.format_type().to_string(),
            String::from_utf8_lossy(&buf).into_owned(),
        )
    }

    /// The gateway's `GET /metrics` answer.
    pub fn response(&self) -> warp::reply::Response {
        let (content_type, body) = self.render();
        let mut resp = warp::reply::Response::new(body.into());
        if let Ok(v) = warp::http::HeaderValue::from_str(&content_type) {
            resp.headers_mut()
                .insert(warp::http::header::CONTENT_TYPE, v);
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kv_control::planner::{NodeStatus, Phase as PlanPhase};
    use kv_core::NodeState;

    fn plan(phase: PlanPhase, states: &[NodeState]) -> Plan {
        Plan {
            topology: None,
            actions: Vec::new(),
            transitions: Vec::new(),
            refusal: None,
            phase,
            rebalance: None,
            nodes: states
                .iter()
                .enumerate()
                .map(|(i, s)| NodeStatus {
                    ordinal: i as u32,
                    state: *s,
                    resync_progress: None,
                })
                .collect(),
            removed: Vec::new(),
            hibernation_deferred: None,
            node_count: states.len() as u32,
        }
    }

    #[test]
    fn ticks_publish_the_operator_metric_names() {
        let m = LocalMetrics::new();
        let t = Instant::now();
        m.record_tick(t, &plan(PlanPhase::Running, &[NodeState::Up; 3]), 0);
        m.record_tick(
            t,
            &plan(
                PlanPhase::Degraded,
                &[NodeState::Up, NodeState::Failed, NodeState::Up],
            ),
            1,
        );
        m.record_error(t);
        let (ct, text) = m.render();
        assert!(ct.starts_with("text/plain"), "{ct}");
        for line in [
            "kv_operator_reconciles_total{result=\"ok\"} 2",
            "kv_operator_reconciles_total{result=\"error\"} 1",
            "kv_operator_reconcile_duration_seconds_count 3",
            "kv_operator_clusters{phase=\"Degraded\"} 1",
            "kv_operator_clusters{phase=\"Running\"} 0",
            "kv_operator_nodes{state=\"Failed\"} 1",
            "kv_operator_nodes{state=\"Up\"} 2",
            "kv_operator_cluster_held_nodes{kvcluster=\"local\",namespace=\"\"} 1",
            "kv_operator_cluster_nodes{kvcluster=\"local\",namespace=\"\",state=\"Failed\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }
}
