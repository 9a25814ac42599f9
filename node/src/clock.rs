//! Clock skew between nodes.
//!
//! Versions are stamped from each coordinator's wall clock, so a node whose
//! clock is far off stamps its writes far off. Every peer request and answer
//! carries the sender's clock (`x-kv-clock`); this node keeps the latest
//! offset measured to each peer and estimates its own skew as the distance
//! from its clock to the median of the cluster's clocks (its own included),
//! so one skewed peer does not make a healthy node think itself skewed.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Measurements older than this are not used.
const FRESH: Duration = Duration::from_secs(120);

#[derive(Debug, Default)]
pub struct SkewTracker {
    /// Per peer: (their clock − ours in ms, when measured).
    offsets: Mutex<HashMap<u32, (i64, Instant)>>,
}

impl SkewTracker {
    pub fn new() -> SkewTracker {
        SkewTracker::default()
    }

    /// A peer's clock minus ours, in ms, measured now.
    pub fn record(&self, peer: u32, offset_ms: i64) {
        self.offsets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(peer, (offset_ms, Instant::now()));
    }

    /// Forgets peers that left the cluster.
    pub fn retain(&self, keep: impl Fn(u32) -> bool) {
        self.offsets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|p, _| keep(*p));
    }

    /// This node's clock minus the median of the cluster's clocks (this
    /// node's included), in ms; 0 when no peer was measured recently. With
    /// an even count the middle value nearer to ours is taken: between two
    /// nodes neither can tell which clock is wrong, so neither is blamed.
    pub fn skew_ms(&self) -> i64 {
        let offsets = self.offsets.lock().unwrap_or_else(|p| p.into_inner());
        let mut all: Vec<i64> = offsets
            .values()
            .filter(|(_, at)| at.elapsed() < FRESH)
            .map(|(o, _)| *o)
            .collect();
        drop(offsets);
        all.push(0);
        all.sort_unstable();
        let n = all.len();
        let median = if n % 2 == 1 {
            all[n / 2]
        } else {
            let (a, b) = (all[n / 2 - 1], all[n / 2]);
            if a.abs() <= b.abs() { a } else { b }
        };
        -median
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_ahead_of_every_peer_is_skewed_and_its_peers_are_not() {
        let hour = 3_600_000;
        let skewed = SkewTracker::new();
        skewed.record(0, -hour);
        skewed.record(2, -hour + 3);
        assert!((skewed.skew_ms() - hour).abs() < 10, "{}", skewed.skew_ms());

        let healthy = SkewTracker::new();
        healthy.record(1, hour);
        healthy.record(2, 2);
        assert!(healthy.skew_ms().abs() < 10, "{}", healthy.skew_ms());
    }

    #[test]
    fn two_nodes_blame_neither_and_no_measurement_means_no_skew() {
        let t = SkewTracker::new();
        assert_eq!(t.skew_ms(), 0);
        t.record(1, 3_600_000);
        assert_eq!(t.skew_ms(), 0);
    }

    #[test]
    fn a_node_behind_its_peers_has_a_negative_skew() {
        let t = SkewTracker::new();
        for p in 1..5 {
            t.record(p, 10_000 + i64::from(p));
        }
        assert!(t.skew_ms() <= -10_000, "{}", t.skew_ms());
    }
}
