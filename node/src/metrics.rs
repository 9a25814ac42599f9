//! The node's Prometheus metrics (names in docs/design.md, prefix `kv_`).

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use kv_core::NodeState;

use crate::storage::StoreStats;

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub commit_batch: Histogram,
    pub fsync_duration: Histogram,
    pub peer_batch: HistogramVec,
    pub keys: IntGauge,
    pub tombstones: IntGauge,
    pub db_bytes: IntGauge,
    pub volume_size_bytes: IntGauge,
    pub volume_free_bytes: IntGauge,
    pub topology_epoch: IntGauge,
    pub node_state: IntGaugeVec,
    pub hints_pending: IntGauge,
    pub replication: IntCounterVec,
    pub read_repairs: IntCounter,
    pub speculative_reads: IntCounter,
    pub resync_buckets_total: IntGauge,
    pub resync_buckets_done: IntGauge,
    pub resync_progress: prometheus::Gauge,
    pub resync_keys_moved: IntCounter,
    pub divergent_buckets: IntGauge,
    pub hints_delivered: IntCounter,
    pub tombstones_purged: IntCounter,
    pub clock_skew: prometheus::Gauge,
    pub writes_reissued: IntCounter,
    pub create_conflicts: IntCounter,
    pub store_catching_up: IntGauge,
    pub restore_records: IntCounter,
    pub restore_failures: IntCounter,
}

