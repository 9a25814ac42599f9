//! The control plane's Prometheus metrics (docs/design.md, "Operator"),
//! the same names on both platforms: kv-operator serves them for every
//! KvCluster it reconciles, `kvctl up`'s gateway for its one cluster.
//!
//! `kv_operator_clusters{phase}` and `kv_operator_nodes{state}` are gauges over
//! every KvCluster this operator reconciles; each reconcile records its
//! cluster's latest phase and node states, and the gauges are recomputed from
//! that record so that a cluster moving from Degraded to Running moves one
//! count, not two.
//!
//! The same record is also published per cluster, labelled `namespace` and
//! `kvcluster`: `kv_operator_cluster_phase{phase}` (1 for the current phase),
//! `kv_operator_cluster_nodes{state}` and `kv_operator_cluster_held_nodes`,
//! the Failed nodes that are held down on purpose
//! (`spec.faultInjection.failedNodes`), so that an alert can tell a drill
//! from a failure.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use kv_core::NodeState;
use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGaugeVec, Opts, Registry};

use crate::phase::Phase;

/// The latest phase, node states and held-down node count of each cluster,
/// by `namespace/name`.
type Seen = BTreeMap<String, (Phase, Vec<NodeState>, usize)>;

#[derive(Clone)]
pub struct Metrics {
    pub reconciles: IntCounterVec,
    pub duration: Histogram,
    pub clusters: IntGaugeVec,
    pub nodes: IntGaugeVec,
    pub cluster_phase: IntGaugeVec,
    pub cluster_nodes: IntGaugeVec,
    pub cluster_held: IntGaugeVec,
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
        let cluster_phase = IntGaugeVec::new(
            Opts::new(
                "kv_operator_cluster_phase",
                "1 for the phase each KvCluster is in, 0 for the others",
            ),
            &["namespace", "kvcluster", "phase"],
        )?;
        let cluster_nodes = IntGaugeVec::new(
            Opts::new(
                "kv_operator_cluster_nodes",
                "Nodes of each KvCluster by state",
            ),
            &["namespace", "kvcluster", "state"],
        )?;
        let cluster_held = IntGaugeVec::new(
            Opts::new(
                "kv_operator_cluster_held_nodes",
                "Failed nodes of each KvCluster held down on purpose (faultInjection.failedNodes)",
            ),
            &["namespace", "kvcluster"],
        )?;
        registry.register(Box::new(cluster_phase.clone()))?;
        registry.register(Box::new(cluster_nodes.clone()))?;
        registry.register(Box::new(cluster_held.clone()))?;
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
            cluster_phase,
            cluster_nodes,
            cluster_held,
            seen: Default::default(),
        })
    }

    /// Count a reconcile's outcome and time it.
    pub fn record(&self, started: Instant, result: &str) {
        self.duration.observe(started.elapsed().as_secs_f64());
        self.reconciles.with_label_values(&[result]).inc();
    }

    /// Record one cluster's phase, node states and how many of its Failed
    /// nodes are held down on purpose (key `namespace/name`).
    pub fn observe_cluster(&self, key: &str, phase: Phase, states: Vec<NodeState>, held: usize) {
        let Ok(mut seen) = self.seen.lock() else {
            return;
        };
        seen.insert(key.to_string(), (phase, states, held));
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
        // Rebuilt from the record, so a deleted cluster's series go with it.
        self.cluster_phase.reset();
        self.cluster_nodes.reset();
        self.cluster_held.reset();
        for (key, (phase, states, held)) in seen {
            let (ns, name) = key.split_once('/').unwrap_or(("", key));
            for p in Phase::ALL {
                self.cluster_phase
                    .with_label_values(&[ns, name, p.as_str()])
                    .set(i64::from(p == *phase));
            }
            for s in NodeState::ALL {
                let n = states.iter().filter(|state| **state == s).count();
                self.cluster_nodes
                    .with_label_values(&[ns, name, &s.to_string()])
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
            self.cluster_held
                .with_label_values(&[ns, name])
                .set(i64::try_from(*held).unwrap_or(i64::MAX));
        }
        for p in Phase::ALL {
            let n = seen.values().filter(|(phase, ..)| *phase == p).count();
            self.clusters
                .with_label_values(&[p.as_str()])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        for s in NodeState::ALL {
            let n = seen
                .values()
                .flat_map(|(_, states, _)| states)
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
            0,
        );
        m.observe_cluster("ns/b", Phase::Running, vec![NodeState::Up], 0);
        m.observe_cluster(
            "ns/a",
            Phase::Running,
            vec![NodeState::Up, NodeState::Up],
            0,
        );
        assert_eq!(m.clusters.with_label_values(&["Running"]).get(), 2);
        assert_eq!(m.clusters.with_label_values(&["Degraded"]).get(), 0);
        assert_eq!(m.nodes.with_label_values(&["Up"]).get(), 3);
        assert_eq!(m.nodes.with_label_values(&["Failed"]).get(), 0);
        m.forget_cluster("ns/b");
        assert_eq!(m.clusters.with_label_values(&["Running"]).get(), 1);
        m.observe_cluster("ns/c", Phase::Failed, vec![], 0);
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

    #[test]
    fn each_cluster_has_its_own_series_and_a_deleted_one_loses_them() {
        let registry = Registry::new();
        let m = Metrics::new(&registry).expect("metrics register");
        let failed_one = vec![NodeState::Up, NodeState::Failed, NodeState::Up];
        m.observe_cluster("prod/a", Phase::Degraded, failed_one.clone(), 0);
        m.observe_cluster("drill/b", Phase::Degraded, failed_one, 1);
        let nodes = |ns: &str, name: &str, state: &str| {
            m.cluster_nodes.with_label_values(&[ns, name, state]).get()
        };
        assert_eq!(nodes("prod", "a", "Failed"), 1);
        assert_eq!(nodes("prod", "a", "Up"), 2);
        assert_eq!(m.cluster_held.with_label_values(&["prod", "a"]).get(), 0);
        assert_eq!(
            m.cluster_held.with_label_values(&["drill", "b"]).get(),
            1,
            "a drill"
        );
        assert_eq!(
            m.cluster_phase
                .with_label_values(&["drill", "b", "Degraded"])
                .get(),
            1
        );
        assert_eq!(
            m.cluster_phase
                .with_label_values(&["drill", "b", "Running"])
                .get(),
            0
        );
        m.forget_cluster("drill/b");
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&registry.gather())
            .expect("encodes");
        assert!(text.contains(r#"kvcluster="a""#), "{text}");
        assert!(
            !text.contains(r#"kvcluster="b""#),
            "deleted cluster's series remain:\n{text}"
        );
    }
}
