//! The fault harness on a short fixed set of seeds: a 5-node cluster
//! (ConsistentHashing, factor 3, Quorum) under 8 clients and the seeded
//! nemesis, then heal and check. Each seed's workload runs 20 s; the
//! heal/converge phases are bounded, so the test stays within ~3 minutes.

use std::time::Duration;

use kv_chaos::cluster::kv_node_bin;
use kv_chaos::history::Outcome;
use kv_chaos::nemesis;
use kv_chaos::run::{RunOptions, run};

/// Between them every kind of fault: seed 3 changes the factor, kills node 0
/// and partitions it; seed 21 slows node 2, switches to Full and back, and
/// holds node 2 Failed (`kv-chaos --schedule-only --duration 20s --seed N`).
const SEEDS: [u64; 2] = [3, 21];
const WORKLOAD: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_fixed_seed_breaks_the_consistency_promise_under_faults() {
    let bin = kv_node_bin().expect("the kv-node binary");
    let mut failures = Vec::new();
    for seed in SEEDS {
        let report = run(RunOptions::new(seed, WORKLOAD, bin.clone()))
            .await
            .expect("the cluster starts");
        println!("{report}");
        // The run did something worth checking.
        let acked = report
            .ops
            .iter()
            .filter(|o| o.acknowledged_mutation())
            .count();
        let reads = report
            .ops
            .iter()
            .filter(|o| o.outcome == Outcome::Ok && !o.is_mutation())
            .count();
        assert!(
            acked >= 100 && reads >= 50,
            "seed {seed}: too little load to check ({acked} acknowledged mutations, {reads} reads)"
        );
        assert!(
            !nemesis::injected_by_kind(&report.events).is_empty(),
            "seed {seed}: the nemesis injected nothing:\n{report}"
        );
        // Peer traffic went through the proxies (the topology's peer
        // addresses are theirs), so partitions and slow links were real.
        assert!(
            report.net.connections.keys().any(|(s, d)| s != d),
            "seed {seed}: no peer connection went through a proxy"
        );
        if !report.passed() {
            failures.push(format!("{report}"));
        }
    }
    assert!(failures.is_empty(), "FAIL:\n{}", failures.join("\n"));
}