fn must<T>(r: prometheus::Result<T>) -> T {
    match r {
        Ok(v) => v,
        // Metric definitions are static; an error here is a programming
        // mistake caught by the first test that builds a node.
        Err(e) => panic!("invalid metric definition: {e}"),
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let reg = |c: Box<dyn prometheus::core::Collector>| must(registry.register(c));
        let requests = must(IntCounterVec::new(
            Opts::new(
                "kv_requests_total",
                "Client requests by route and status code",
            ),
            &["route", "code"],
        ));
        let request_duration = must(HistogramVec::new(
            HistogramOpts::new(
                "kv_request_duration_seconds",
                "Client request latency by route",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            &["route"],
        ));
        let commit_batch = must(Histogram::with_opts(
            HistogramOpts::new(
                "kv_commit_batch_size",
                "Write requests made durable by one fsync of the write-ahead log (group commit)",
            )
            .buckets(vec![
                1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0,
            ]),
        ));
        let fsync_duration = must(Histogram::with_opts(
            HistogramOpts::new(
                "kv_fsync_duration_seconds",
                "Time of one fsync of the write-ahead log",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5,
            ]),
        ));
        // Items in each batched request to a peer: round-robin load makes
        // smaller batches than load through one node, and each batch costs
        // wake-ups at both ends (bench/profile.md, twelfth step).
        let peer_batch = must(HistogramVec::new(
            HistogramOpts::new(
                "kv_peer_batch_size",
                "Items (replica writes or reads) in one batched request this node sent to a peer",
            )
            .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]),
            &["op"],
        ));
        let gauge = |name: &str, help: &str| must(IntGauge::new(name, help));
        let counter = |name: &str, help: &str| must(IntCounter::new(name, help));
        let m = Metrics {
            requests,
            request_duration,
            commit_batch,
            fsync_duration,
            peer_batch,
            keys: gauge("kv_keys", "Live keys stored on this node"),
            tombstones: gauge("kv_tombstones", "Tombstones stored on this node"),
            db_bytes: gauge("kv_db_bytes", "Size of the SQLite database in bytes"),
            volume_size_bytes: gauge(
                "kv_volume_size_bytes",
                "Size of the filesystem that holds the data directory",
            ),
            volume_free_bytes: gauge(
                "kv_volume_free_bytes",
                "Bytes of the data directory's filesystem free for the node's use",
            ),
            topology_epoch: gauge("kv_topology_epoch", "Epoch of the topology this node holds"),
            node_state: must(IntGaugeVec::new(
                Opts::new("kv_node_state", "1 for this node's current state"),
                &["state"],
            )),
            hints_pending: gauge(
                "kv_hints_pending",
                "Hints waiting for delivery to other nodes",
            ),
            replication: must(IntCounterVec::new(
                Opts::new(
                    "kv_replication_total",
                    "Replica operations sent to other nodes by outcome",
                ),
                &["op", "outcome"],
            )),
            read_repairs: counter("kv_read_repairs_total", "Stale replicas repaired by reads"),
            speculative_reads: counter(
                "kv_speculative_reads_total",
                "Extra owners asked because a replica read was slow to answer",
            ),
            resync_buckets_total: gauge(
                "kv_resync_buckets_total",
                "Buckets the current catch-up or rebalance must pull",
            ),
            resync_buckets_done: gauge(
                "kv_resync_buckets_done",
                "Buckets the current catch-up or rebalance has pulled",
            ),
            resync_progress: must(prometheus::Gauge::new(
                "kv_resync_progress",
                "Progress of the current catch-up (0..1; 1 when idle)",
            )),
            restore_records: counter(
                "kv_restore_records_total",
                "Records a new store stored from the backup it started from (--restore-from)",
            ),
            restore_failures: counter(
                "kv_restore_failures_total",
                "Failed loads of the backup a new store starts from; each is tried again",
            ),
            resync_keys_moved: counter(
                "kv_resync_keys_moved_total",
                "Records applied by catch-up, rebalancing and anti-entropy",
            ),
            divergent_buckets: gauge(
                "kv_antientropy_divergent_buckets",
                "Buckets found different from a co-owner in the last anti-entropy round",
            ),
            hints_delivered: counter(
                "kv_hints_delivered_total",
                "Hints handed off to their owner",
            ),
            tombstones_purged: counter(
                "kv_tombstones_purged_total",
                "Tombstones removed after the grace period",
            ),
            clock_skew: must(prometheus::Gauge::new(
                "kv_clock_skew_seconds",
                "This node's clock minus the median of the cluster's clocks",
            )),
            writes_reissued: counter(
                "kv_writes_reissued_total",
                "Writes re-issued with a higher version because an owner held a newer one",
            ),
            create_conflicts: counter(
                "kv_create_conflicts_total",
                "Create-only writes this node led that a quorum of owners did not grant (another create or write of the key, or owners down)",
            ),
            store_catching_up: gauge(
                "kv_store_catching_up",
                "1 while this node's store is new or rebuilt and serves no reads until caught up",
            ),
            registry: registry.clone(),
        };
        reg(Box::new(m.requests.clone()));
        reg(Box::new(m.request_duration.clone()));
        reg(Box::new(m.commit_batch.clone()));
        reg(Box::new(m.fsync_duration.clone()));
        reg(Box::new(m.peer_batch.clone()));
        reg(Box::new(m.keys.clone()));
        reg(Box::new(m.tombstones.clone()));
        reg(Box::new(m.db_bytes.clone()));
        reg(Box::new(m.volume_size_bytes.clone()));
        reg(Box::new(m.volume_free_bytes.clone()));
        reg(Box::new(m.topology_epoch.clone()));
        reg(Box::new(m.node_state.clone()));
        reg(Box::new(m.hints_pending.clone()));
        reg(Box::new(m.replication.clone()));
        reg(Box::new(m.read_repairs.clone()));
        reg(Box::new(m.speculative_reads.clone()));
        reg(Box::new(m.resync_buckets_total.clone()));
        reg(Box::new(m.resync_buckets_done.clone()));
        reg(Box::new(m.resync_progress.clone()));
        reg(Box::new(m.resync_keys_moved.clone()));
        reg(Box::new(m.divergent_buckets.clone()));
        reg(Box::new(m.hints_delivered.clone()));
        reg(Box::new(m.tombstones_purged.clone()));
        reg(Box::new(m.clock_skew.clone()));
        reg(Box::new(m.writes_reissued.clone()));
        reg(Box::new(m.create_conflicts.clone()));
        reg(Box::new(m.store_catching_up.clone()));
        reg(Box::new(m.restore_records.clone()));
        reg(Box::new(m.restore_failures.clone()));
        m.resync_progress.set(1.0);
        m
    }

    pub fn set_state(&self, state: Option<NodeState>) {
        for s in NodeState::ALL {
            self.node_state
                .with_label_values(&[&s.to_string()])
                .set(i64::from(Some(s) == state));
        }
    }

    pub fn set_store_stats(&self, s: &StoreStats) {
        self.keys.set(s.keys as i64);
        self.tombstones.set(s.tombstones as i64);
        self.db_bytes.set(s.db_bytes as i64);
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
