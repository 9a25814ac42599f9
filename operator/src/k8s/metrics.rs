//! The operator's own Prometheus metrics (docs/design.md, "Operator").
//!
//! `kv_operator_clusters{phase}` and `kv_operator_nodes{state}` are gauges over
//! every KvCluster this operator reconciles; each reconcile records its
//! cluster's latest phase and node states, and the gauges are recomputed from
//! that record so that a cluster moving from Degraded to Running moves one
//! count, not two.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use kv_core::NodeState;
use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGaugeVec, Opts, Registry};

use super::crd::Phase;

/// The latest phase and node states of each cluster, by `namespace/name`.
type Seen = BTreeMap<String, (Phase, Vec<NodeState>)>;

#[derive(Clone)]
pub struct Metrics {
    pub reconciles: IntCounterVec,
    pub duration: Histogram,
    pub clusters: IntGaugeVec,
    pub nodes: IntGaugeVec,
    seen: std::sync::Arc<Mutex<Seen>>,
}

impl Metrics {
    /// Create the metrics and register them with `registry`.
    pub fn new(registry: &Registry) -> Result<Metrics, prometheus::Error> {
        let reconciles = IntCounterVec::new(
            Opts::new(
                "kv_operator_reconciles_total",
                "Reconciles of a KvCluster by result (ok, or the error kind)",
            ),
            &["result"],
        )?;
        let duration = Histogram::with_opts(
            HistogramOpts::new(
                "kv_operator_reconcile_duration_seconds",
                "Time one reconcile of a KvCluster took",
            )
            .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
        )?;
        let clusters = IntGaugeVec::new(
            Opts::new("kv_operator_clusters", "KvClusters by phase"),
            &["phase"],
        )?;
        let nodes = IntGaugeVec::new(
            Opts::new(
                "kv_operator_nodes",
                "kvstore nodes of every KvCluster by state",
            ),
            &["state"],
        )?;
        registry.register(Box::new(reconciles.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(clusters.clone()))?;
        registry.register(Box::new(nodes.clone()))?;
        // Every label value exists from the start, so dashboards see zeros, not gaps.
        for p in Phase::ALL {
            clusters.with_label_values(&[p.as_str()]).set(0);
        }
        for s in NodeState::ALL {
            nodes.with_label_values(&[&s.to_string()]).set(0);
        }
        reconciles.with_label_values(&["ok"]).inc_by(0);
        Ok(Metrics {
            reconciles,
            duration,
            clusters,
            nodes,
            seen: Default::default(),
        })
    }

    /// Count a reconcile's outcome and time it.
    pub fn record(&self, started: Instant, result: &str) {
        self.duration.observe(started.elapsed().as_secs_f64());
        self.reconciles.with_label_values(&[result]).inc();
    }

    /// Record one cluster's phase and node states (key `namespace/name`).
    pub fn observe_cluster(&self, key: &str, phase: Phase, states: Vec<NodeState>) {
        let Ok(mut seen) = self.seen.lock() else {
            return;
        };
        seen.insert(key.to_string(), (phase, states));
        self.publish(&seen);
    }

    /// Forget a cluster that was deleted.
    pub fn forget_cluster(&self, key: &str) {
        let Ok(mut seen) = self.seen.lock() else {
            return;
        };
        seen.remove(key);
        self.publish(&seen);
    }

    /// Keep only the clusters that still exist. Deleted clusters are never
    /// reconciled again (their objects go with them), so the runner calls this
    /// with the keys in the controller's cache.
    pub fn retain_clusters(&self, existing: &[String]) {
        let Ok(mut seen) = self.seen.lock() else {
            return;
        };
        seen.retain(|k, _| existing.contains(k));
        self.publish(&seen);
    }

    fn publish(&self, seen: &Seen) {
        for p in Phase::ALL {
            let n = seen.values().filter(|(phase, _)| *phase == p).count();
            self.clusters
                .with_label_values(&[p.as_str()])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        for s in NodeState::ALL {
            let n = seen
                .values()
                .flat_map(|(_, states)| states)
                .filter(|state| **state == s)
                .count();
            self.nodes
                .with_label_values(&[&s.to_string()])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauges_count_each_cluster_once_in_its_latest_phase() {
        let registry = Registry::new();
        let m = Metrics::new(&registry).expect("metrics register");
        m.observe_cluster(
            "ns/a",
            Phase::Degraded,
            vec![NodeState::Up, NodeState::Failed],
        );
        m.observe_cluster("ns/b", Phase::Running, vec![NodeState::Up]);
        m.observe_cluster("ns/a", Phase::Running, vec![NodeState::Up, NodeState::Up]);
        assert_eq!(m.clusters.with_label_values(&["Running"]).get(), 2);
        assert_eq!(m.clusters.with_label_values(&["Degraded"]).get(), 0);
        assert_eq!(m.nodes.with_label_values(&["Up"]).get(), 3);
        assert_eq!(m.nodes.with_label_values(&["Failed"]).get(), 0);
        m.forget_cluster("ns/b");
        assert_eq!(m.clusters.with_label_values(&["Running"]).get(), 1);
        m.observe_cluster("ns/c", Phase::Failed, vec![]);
        m.retain_clusters(&["ns/a".to_string()]);
        assert_eq!(m.clusters.with_label_values(&["Failed"]).get(), 0);
        assert_eq!(m.clusters.with_label_values(&["Running"]).get(), 1);
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&registry.gather())
            .expect("encodes");
        for name in [
            "kv_operator_reconciles_total",
            "kv_operator_reconcile_duration_seconds",
            "kv_operator_clusters",
            "kv_operator_nodes",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }
}
